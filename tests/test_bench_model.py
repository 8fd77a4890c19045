"""python -m glalearn.bench model without a GPU: the profile's bookkeeping (op families of kernel names,
busy and idle time from a trace) and the command's user errors. The timings themselves need a GPU."""

import pytest
import torch

from glalearn import bench_model
from glalearn.bench_model import FAMILIES, gpu_tag, kernel_family, summarize_trace

# Kernel names as torch.profiler reports them (ours, fla 0.6.0's, PyTorch's and cuBLAS's on an H100).
NAMES = {
    "segment_state_kernel": "GLA kernels",
    "chunk_dqkg_kernel": "GLA kernels",
    "chunk_gla_fwd_kernel_o": "GLA kernels",
    "chunk_local_cumsum_vector_kernel": "GLA kernels",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 128, 64, 8, false, false, cutlass::bfloat16_t>>":
        "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k256_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "cross_entropy_kernel": "loss",
    "cross_entropy_fwd_kernel": "loss",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>":
        "loss",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
    "gate_forward_kernel": "gate",
    "void at::native::vectorized_elementwise_kernel<4, at::native::log_sigmoid_forward_kernel(at::TensorIteratorBase&)>":
        "gate",
    "norm_gate_backward_kernel": "norm + output gate",
    "layer_norm_gated_fwd_kernel": "norm + output gate",
    "rms_norm_forward_kernel": "norms",
    "layer_norm_fwd_kernel1": "norms",
    "swiglu_backward_kernel": "SwiGLU / swish",
    "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)>":
        "SwiGLU / swish",
    "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>":
        "embedding",
    "void at::native::embedding_backward_feature_kernel<float, float, long>": "embedding",
    "nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off": "matmul",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise / casts",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>":
        "elementwise / casts",
    "Memcpy DtoD (Device -> Device)": "elementwise / casts",
    "some_new_kernel": "other",
}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_family(name):
    assert kernel_family(name) == NAMES[name]


def test_our_gla_kernels_are_found_by_name_whatever_they_are_called():
    core = bench_model.gla_core_kernel_names()
    assert {"chunk_output_kernel", "segment_state_kernel"} <= core
    assert not core & {"gate_forward_kernel", "norm_gate_forward_kernel", "cross_entropy_kernel",
                       "swiglu_forward_kernel", "rms_norm_forward_kernel"}
    assert kernel_family("a_renamed_state_kernel", {"a_renamed_state_kernel"}) == "GLA kernels"


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_summarize_trace_counts_busy_idle_and_families_per_step():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5000.0},  # not a kernel
        _kernel("nvjet_tst_a", 100.0, 1000.0),
        _kernel("nvjet_tst_a", 600.0, 1000.0),  # overlaps the first (another stream): busy counts it once
        _kernel("segment_state_kernel", 2000.0, 500.0),
        _kernel("Memset (Device)", 3000.0, 100.0, cat="gpu_memset"),
        _kernel("cross_entropy_kernel", 4000.0, 400.0),
    ]
    s = summarize_trace(events, steps=2)
    assert s["kernel_ms"] == pytest.approx((1000 + 1000 + 500 + 100 + 400) / 1e3 / 2)
    assert s["span_ms"] == pytest.approx((4400 - 100) / 1e3 / 2)
    assert s["busy_ms"] == pytest.approx((1500 + 500 + 100 + 400) / 1e3 / 2)
    assert s["idle_ms"] == pytest.approx(s["span_ms"] - s["busy_ms"])
    assert s["kernels_per_step"] == 2.5
    fam = s["families"]
    assert set(fam) == set(FAMILIES)
    assert fam["matmul"]["ms"] == pytest.approx(1.0) and fam["matmul"]["kernels"] == 1
    assert fam["GLA kernels"]["ms"] == pytest.approx(0.25)
    assert fam["loss"]["ms"] == pytest.approx(0.2)
    assert sum(f["share"] for f in fam.values()) == pytest.approx(1.0)
    assert s["top_kernels"][0] == {"name": "nvjet_tst_a", "family": "matmul", "ms": pytest.approx(1.0), "calls": 1}
    with pytest.raises(ValueError, match="no GPU kernels"):
        summarize_trace(events[:1], steps=1)


def test_gpu_tag():
    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"
    assert gpu_tag("Some Card 9") == "some_card_9"


def test_command_line_errors_are_one_line(capsys):
    assert bench_model.main(["--lengths", "1000"]) == 2
    assert "error: --lengths must be multiples of 64" in capsys.readouterr().err
    assert bench_model.main(["--lengths", "2048", "--profile-out", "p.json", "--profile-length", "4096"]) == 2
    assert "--profile-length (4096) must be one of --lengths [2048]" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_model.main(["--lengths", "2048"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m glalearn.bench model: error:") and "needs a CUDA GPU" in err
