"""Benchmark of KV-cached decoding (nanorlcd/sample.py) against the machine's memory-bandwidth limit
and, when installed, Hugging Face transformers `generate`.

What: at batch 1 and batch 8, greedy decoding of --new-tokens tokens after 32-token prompts (EOS
off, so every row gets them all) on two random-weight LLaMAs: "58.5M" (bench/bench_sample.py's
model: vocab 32000, width 512, 8 layers) and "smollm2-135m" (SmolLM2-135M's shape: 30 layers, width
576, 9 query / 3 key-value heads, MLP 1536, vocab 49152, tied embeddings). A decoding step at batch
B must read every weight once (the embedding table only through the LM head when tied) plus each
row's cached keys and values, so tokens/s can be at most B x copy bandwidth / bytes read per step;
we measure the bandwidth with a large tensor copy (read + write) and print the fraction of that
limit reached (in wall and in CPU time). Timings are the best of --repeats rounds with the methods
alternating; process CPU time is printed too (with --threads 1 it barely depends on other load on
the machine).
Run (repo root): `python -m bench.bench_decode [--threads N] [--repeats 3] [--new-tokens 64]
[--models 58.5M,smollm2-135m]`
"""
import argparse
import time

import torch

from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.sample import generate

MODELS = {
    "58.5M": LLaMAConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=512),
    "smollm2-135m": LLaMAConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, tie_word_embeddings=True,
                                max_position_embeddings=2048, rope_theta=100000.0),
}
PROMPT_LEN = 32


def copy_bandwidth(n_bytes=256 * 2**20, repeats=5):
    """Bytes per second (wall, process CPU) moved by the best of `repeats` copies of an n_bytes fp32
    tensor (each copy reads n_bytes and writes n_bytes)."""
    src = torch.randn(n_bytes // 4)
    dst = torch.empty_like(src)
    best = best_times({"copy": lambda: dst.copy_(src)}, repeats)["copy"]
    return tuple(2 * n_bytes / t for t in best)


def bytes_per_step(model, batch, context):
    """Bytes one decoding step reads: every weight once (an untied embedding table only for the B
    looked-up rows, ignored here) plus the keys and values of `context` cached positions per row."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:
        table = model.model.embed_tokens.weight
        weights -= table.numel() * table.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * 4 * batch
    return weights + kv


def best_times(fns, repeats):
    """Smallest wall and process-CPU seconds of each fn over `repeats` alternating rounds."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def hf_model_of(model):
    """transformers' LlamaForCausalLM with the same weights, or None if transformers is absent."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_dict())).eval()
    hf.load_state_dict(model.state_dict(), strict=False)    # a tied lm_head is absent from ours
    hf.generation_config.eos_token_id = None                 # no early stop
    hf.generation_config.pad_token_id = 0
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth, cpu_bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s wall, {cpu_bandwidth / 1e9:.1f} GB/s per CPU second")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = LLaMA(MODELS[name]).eval()
        hf = hf_model_of(model)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e6:.1f}M params")
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, model.config.vocab_size, (batch, PROMPT_LEN), generator=g)
            fns = {"nanorlcd": lambda: generate(model, prompts.tolist(), args.new_tokens,
                                                temperature=0, eos_id=[])}
            if hf is not None:
                fns["transformers"] = lambda: hf.generate(
                    input_ids=prompts, attention_mask=torch.ones_like(prompts),
                    max_new_tokens=args.new_tokens, do_sample=False)
            with torch.no_grad():
                best = best_times(fns, args.repeats)
            # average context over the decoding steps: prompt + half the new tokens
            step_bytes = bytes_per_step(model, batch, PROMPT_LEN + args.new_tokens / 2)
            # tokens/s at full bandwidth, per wall second and per CPU second
            limit, cpu_limit = (batch * bw / step_bytes for bw in (bandwidth, cpu_bandwidth))
            n_tokens = batch * args.new_tokens
            for method, (wall, cpu) in best.items():
                ratio = "" if method == "nanorlcd" else (
                    f", nanorlcd {wall / best['nanorlcd'][0]:.2f}x faster (cpu "
                    f"{cpu / best['nanorlcd'][1]:.2f}x)")
                print(f"  batch {batch} {method:12s} {n_tokens / wall:8.1f} tok/s wall "
                      f"({100 * n_tokens / wall / limit:3.0f} % of the {limit:.0f} tok/s "
                      f"bandwidth limit), {n_tokens / cpu:8.1f} tok/s cpu "
                      f"({100 * n_tokens / cpu / cpu_limit:3.0f} % of {cpu_limit:.0f}){ratio}")


if __name__ == "__main__":
    main()
