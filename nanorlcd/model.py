"""LLaMA (1/2/3) from scratch: the base model, policy and reference of RLCD, and the backbone of
its preference and value models (the paper starts all of them from LLaMA-7B; RLCD sec. 4).

What: Touvron et al. 2023 (LLaMA, sec. 2.2): pre-norm blocks with RMSNorm, rotary embeddings
(RoPE, with LLaMA-3's frequency scaling), grouped-query attention through SDPA, a SwiGLU MLP, a
final norm and an LM head (tied or not). Submodules carry Hugging Face's names, so an HF checkpoint
loads strictly with no name mapping (checkpoint.py reads and writes the files); RoPE uses HF's
rotate-half layout. Batches are LEFT-padded and positions come from the attention mask, so a
padded row gets the logits of the row alone. A `KVCache` passed to `forward` follows Meta's
`start_pos` semantics; `keep` picks the positions that get logits (sampling: the last one; PPO:
the reply). Simplified: no dropout (LLaMA has none), no tensor parallelism, RoPE default/llama3.
Run: `LLaMA.from_pretrained("path/to/llama-hf", dtype=torch.bfloat16)(ids, mask, keep=1)`.
"""
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# checkpoint I/O lives in checkpoint.py; these names stay importable from here (pm.py uses them)
from nanorlcd.checkpoint import load_weights, read_config_json, save_weights  # noqa: F401


@dataclass
class LLaMAConfig:
    vocab_size: int = 32000                 # tokenizer size; rows of embed_tokens / lm_head
    hidden_size: int = 4096                 # model width D
    intermediate_size: int = 11008          # SwiGLU hidden width (about 8/3 D, rounded)
    num_hidden_layers: int = 32             # number of transformer blocks
    num_attention_heads: int = 32           # query heads
    num_key_value_heads: int = None         # key/value heads (GQA); None = as many as query heads
    head_dim: int = None                    # per-head width; None = hidden_size / query heads
    max_position_embeddings: int = 2048     # context length the model was trained for
    rms_norm_eps: float = 1e-6              # RMSNorm epsilon (1e-6 LLaMA-1, 1e-5 LLaMA-2/3)
    rope_theta: float = 10000.0             # RoPE base (500000 for LLaMA-3)
    rope_scaling: dict = None               # None, or {"rope_type": "llama3", "factor", ...}
    tie_word_embeddings: bool = False       # lm_head shares embed_tokens' weight (LLaMA-3.2 1B/3B)
    attention_bias: bool = False            # bias on q/k/v/o projections (False on every LLaMA)
    mlp_bias: bool = False                  # bias on the MLP projections (False on every LLaMA)
    initializer_range: float = 0.02         # std of the normal init for fresh weights
    bos_token_id: int = 1                   # <s>
    eos_token_id: object = 2                # </s>; an int or a list of ints (LLaMA-3 instruct)
    pad_token_id: int = None                # often absent on LLaMA checkpoints

    def __post_init__(self):
        """Checks every field, so a bad config fails here (naming it), not at the first forward."""
        def bad(name, value, expected):
            raise ValueError(f"config field '{name}' is {value!r}, expected {expected}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        optional = ("num_key_value_heads", "head_dim")           # None: derived below
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings") + optional:
            v = getattr(self, name)
            if not (is_int(v) and v > 0 or v is None and name in optional):
                bad(name, v, "a positive integer")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", self.num_key_value_heads,
                f"a divisor of num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                bad("hidden_size", self.hidden_size, f"a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            bad("head_dim", self.head_dim, "an even number (RoPE rotates pairs of dimensions)")
        for name in ("rms_norm_eps", "rope_theta"):
            if not (is_num(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, getattr(self, name), "a positive number")
        if not (is_num(self.initializer_range) and self.initializer_range >= 0):
            bad("initializer_range", self.initializer_range, "a number >= 0")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "true or false")
        for name in ("bos_token_id", "pad_token_id"):
            if not (getattr(self, name) is None or is_int(getattr(self, name))):
                bad(name, getattr(self, name), "an integer or null")
        eos = self.eos_token_id
        if not (eos is None or is_int(eos) or isinstance(eos, list) and eos
                and all(map(is_int, eos))):
            bad("eos_token_id", eos, "an integer or a list of integers")
        rs = self.rope_scaling
        if rs is not None and not isinstance(rs, dict):
            bad("rope_scaling", rs, "null or an object")
        rope_type = (rs or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            bad("rope_type", rope_type, "'default' or 'llama3' (other types are not supported)")
        if rope_type == "llama3":
            # rope_inv_freq's defaults for the optional three are Meta's LLaMA-3.1 values
            rs = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, **rs}
            for key in ("factor", "low_freq_factor", "high_freq_factor"):
                if not (is_num(rs.get(key)) and rs[key] > 0):
                    bad(f"rope_scaling.{key}", rs.get(key), "a positive number (llama3 RoPE)")
            if rs["high_freq_factor"] <= rs["low_freq_factor"]:
                bad("rope_scaling.high_freq_factor", rs["high_freq_factor"],
                    f"more than low_freq_factor ({rs['low_freq_factor']})")
            if not (is_int(rs["original_max_position_embeddings"])
                    and rs["original_max_position_embeddings"] > 0):
                bad("rope_scaling.original_max_position_embeddings",
                    rs["original_max_position_embeddings"], "a positive integer")

    @classmethod
    def from_hf_dict(cls, d, source="config.json"):
        """Reads an HF config dict, in both the transformers 4.x and 5.x spellings of the RoPE
        settings; every error is one line starting with `source`."""
        arch = d.get("architectures") or []
        arch = [arch] if isinstance(arch, str) else arch
        if d.get("model_type", "llama") != "llama" or any(not str(a).startswith("Llama")
                                                          for a in arch):
            raise ValueError(f"{source}: model_type '{d.get('model_type')}' / architectures "
                             f"{arch} is not LLaMA (expected model_type 'llama')")
        kwargs = {f.name: d[f.name] for f in fields(cls)
                  if f.name in d and f.name != "rope_scaling"}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            if name not in d:
                raise ValueError(f"{source}: missing required field '{name}'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: config field 'hidden_act' is {d['hidden_act']!r}, "
                             "expected 'silu' (LLaMA's SwiGLU)")
        # transformers 4.x: rope_theta + rope_scaling{"type"|"rope_type", ...};
        # 5.x: rope_parameters{rope_type, rope_theta, ...}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: config field 'rope_scaling' is {rope!r}, expected an "
                             "object")
        rope = dict(rope)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        if "rope_type" not in rope and rope:
            raise ValueError(f"{source}: rope settings {rope} have no rope_type")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self):
        """The HF `config.json` dict (transformers 4.x spelling, which 5.x also reads)."""
        d = asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 torch_dtype="float32")
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d


def load_config(path):
    """LLaMAConfig from `path/config.json`."""
    source = os.path.join(path, "config.json")
    return LLaMAConfig.from_hf_dict(read_config_json(path), source=source)


# ----------------------------------------------------------------------------- building blocks

class FastLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) with a CPU fast path for decoding. A
    decoding step feeds one token per sequence, so each projection multiplies a few rows x (N,
    in) by a large weight W (out, in). CPU BLAS splits that skinny product poorly across threads;
    the same product as (W @ x^T)^T, whose long side is the GEMM's M, is faster for fp32 weights
    of >= 2^18 elements and N = 2-64 (`python -m bench.bench_linear` measures where). Only the
    float summation order differs. GPUs and other dtypes take nn.Linear's kernel."""

    def forward(self, x):
        n = x.numel() // x.shape[-1]                                  # rows: batch x new tokens
        if (x.device.type != "cpu" or x.dtype != torch.float32 or not 2 <= n <= 64
                or self.weight.numel() < 2**18):
            return super().forward(x)
        y = (self.weight @ x.reshape(n, -1).T).T.contiguous()        # (out, n) -> (n, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)                               # (..., out)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), normalised in fp32 like HF."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg, device=None):
    """theta^(-2i/d) for i < d/2, with the LLaMA-3 rescaling of long wavelengths when configured."""
    d = cfg.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=device) / d
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)                                  # (d/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # LLaMA-3.1: wavelengths longer than old_ctx / low_freq_factor are slowed by `factor`, those
    # shorter than old_ctx / high_freq_factor are kept, and the band between is interpolated.
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    # 0 = long wavelength (scaled), 1 = short (kept)
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the halves of the last dim: HF's layout of the RoPE rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(q, k, cos, sin):
    """Rotates each (i, i + d/2) pair of q and k by angle pos * theta_i (RoFormer eq. 34,
    rotate-half layout), in the dtype of q and k (under autocast: bf16, as the cache then
    stores). q: (B, H, T, d), k: (B, Hkv, T, d), cos/sin: (B, 1, T, d)."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x, n_rep):
    """(B, Hkv, S, d) -> (B, Hkv * n_rep, S, d): each kv head serves n_rep query heads (GQA, Ainslie
    et al. 2023). Equal to torch.repeat_interleave(x, n_rep, dim=1), without a copy when n_rep =
    1."""
    if n_rep == 1:
        return x
    B, H, S, d = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, d).reshape(B, H * n_rep, S, d)


@dataclass
class KVCache:
    """Keys/values of every layer: k[i], v[i] are (B, Hkv, max_len, head_dim). `forward` writes the
    new chunk at [start_pos, start_pos + T) and attends over [0, start_pos + T) (Meta's
    start_pos). Built with dtype=None (the default), a layer's buffers are allocated at its first
    write in the dtype and device of its keys, i.e. the compute dtype (bf16 weights, autocast or
    FSDP2 mixed precision alike); with an explicit dtype they are preallocated."""
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    shape: tuple = None                    # (B, Hkv, max_len, head_dim)

    @classmethod
    def empty(cls, cfg, batch_size, max_len, dtype=None, device=None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        if dtype is None:
            return cls([None] * n, [None] * n, shape)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)], shape)

    def update(self, layer, k, v, start_pos):
        """Writes k, v (B, Hkv, T, d) at [start_pos, start_pos + T) of `layer`; returns that layer's
        keys and values over [0, start_pos + T), in the dtype of k."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        end = start_pos + k.shape[2]
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        D, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = FastLinear(D, self.n_heads * self.head_dim, bias=b)
        self.k_proj = FastLinear(D, self.n_kv_heads * self.head_dim, bias=b)
        self.v_proj = FastLinear(D, self.n_kv_heads * self.head_dim, bias=b)
        self.o_proj = FastLinear(self.n_heads * self.head_dim, D, bias=b)

    def forward(self, x, cos, sin, attn_mask, cache=None, start_pos=0):
        B, T, _ = x.shape
        # project and split heads: (B, T, H*d) -> (B, H, T, d)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, k, cos, sin)
        if cache is not None:
            # store this chunk, then attend over all that is cached: (B, Hkv, start_pos + T, d)
            k, v = cache.update(self.layer_idx, k, v, start_pos)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                          # (B, H, S, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=attn_mask is None)          # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = FastLinear(D, H, bias=b)
        self.up_proj = FastLinear(D, H, bias=b)
        self.down_proj = FastLinear(H, D, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The backbone (HF `LlamaModel`): embeddings, blocks, final norm -> hidden states (B, T, D).
    Shared by the LM (`LLaMA`) and the preference/value models (pm.py)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, cache=None, start_pos=0):
        B, T = input_ids.shape
        S = start_pos + T                                              # keys visible to this chunk
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask: expected shape {(B, S)} (cache + new tokens), got "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask.bool()                                   # (B, S)
        # 1. position ids from the mask, so left pads do not shift positions: (B, T)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]
        # 2. RoPE angles pos * theta_i, in fp32, duplicated for the rotate-half halves: (B, 1, T, d)
        angles = pos[:, :, None].float() * rope_inv_freq(self.config, device)[None, None, :]
        emb = torch.cat((angles, angles), dim=-1)[:, None]
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # 3. boolean mask (B, 1, T, S): query t (absolute index start_pos + t) sees real keys
        # j <= start_pos + t. Each query also sees itself, so a pad query row is never fully masked
        # (which gives NaN in SDPA); outputs at pad positions are garbage that callers mask out.
        q_idx = torch.arange(start_pos, S, device=device)[:, None]              # (T, 1)
        k_idx = torch.arange(S, device=device)[None, :]                         # (1, S)
        attn_mask = ((k_idx <= q_idx) & real[:, None, :]) | (k_idx == q_idx)    # (B, T, S)
        attn_mask = attn_mask[:, None]                                          # (B, 1, T, S)
        if cache is None and bool(real.all()):
            attn_mask = None       # no pads, no cache: SDPA's causal kernel does the same, faster
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, start_pos)
        return self.norm(x)


class LLaMA(nn.Module):
    """Causal LM (HF `LlamaForCausalLM`): backbone + LM head; `model(ids, mask)` -> logits."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = FastLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:   # from_pretrained builds on meta: no init needed
            self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, input_ids, attention_mask=None, cache=None, start_pos=0, keep=None):
        """(B, T) ids -> logits (B, K, vocab) of the positions `keep` selects: None = all T, an int
        k >= 1 = the last k, a slice = those positions (PPO: the reply's). The LM head, the largest
        product at decoding, only sees the kept positions."""
        h = self.model(input_ids, attention_mask, cache, start_pos)              # (B, T, D)
        if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
            h = h[:, -keep:]
        elif isinstance(keep, slice):
            h = h[:, keep]
        elif keep is not None:
            raise ValueError(f"keep: got {keep!r}, expected None, an int >= 1 or a slice")
        return self.lm_head(h)                                                   # (B, K, vocab)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Loads an HF LLaMA directory with weights cast to `dtype` (bf16 halves the memory of
        frozen and sampling-only models), built on the meta device so the weights exist once."""
        cfg = load_config(path)
        with torch.device("meta"):
            model = cls(cfg)
        load_weights(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path, max_shard_size=5 * 2**30):
        """config.json + safetensors in the HF layout; atomic (checkpoint.save_weights)."""
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        save_weights(self, path, config, max_shard_size=max_shard_size)


def init_weights(module, std):
    """Normal(0, std) for linear and embedding weights, zeros for biases (HF's LLaMA init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
