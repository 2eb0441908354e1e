"""Benchmark: nanorlcd's LLaMA vs. transformers' LlamaForCausalLM, same weights, same shapes.

What: tokens/s of the forward pass (no grad, as in sampling/scoring) and of forward + backward of
the LM loss (as in training), for our `LLaMA` and, when transformers is installed, for
`LlamaForCausalLM` with SDPA attention loaded from the checkpoint our model just saved. Timings
alternate between the two models, after one warm-up step each, and the median is reported, so
background load hits both alike. The ratio is ours / transformers (> 1 = we are faster).
Target: ratio >= 1.0.
Default shape: a ~58M-parameter LLaMA (vocab 32000, D 512, 8 layers, 8 heads), batch 4 x 256 tokens,
fp32 CPU; the whole run takes about a minute on 2 cores.
Run: `python -m bench.bench_model` from the repo root
(options: --batch, --seq, --iters, --kv-heads, --device cuda, --dtype bf16)
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from nanorlcd.model import LLaMA, LLaMAConfig


def lm_loss(logits, ids):
    """Next-token cross-entropy: logits (B, T, V) at t predict ids at t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def logits_of(model, ids):
    """(B, T, V) logits: our LLaMA returns them directly, transformers wraps them in an output
    object."""
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits


def step(model, ids, backward):
    """One timed step: forward (no grad), or forward + backward of the LM loss."""
    if backward:
        model.zero_grad(set_to_none=True)
        lm_loss(logits_of(model, ids), ids).backward()
    else:
        with torch.no_grad():
            logits_of(model, ids)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--iters", type=int, default=3,
                   help="timed steps per model and mode (median reported)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (8 = MHA, fewer = GQA)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    # 1. a ~58M-parameter LLaMA with random weights, saved once so both implementations load the
    #    same tensors
    torch.manual_seed(0)
    cfg = LLaMAConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=2048, rms_norm_eps=1e-5)
    tmp = tempfile.TemporaryDirectory()
    LLaMA(cfg).save_pretrained(tmp.name)
    models = {"nanorlcd": LLaMA.from_pretrained(tmp.name, dtype=dtype, device=device)}
    try:
        import transformers
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        models["transformers"] = transformers.LlamaForCausalLM.from_pretrained(
            tmp.name, attn_implementation="sdpa", **{dtype_kw: dtype}).to(device)
    except ImportError:
        print("transformers not installed: timing nanorlcd only")
    n_params = sum(t.numel() for t in models["nanorlcd"].parameters())
    print(f"model: {n_params / 1e6:.1f}M params, batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 2. sanity: the two implementations agree on the logits of the benchmark batch
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if "transformers" in models:
        with torch.no_grad():
            diff = (logits_of(models["nanorlcd"], ids)
                    - logits_of(models["transformers"], ids)).abs().max()
        print(f"max |logits difference| = {diff:.3g}")

    # 3. time each mode: warm-up, then alternate models step by step; tokens/s from the median step
    #    time
    tokens = args.batch * args.seq
    for mode, backward in (("forward", False), ("forward+backward", True)):
        for m in models.values():
            m.train(backward)
            step(m, ids, backward)                                      # warm-up
        times = {name: [] for name in models}
        for _ in range(args.iters):
            for name, m in models.items():
                times[name].append(timed(lambda: step(m, ids, backward), device))
        rate = {name: tokens / statistics.median(t) for name, t in times.items()}
        line = "  ".join(f"{name} {r:,.0f} tok/s" for name, r in rate.items())
        ratio = (f"  ratio {rate['nanorlcd'] / rate['transformers']:.2f}x"
                 if "transformers" in rate else "")
        print(f"{mode:>17}: {line}{ratio}")


if __name__ == "__main__":
    main()
