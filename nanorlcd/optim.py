"""The training step that SFT, the preference model and PPO share: schedule, autocast, accumulation,
clipping.

What: one optimiser step = several micro-steps whose gradients add up (accumulation), synchronised
across ranks only on the last one, then a global grad-norm clip and the AdamW step. The learning
rate follows a warmup then a decay, computed from explicit arguments so each stage states its own
schedule: SFT and the PM use AlpacaFarm's warmup + cosine (3 % warmup to 0), PPO a short warmup +
linear decay (Sec. 4 of the paper runs PPO as AlpacaFarm does). bf16 autocast is used on CUDA only;
the CPU trains in fp32.
Simplified: plain torch.optim.AdamW, no fused or foreach switches, no loss scaling (bf16 needs
none).
Run: `python -c "from nanorlcd.optim import lr_at; print([lr_at(s, 10, 1, 2) for s in range(10)])"`
"""
import contextlib
import math

import torch


def lr_at(step, max_steps, lr, warmup_steps=0, decay="cosine", min_lr_ratio=0.0):
    """Learning rate of optimiser step `step` (0-based) of `max_steps`: linear warmup to lr over
    warmup_steps, then `decay` ("cosine", "linear" or "constant") from lr to lr·min_lr_ratio at
    max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if decay == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))                  # 1 -> 0
    elif decay == "linear":
        coeff = 1.0 - progress
    elif decay == "constant":
        coeff = 1.0
    else:
        raise ValueError(f"decay: {decay!r}, expected 'cosine', 'linear' or 'constant'")
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * coeff)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device, bf16):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (the CPU path is fp32, the reference
    numbers)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=bool(bf16) and device.type == "cuda")


def micro_steps(model, n):
    """Yields (i, context) for n micro-steps of one optimiser step; run micro-step i's forward and
    backward inside `with context:`. Under DDP gradients are all-reduced only in the last micro-step
    (`no_sync` skips the others: one all-reduce per optimiser step). Under FSDP2 every micro-step
    reduce-scatters into the sharded gradients instead: skipping it would keep a full fp32 gradient
    per GPU (27 GB at 7B)."""
    for i in range(n):
        # DDP, not the last micro-step
        if hasattr(model, "no_sync") and i < n - 1:
            yield i, model.no_sync()
        else:
            # 1 process, FSDP2, last step
            yield i, contextlib.nullcontext()


def optimizer_step(optimizer, params, max_grad_norm):
    """Clip the global gradient norm (0 or None: no clipping, the norm is still returned), step,
    zero grads."""
    limit = max_grad_norm if max_grad_norm else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
