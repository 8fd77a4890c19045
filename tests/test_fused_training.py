"""The fused path trains the same model (chapter 9): a seeded 100-step run on Tiny Shakespeare with the
flash backend, fused pieces on (glalearn.fused: norms, gate, norm + output gate, SwiGLU, chunked loss)
and off, float32 in Triton's interpreter on the CPU. The two losses agree within 1e-3 after 100 steps.

The model is as small as the kernels allow (one layer, one head, 2 x 32 tokens a step): in the
interpreter each kernel launch costs milliseconds whatever its size, about 0.9 s per step of both runs.
The learning rate is gentle on purpose: at 3e-3 this tiny model trains at the edge of stability, where
float32 rounding differences of 1e-7 (any reordering of a sum) grow to 1e-2 within 40 steps, fused or not.
"""

import pytest
import torch

from glalearn.data import sample_batch, shakespeare_splits
from glalearn.model import GLAConfig, build_model

STEPS = 100


def _run(fused_setting: bool):
    torch.manual_seed(0)
    cfg = GLAConfig(vocab_size=65, d_model=32, n_layers=1, num_heads=1, context_length=32, backend="flash",
                    chunk_size=16)
    model = build_model(cfg).set_fused(fused_setting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_ids, val_ids = shakespeare_splits()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = sample_batch(train_ids, 2, 32, gen)
        loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        x, y = sample_batch(val_ids, 8, 32, torch.Generator().manual_seed(2))
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
