"""Benchmark of nanorlcd/sample.py: tokens/s of KV-cached generation vs. no-cache recomputation vs.
Hugging Face transformers `generate` (if installed) on the same random weights.

What: a ~58M-parameter LLaMA (vocab 32000, width 512, 8 layers; random init, fp32) generates 64 new
tokens greedily after ragged prompts (16-40 tokens, left-padded) at batch 1 and batch 8. EOS is
disabled everywhere so every method produces exactly batch x 64 tokens. Each timing is the best of
--repeats rounds in which the methods alternate, so background load hits them alike (the naive path
runs once: it is O(T^2)); we print wall-clock and process-CPU throughput (the latter is robust to a
shared machine with --threads 1). Both libraries load the same saved directory, and we report
whether transformers' greedy tokens equal ours (a parity check of model.py + sample.py). "cached,
plain nn.Linear" is the same loop with model.py's `FastLinear` CPU fast path for few-row products
switched off (bench/bench_linear.py times that product alone); at batch 1 (one row) the fast path is
not taken. Target: cached >= 1.5x transformers at batch 8 on CPU.
Run (repo root):
  `python -m bench.bench_sample [--threads N] [--repeats R] [--new-tokens 64] [--skip-naive]`
"""
import argparse
import random
import tempfile
import time

import torch

from nanorlcd.model import FastLinear, LLaMA, LLaMAConfig
from nanorlcd.sample import generate, generate_naive
from nanorlcd.tokenizer import left_pad

CONFIG = LLaMAConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)


def best_times(fns, repeats):
    """Smallest wall time and smallest process CPU time of `repeats` calls of each fn, and each fn's
    last result. The fns alternate within every round, so background load on a shared machine hits
    them alike; the minimum is the least disturbed run (with --threads 1 the CPU time barely depends
    on the load)."""
    times = {name: (float("inf"), float("inf")) for name in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            times[name] = (min(times[name][0], wall), min(times[name][1], cpu))
    return times, outs


def plain_linear_generate_fn(model, prompts, new_tokens, **kw):
    """A closure running our cached `generate` with FastLinear's CPU fast path switched off (every
    projection runs nn.Linear's own forward): the same loop, so the difference to "nanorlcd cached"
    is that fast path."""
    def run():
        fast = FastLinear.forward
        FastLinear.forward = torch.nn.Linear.forward
        try:
            return generate(model, prompts, new_tokens, **kw).tokens
        finally:
            FastLinear.forward = fast
    return run


def hf_generate_fn(hf_model, prompts, new_tokens):
    """A closure running transformers' greedy `generate` on the same left-padded batch; returns new
    tokens."""
    ids, mask = left_pad(prompts, 0)

    def run():
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                    do_sample=False)
        return out[:, ids.shape[1]:].tolist()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timings per method; the best is reported")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--skip-naive", action="store_true",
                        help="skip the slow no-cache recomputation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # random weights, saved once; both libraries load the same directory (same loading path as a
    # real checkpoint)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    LLaMA(CONFIG).save_pretrained(tmp.name)
    model = LLaMA.from_pretrained(tmp.name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params, fp32, CPU, {args.threads} threads, "
          f"torch {torch.__version__}")

    try:
        import transformers
        from transformers import LlamaForCausalLM
        hf_model = LlamaForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()
        # no early stop: exactly new_tokens per row
        hf_model.generation_config.eos_token_id = None
        hf_model.generation_config.pad_token_id = 0
        print(f"transformers {transformers.__version__} "
              f"({hf_model.config._attn_implementation} attention)")
    except ImportError:
        hf_model = None
        print("transformers not installed: skipping its generate")

    rng = random.Random(0)
    for batch in (1, 8):
        # ragged prompts of random ids (BOS first), 16-40 tokens
        prompts = [[1] + [rng.randrange(3, CONFIG.vocab_size) for _ in range(rng.randint(15, 39))]
                   for _ in range(batch)]
        n_tokens = batch * args.new_tokens
        kw = dict(temperature=0, eos_id=[])
        fns = {"nanorlcd cached": lambda: generate(model, prompts, args.new_tokens, **kw).tokens,
               "cached, plain nn.Linear": plain_linear_generate_fn(model, prompts, args.new_tokens,
                                                                  **kw)}
        if hf_model is not None:
            fns["transformers generate"] = hf_generate_fn(hf_model, prompts, args.new_tokens)
        results, outs = best_times(fns, args.repeats)
        cached_s, cached = results["nanorlcd cached"], outs["nanorlcd cached"]
        if not args.skip_naive:       # one run: it is O(T^2)
            naive_s, naive = best_times(
                {"naive": lambda: generate_naive(model, prompts, args.new_tokens, **kw)}, 1)
            results["nanorlcd naive (no cache)"] = naive_s["naive"]
            assert naive["naive"].tokens == cached, "naive and cached greedy tokens differ"
        for other in ("cached, plain nn.Linear", "transformers generate"):
            # float rounding may flip a near-tie, so we count rather than assert
            if other in outs:
                same = sum(a == b for a, b in zip(outs[other], cached))
                print(f"batch {batch}: greedy tokens equal to {other} in {same}/{batch} rows")
        assert all(len(t) == args.new_tokens for t in cached)
        for name, (wall, cpu) in results.items():
            print(f"batch {batch}  {name:26s} wall {n_tokens / wall:7.1f} tok/s "
                  f"({wall:6.2f} s, cached {wall / cached_s[0]:5.2f}x faster)   "
                  f"cpu {n_tokens / cpu:7.1f} tok/s "
                  f"({cpu:6.2f} s, cached {cpu / cached_s[1]:5.2f}x faster)")


if __name__ == "__main__":
    main()
