"""One-GPU check of what the CPU tests cannot show: speed, bf16, peak memory (under 10 minutes).

Prints one markdown table:
  1. copy bandwidth (read + write bytes per second of a large tensor copy): the memory limit below;
  2. bf16 greedy decoding of a randomly initialised LLaMA-7B-shaped model with the KV cache at
     batch 1 and 32: tokens/s and the % of the bandwidth limit (each step must read every weight
     and the cached keys/values);
  3. forward + backward + AdamW of a ~1B model (TinyLlama's shape) under `dist.shard_model` with
     bf16 mixed precision, without and with activation checkpointing: tokens/s, MFU (model FLOPs
     6 x params x tokens plus causal attention, over the GPU's dense bf16 peak) and peak memory
     next to bench/memory.py's estimate;
  4. one PPO-style step of a small model with all four models sharded (`shard_model` on a 1-rank
     mesh): a rollout under `dist.unsharded`, PM and reference scoring, a clipped policy + value
     update; its peak memory.
Simplified: random weights (speed and memory do not depend on them), no tokenizer, one process.
Run: `python bench/gpu_check.py` on a GPU; `python bench/gpu_check.py --tiny` runs the same code on
tiny shapes on the CPU in seconds (tests/test_dist.py does, so the script keeps working).
`--peak-tflops` sets the bf16 peak for MFU when the GPU's name is not in PEAK_TFLOPS.
"""
import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.memory import MODELS, param_count, stage_bytes  # noqa: E402
from nanorlcd import dist  # noqa: E402
from nanorlcd.model import LLaMA, LLaMAConfig  # noqa: E402
from nanorlcd.pm import PreferenceModel  # noqa: E402
from nanorlcd.sample import generate  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first key
# contained in the device name wins, so longer names come first.
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121,
               "RTX 4090": 165}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1, warmup=True):
    """Seconds per call of fn(), after one warm-up call (kernels, caches, allocator)."""
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    """Peak GB allocated by torch on the GPU since reset_peak; None on the CPU (not measured)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def random_model(cls, fields, device, dtype):
    """A model of random weights built directly on `device` in `dtype` (no fp32 7B copy first)."""
    with torch.device("meta"):
        model = cls(LLaMAConfig(**fields)).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / seconds                                    # bytes read + written per second


def decode(fields, device, batch, prompt_len, new_tokens, bandwidth):
    """bf16 cached greedy decoding: (tokens/s, % of the bandwidth limit, peak GB)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(LLaMA, fields, device, dtype).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
               for _ in range(batch)]
    reset_peak(device)
    warm = device.type == "cuda"
    run = lambda n: generate(model, prompts, n, temperature=0, eos_id=[])   # noqa: E731
    prefill = timed(lambda: run(1), device, warmup=warm)
    total = timed(lambda: run(new_tokens), device, warmup=warm)
    per_step = (total - prefill) / (new_tokens - 1)
    # bytes one decoding step must read: every weight, and the keys/values cached so far (mean
    # length)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    kv = kv_per_token * batch * (prompt_len + new_tokens / 2)
    limit = (weights + kv) / bandwidth                   # seconds per step at full bandwidth
    peak = peak_gb(device)
    del model
    return batch / per_step, 100 * limit / per_step, peak


def flops_per_token(cfg):
    """Training FLOPs per token: 6 x (non-embedding params + LM head) for the matmuls, plus causal
    attention (QK^T and AV, forward and backward: 6 x layers x hidden x seq, halved by the causal
    mask)."""
    matmul = param_count(cfg) - cfg.vocab_size * cfg.hidden_size
    return lambda seq: 6 * matmul + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq


def train_step(fields, device, rows, seq, ac, peak_tflops):
    """fwd + bwd + AdamW under shard_model (bf16 on CUDA) -> (tokens/s, MFU %, peak GB,
    predicted GB)."""
    cfg = LLaMAConfig(**fields)
    model = random_model(LLaMA, fields, device, torch.float32).train()
    dist.shard_model(model, mixed_precision="bf16" if device.type == "cuda" else None,
                     activation_checkpointing=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, cfg.vocab_size, (rows, seq + 1), device=device)

    def step():
        logits = model(ids[:, :-1])                                                   # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    gpu = device.type == "cuda"
    seconds = timed(step, device, repeats=3 if gpu else 1, warmup=gpu)
    tokens = rows * seq
    mfu = None
    if peak_tflops:
        mfu = 100 * flops_per_token(cfg)(seq) * tokens / seconds / (peak_tflops * 1e12)
    predicted = sum(stage_bytes(cfg, "sft", 1, ac, work=(rows, seq)).values()) / 1e9
    peak = peak_gb(device)
    del model, opt
    return tokens / seconds, mfu, peak, predicted


def ppo_step(fields, device, rows, prompt_len, new_tokens):
    """One PPO-style step with policy, value, reference and PM all sharded: (seconds, peak GB)."""
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = dist.shard_model(random_model(LLaMA, fields, device, torch.float32).train(),
                              mixed_precision="bf16" if device.type == "cuda" else None)
    value = dist.shard_model(random_model(PreferenceModel, fields, device, torch.float32).train(),
                             mixed_precision="bf16" if device.type == "cuda" else None)
    ref = dist.shard_model(random_model(LLaMA, fields, device, bf16).eval())    # frozen: bf16
    pm = dist.shard_model(random_model(PreferenceModel, fields, device, bf16).eval())
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, fields["vocab_size"], (prompt_len,), generator=gen).tolist()
               for _ in range(rows)]

    def step():
        policy.eval()
        with torch.no_grad(), dist.unsharded(policy):        # one all-gather for the whole rollout
            out = generate(policy, prompts, new_tokens, temperature=1.0, eos_id=[])
        prompt_ids = torch.tensor(prompts, device=device)                          # (B, P)
        ids = torch.cat([prompt_ids, out.response_ids], dim=1)                    # (B, P + R)
        with torch.no_grad():
            score = pm(ids)                                                                 # (B,)
            ref_logp = torch.log_softmax(ref(ids)[:, prompt_len - 1:-1].float(), -1)
            ref_logp = ref_logp.gather(-1, out.response_ids[..., None])[..., 0]             # (B, R)
        policy.train()
        logp = torch.log_softmax(policy(ids)[:, prompt_len - 1:-1].float(), -1)
        logp = logp.gather(-1, out.response_ids[..., None])[..., 0]                         # (B, R)
        advantage = (score[:, None] - 0.1 * (out.logprobs - ref_logp)).detach()
        ratio = torch.exp(logp - out.logprobs)
        loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage).mean()
        loss = loss + 0.1 * (value(ids) - score).pow(2).mean()    # a stand-in value target: score
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    seconds = timed(step, device, warmup=device.type == "cuda")
    peak = peak_gb(device)
    del policy, value, ref, pm, opt
    return seconds, peak


def init_single_process():
    """A 1-rank process group, so shard_model runs FSDP2 exactly as under torchrun."""
    if torch_dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                  init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run in seconds)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif not args.tiny:
        raise SystemExit("bench/gpu_check.py: no CUDA device; --tiny runs the CPU smoke test")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    init_single_process()
    # (decode model, prompt and new tokens), (train model, rows x tokens), (PPO model, rows, P, R)
    if args.tiny:
        decode_shape, train_shape, ppo_shape = (TINY, 8, 8), (TINY, 2, 16), (TINY, 4, 8, 8)
    else:
        small = {**MODELS["llama-1b"], "num_hidden_layers": 4}
        decode_shape, train_shape = (MODELS["llama-7b"], 128, 64), (MODELS["llama-1b"], 4, 512)
        ppo_shape = (small, 16, 64, 64)
    rows = []
    bandwidth = copy_bandwidth(device, 2**24 if args.tiny else 2**31)
    rows.append(("copy bandwidth", "", f"{bandwidth / 1e9:.0f} GB/s", "", ""))
    dtype = "bf16" if device.type == "cuda" else "fp32"
    for batch in (1, 32):
        fields, prompt_len, new_tokens = decode_shape
        tps, pct, mem = decode(fields, device, batch, prompt_len, new_tokens, bandwidth)
        rows.append((f"decode {dtype}, batch {batch}", "tiny" if args.tiny else "7B shape",
                     f"{tps:.0f} tok/s", f"{pct:.0f} % of bandwidth limit", fmt(mem, ".1f")))
    for ac in (False, True):
        fields, r, t = train_shape
        tps, mfu, mem, pred = train_step(fields, device, r, t, ac, peak)
        rows.append((f"fwd+bwd+AdamW {'with' if ac else 'no'} AC", f"{r} x {t} tokens",
                     f"{tps:.0f} tok/s", "MFU n/a" if mfu is None else f"MFU {mfu:.0f} %",
                     f"{fmt(mem, '.1f')} (predicted {pred:.2f})"))
    seconds, mem = ppo_step(*ppo_shape[:1], device, *ppo_shape[1:])
    rows.append(("PPO step, 4 sharded models", "tiny" if args.tiny else "1B shape, 4 layers",
                 f"{seconds:.2f} s", "", fmt(mem, ".1f")))
    print(f"device: {name}; bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}")
    print("| check | shape | speed | efficiency | peak GB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
