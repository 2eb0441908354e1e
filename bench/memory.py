"""GPU memory per stage, computed from a LLaMA config: does a run fit before it is launched?

What: GB per GPU (1e9 bytes) for the pipeline's stages (simulate, pm, sft, ppo rollout and ppo
training with four models: policy, value, reference, PM), on 1 GPU and on 8 GPUs with FSDP2
(`dist.wrap(model, "fsdp")`), with and without per-block activation checkpointing (AC), at
LLaMA-7B, LLaMA-30B (simulate only: the paper's 30B simulator) and a ~1B classroom model. Terms:
  - parameters from the config (embedding, per block q/k/v/o, SwiGLU, 2 RMSNorms, final norm, the
    LM or score head);
  - a trained model holds fp32 weights, grads and AdamW m and v: 16 B/param, divided by the GPUs
    under FSDP2; a frozen one (reference, PM) bf16 weights, 2 B/param, also sharded; the simulator
    is a replicated bf16 copy per GPU (decoding needs the whole model anyway);
  - FSDP2 working buffers: two bf16 blocks in flight, the bf16 root group, one block's fp32 grads;
  - activations saved for backward: nanorlcd's Block saves 24D + 8I + 4H + 8 bytes per token in
    bf16 (D hidden, I MLP width, H heads; 40D + 16I + 4H + 8 in fp32), counted with saved-tensor
    hooks; with AC only the bf16 block input (2D bytes) per layer, plus one recomputed block;
  - logits of LM heads (bf16, their fp32 copy and log-softmax: 10 bytes per vocabulary entry/token);
  - the KV cache of a rollout, 2 x layers x kv heads x head_dim x 2 bytes per token, and the
    unsharded bf16 policy that decodes it (`dist.unsharded`).
"1 GPU" is FSDP2 on a 1-rank mesh (as bench/gpu_check.py runs it); a plain process with autocast
instead caches a bf16 copy of each trained model's weights (+2 B/param).
Not counted: the CUDA context (~0.5 GB), allocator fragmentation (10-20 %), the attention matrix of
SDPA's math kernel. `--check` compares every formula with an exact count on CPU (parameters,
optimizer state bytes, KV cache bytes, saved activations with and without AC); peak allocator
memory is only measured on a GPU (bench/gpu_check.py prints it next to this estimate).
Run: `python bench/memory.py` (markdown table), `python bench/memory.py --check`.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanorlcd.dist import checkpoint_blocks  # noqa: E402
from nanorlcd.model import KVCache, LLaMA, LLaMAConfig  # noqa: E402
from nanorlcd.pm import PreferenceModel  # noqa: E402

GB = 1e9
# Shapes: LLaMA-7B and LLaMA-30B (Touvron et al. 2023, as used by the paper), and a 1.1B classroom
# model (TinyLlama's shape: 22 layers, grouped-query attention with 4 kv heads).
MODELS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=2048),
    "llama-30b": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                      num_hidden_layers=60, num_attention_heads=52, num_key_value_heads=52,
                      max_position_embeddings=2048),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     max_position_embeddings=2048),
}
# Work per GPU (rows x tokens): simulation decodes 16 rows of <= 512 tokens; PM micro-batch 4 pairs
# = 8 rows x 512; SFT 4 rows x 512; PPO decodes 32 rows of 192 prompt + 300 reply tokens and trains
# on micro-batches of 2.
WORK = {"simulate": (16, 512), "pm": (8, 512), "sft": (4, 512), "ppo-rollout": (32, 492),
        "ppo-train": (2, 492)}


def config(name_or_fields):
    fields = MODELS[name_or_fields] if isinstance(name_or_fields, str) else name_or_fields
    return LLaMAConfig(**fields)


def block_params(cfg):
    D, I, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = D * cfg.num_attention_heads * d * 2 + D * cfg.num_key_value_heads * d * 2   # q, o; k, v
    return attn + 3 * D * I + 2 * D                                    # SwiGLU, 2 RMSNorm gains


def root_params(cfg, head="lm"):
    """Embedding, final norm and the head: the LM head (absent when tied) or a PM's `score`."""
    D, V = cfg.hidden_size, cfg.vocab_size
    out = D if head == "score" else (0 if cfg.tie_word_embeddings else V * D)
    return V * D + D + out


def param_count(cfg, head="lm"):
    return cfg.num_hidden_layers * block_params(cfg) + root_params(cfg, head)


def act_bytes_per_token_layer(cfg, dtype_bytes=2):
    """Bytes nanorlcd's Block saves for backward per token (see the module docstring, --check)."""
    D, I, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    return 24 * D + 8 * I + 4 * H + 8 if dtype_bytes == 2 else 40 * D + 16 * I + 4 * H + 8


def kv_bytes_per_token(cfg, dtype_bytes=2):
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def train_activations(cfg, tokens, ac, head="lm"):
    """Saved activations of one micro-batch's forward (bf16 compute), plus an LM head's logits."""
    per_layer, L = act_bytes_per_token_layer(cfg), cfg.num_hidden_layers
    # AC: each block keeps its bf16 input; one block at a time is recomputed in full
    layers = L * 2 * cfg.hidden_size + per_layer if ac else L * per_layer
    logits = 10 * cfg.vocab_size if head == "lm" else 0
    return tokens * (layers + logits)


def fsdp_buffers(cfg, head="lm"):
    """bf16 all-gather buffers of two blocks (one computing, one prefetched) and of the root group,
    plus one block's unsharded fp32 gradients before its reduce-scatter."""
    return 2 * 2 * block_params(cfg) + 2 * root_params(cfg, head) + 4 * block_params(cfg)


def stage_bytes(cfg, stage, gpus, ac, work=None):
    """{term: bytes} per GPU for one stage; the sum is the estimated peak. work: (rows, tokens) per
    GPU instead of WORK[stage]."""
    rows, seq = work or WORK[stage]
    P, P_pm = param_count(cfg), param_count(cfg, "score")
    if stage == "simulate":
        return {"weights (bf16, replicated)": 2 * P,
                "KV cache": rows * seq * kv_bytes_per_token(cfg)}
    if stage in ("pm", "sft"):
        head, p = ("score", P_pm) if stage == "pm" else ("lm", P)
        return {"weights+grads+AdamW (fp32)": 16 * p / gpus,
                "FSDP buffers": fsdp_buffers(cfg, head),
                "activations": train_activations(cfg, rows * seq, ac, head)}
    static = {"policy+value (fp32, AdamW)": 16 * (P + P_pm) / gpus,
              "reference+PM (bf16)": 2 * (P + P_pm) / gpus}
    if stage == "ppo-rollout":
        return {**static, "unsharded bf16 policy": 2 * P,
                "KV cache": rows * seq * kv_bytes_per_token(cfg)}
    acts = train_activations(cfg, rows * seq, ac) + train_activations(cfg, rows * seq, ac, "score")
    return {**static, "FSDP buffers": fsdp_buffers(cfg), "activations": acts}


def table(gpu_memory_gb=80):
    """Markdown table: GB per GPU for every model x stage, 1 and 8 GPUs, without and with AC."""
    lines = ["| model (params) | stage | rows x tokens | 1 GPU | 1 GPU, AC | 8 GPUs | 8 GPUs, AC |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in MODELS:
        cfg = config(name)
        stages = ["simulate"] if name == "llama-30b" else list(WORK)
        for stage in stages:
            cells = []
            for gpus in (1, 8):
                for ac in (False, True):
                    gb = sum(stage_bytes(cfg, stage, gpus, ac).values()) / GB
                    cells.append(f"{gb:.1f}" + ("" if gb <= gpu_memory_gb else " ✗"))
            rows, seq = WORK[stage]
            lines.append(f"| {name} ({param_count(cfg) / 1e9:.2f} B) | {stage} | {rows} x {seq} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --check: exact
# counts on CPU

def saved_activation_bytes(model, ids):
    """Bytes of the distinct tensors autograd saves in a forward of model.model (not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(ids)
    return sum(seen.values())


def check():
    """Formula vs exact count at small scale -> (markdown table, whether every row agrees)."""
    torch.manual_seed(0)
    rows = ["| quantity | config | formula | counted | equal |", "| --- | --- | --- | --- | --- |"]
    ok = True

    def add(what, shape, predicted, counted):
        nonlocal ok
        ok &= predicted == counted
        equal = "yes" if predicted == counted else "NO"
        rows.append(f"| {what} | {shape} | {predicted} | {counted} | {equal} |")

    shapes = [dict(vocab_size=100, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
              dict(vocab_size=120, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                   num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
                   tie_word_embeddings=True)]
    for fields in shapes:
        cfg = config(fields)
        tag = (f"D{cfg.hidden_size} I{cfg.intermediate_size} L{cfg.num_hidden_layers} "
               f"H{cfg.num_attention_heads}/{cfg.num_key_value_heads}"
               + (" tied" if cfg.tie_word_embeddings else ""))
        lm = LLaMA(cfg)
        add("parameters, LM", tag, param_count(cfg), sum(p.numel() for p in lm.parameters()))
        add("parameters, PM", tag, param_count(cfg, "score"),
            sum(p.numel() for p in PreferenceModel(cfg).parameters()))
        # weights + grads + AdamW m, v after one step: 16 B/param in fp32 (AdamW's scalar `step` not
        # counted)
        opt = torch.optim.AdamW(lm.parameters())
        lm(torch.randint(0, cfg.vocab_size, (1, 8))).sum().backward()
        opt.step()
        state = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
        params = list(lm.parameters())
        add("fp32 weights+grads+AdamW bytes", tag, 16 * param_count(cfg),
            sum(p.nbytes + p.grad.nbytes for p in params) + state)
        cache = KVCache.empty(cfg, 3, 40, dtype=torch.bfloat16)
        add("bf16 KV cache bytes, 3 x 40", tag, 3 * 40 * kv_bytes_per_token(cfg),
            sum(t.nbytes for t in cache.k + cache.v))
        for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
            # per layer: the difference between L and L-1 layers, so embedding/norm terms cancel
            ids = torch.randint(0, cfg.vocab_size, (2, 24))
            one_layer = config({**fields, "num_hidden_layers": 1})
            full = saved_activation_bytes(LLaMA(cfg).to(dtype), ids)
            fewer = saved_activation_bytes(LLaMA(one_layer).to(dtype), ids)
            per_layer = (full - fewer) // (cfg.num_hidden_layers - 1)
            add(f"saved activations per layer, {dtype}, 2 x 24 tokens", tag,
                48 * act_bytes_per_token_layer(cfg, nbytes), per_layer)
            # with per-block checkpointing only each block's input stays: D values per token and
            # layer
            full = saved_activation_bytes(checkpoint_blocks(LLaMA(cfg).to(dtype)), ids)
            fewer = saved_activation_bytes(checkpoint_blocks(LLaMA(one_layer).to(dtype)), ids)
            add("... with activation checkpointing", tag, 48 * cfg.hidden_size * nbytes,
                (full - fewer) // (cfg.num_hidden_layers - 1))
    return "\n".join(rows), ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare the formulas with exact counts on CPU")
    ap.add_argument("--gpu-memory", type=float, default=80,
                    help="GB per GPU; larger figures are marked ✗")
    args = ap.parse_args(argv)
    if args.check:
        text, ok = check()
        print(text)
        if not ok:
            raise SystemExit("bench/memory.py --check: a formula disagrees with a count")
        return
    print(f"GB per GPU (1e9 bytes); 8 GPUs = FSDP2, every model sharded; "
          f"✗ = over {args.gpu_memory:g} GB")
    print(table(args.gpu_memory))


if __name__ == "__main__":
    main()
