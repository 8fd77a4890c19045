"""The fused path trains the same model (chapter 9): a seeded 100-step run on Tiny Shakespeare with the
flash backend, fused pieces on (glalearn.fused: norms, gate, norm + output gate, SwiGLU, chunked loss)
and off, float32 in Triton's interpreter on the CPU (compiled on a GPU). The two losses agree within 1e-3
after 100 steps.

The model is as small as the kernels allow (one layer, one head, 2 x 32 tokens a step): in the
interpreter each kernel launch costs milliseconds whatever its size, about 0.9 s per step of both runs.
The learning rate is gentle on purpose: at 3e-3 this tiny model trains at the edge of stability, where
float32 rounding differences of 1e-7 (any reordering of a sum) grow to 1e-2 within 40 steps, fused or not.
"""

import os

import pytest
import torch

from glalearn.data import sample_batch, shakespeare_splits
from glalearn.model import GLAConfig, TransformerConfig, build_model
from glalearn.numerics import relative_rmse

STEPS = 100
# Compiled on a GPU (TRITON_INTERPRET=0) the same float32 run takes seconds there.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _run(fused_setting: bool):
    torch.manual_seed(0)
    cfg = GLAConfig(vocab_size=65, d_model=32, n_layers=1, num_heads=1, context_length=32, backend="flash",
                    chunk_size=16)
    model = build_model(cfg).to(DEVICE).set_fused(fused_setting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_ids, val_ids = shakespeare_splits()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = sample_batch(train_ids, 2, 32, gen, DEVICE)
        loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        x, y = sample_batch(val_ids, 8, 32, torch.Generator().manual_seed(2), DEVICE)
        val = model.loss(x, y).item()
    return losses, val


@pytest.mark.usefixtures("one_thread")
def test_fused_and_unfused_flash_training_agree_after_100_steps():
    fused_losses, fused_val = _run(True)
    plain_losses, plain_val = _run(False)
    assert abs(fused_losses[0] - plain_losses[0]) < 1e-5  # the same model and batch at step 0
    assert plain_losses[-1] < plain_losses[0] - 0.5 and plain_val < plain_losses[0] - 0.5  # it learns
    assert abs(fused_losses[-1] - plain_losses[-1]) <= 1e-3, (fused_losses[-1], plain_losses[-1])
    assert abs(fused_val - plain_val) <= 1e-3, (fused_val, plain_val)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="bf16 on a CUDA GPU, compiled")
@pytest.mark.parametrize("kind", ["gla", "transformer"])
def test_fused_step_matches_unfused_in_bf16_on_the_gpu(kind):
    """The benchmark's regime (float32 weights, bf16 autocast) at a small shape: the loss and every
    parameter's gradient of one step agree with the PyTorch path to bf16 accuracy."""
    shape = {"vocab_size": 1000, "d_model": 256, "n_layers": 2, "num_heads": 2, "context_length": 512}
    cfg = GLAConfig(**shape, backend="flash") if kind == "gla" else TransformerConfig(**shape)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    ids = torch.randint(0, 1000, (2, 513), device="cuda")
    results = {}
    for setting in (None, False):  # None: fused on CUDA
        model.set_fused(setting)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results[setting] = (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    (loss_f, grads_f), (loss_u, grads_u) = results[None], results[False]
    assert abs(loss_f - loss_u) <= 2e-3 * loss_u
    for name, g in grads_u.items():
        assert relative_rmse(grads_f[name], g) <= 3e-2, name
