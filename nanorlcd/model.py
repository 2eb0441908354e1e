"""LLaMA (1/2/3) from scratch, loading and saving real Hugging Face checkpoints.

What: the decoder-only transformer of Touvron et al. 2023 ("LLaMA", sec. 2.2): pre-norm blocks with RMSNorm,
rotary position embeddings (RoPE, incl. the LLaMA-3 frequency scaling), grouped-query attention (GQA) through
`F.scaled_dot_product_attention`, a SwiGLU MLP, a final norm and an LM head (tied or not).
Conventions:
  - Submodules are named exactly like the Hugging Face checkpoint (`model.embed_tokens`, `model.layers.{i}.
    self_attn.q_proj`, ..., `lm_head`) so a checkpoint loads with a strict, mapping-free state dict.
  - RoPE uses the "rotate-half" layout that HF checkpoints are stored in (their q_proj/k_proj rows were permuted
    from Meta's interleaved complex layout at conversion time), so no permutation is needed here.
  - Batches are LEFT-padded; position ids come from the attention mask (cumsum - 1), so a padded row gives the
    same logits as the row alone.
  - A KV cache is an object passed into `forward` with Meta's `start_pos` semantics (sample.py uses it).
  - Projections are `Linear`: nn.Linear plus a CPU fast path for the few-row products of decoding.
Simplified: no dropout (LLaMA has none), no tensor parallelism, no attention bias other than HF's flag.
Run: `python -c "from nanorlcd.model import LLaMA; m = LLaMA.from_pretrained('path/to/llama-hf')"`.
"""
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# checkpoint I/O lives in checkpoint.py; these names stay importable from here (pm.py, older callers)
from nanorlcd.checkpoint import load_weights, read_config_json, save_weights  # noqa: F401


@dataclass
class LLaMAConfig:
    vocab_size: int = 32000                 # tokenizer size; rows of embed_tokens / lm_head
    hidden_size: int = 4096                 # model width D
    intermediate_size: int = 11008          # SwiGLU hidden width (about 8/3 D, rounded)
    num_hidden_layers: int = 32             # number of transformer blocks
    num_attention_heads: int = 32           # query heads
    num_key_value_heads: int = None         # key/value heads (GQA); None = num_attention_heads (MHA)
    head_dim: int = None                    # per-head width; None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048     # context length the model was trained for
    rms_norm_eps: float = 1e-6              # RMSNorm epsilon (1e-6 LLaMA-1, 1e-5 LLaMA-2/3)
    rope_theta: float = 10000.0             # RoPE base (500000 for LLaMA-3)
    rope_scaling: dict = None               # None, or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False       # lm_head shares embed_tokens' weight (small LLaMA-3.2 models)
    attention_bias: bool = False            # bias on q/k/v/o projections (False on every LLaMA)
    mlp_bias: bool = False                  # bias on the MLP projections (False on every LLaMA)
    initializer_range: float = 0.02         # std of the normal init for fresh weights
    bos_token_id: int = 1                   # <s>
    eos_token_id: object = 2                # </s>; an int or a list of ints (LLaMA-3 instruct)
    pad_token_id: int = None                # often absent on LLaMA checkpoints

    def __post_init__(self):
        """Checks every field, so a bad config fails here naming the field, not at the first forward."""
        def bad(name, value, expected):
            raise ValueError(f"config field '{name}' is {value!r}, expected {expected}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not (is_int(v) and v > 0 or v is None and name in ("num_key_value_heads", "head_dim")):
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
        if not (eos is None or is_int(eos) or isinstance(eos, list) and eos and all(map(is_int, eos))):
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
        """Reads an HF config dict, in both the transformers 4.x and 5.x spellings of the RoPE settings."""
        arch = d.get("architectures") or []
        arch = [arch] if isinstance(arch, str) else arch
        if d.get("model_type", "llama") != "llama" or any(not str(a).startswith("Llama") for a in arch):
            raise ValueError(f"{source}: model_type '{d.get('model_type')}' / architectures {arch} is not LLaMA "
                             "(expected model_type 'llama')")
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("rope_scaling",)}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ValueError(f"{source}: missing required field '{name}'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: config field 'hidden_act' is {d['hidden_act']!r}, expected "
                             "'silu' (LLaMA's SwiGLU)")
        # transformers 4.x: rope_theta + rope_scaling{"type"|"rope_type", ...};
        # 5.x: rope_parameters{rope_type, rope_theta, ...}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: config field 'rope_scaling' is {rope!r}, expected an object")
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
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype="float32")
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d


def load_config(path):
    """LLaMAConfig from `path/config.json`."""
    return LLaMAConfig.from_hf_dict(read_config_json(path), source=os.path.join(path, "config.json"))


# ----------------------------------------------------------------------------- building blocks

class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) with a CPU fast path for decoding.
    A decoding step feeds one token per sequence, so each projection multiplies only a few rows x (N, in) by a
    large weight W (out, in). CPU BLAS splits that skinny product x @ W^T poorly across threads; the same product
    computed as (W @ x^T)^T, whose long side (out) is the GEMM's M, measured up to 3.8x faster on 2 threads
    (about 2-3x for a 32000-row LM head at N = 2-8) for fp32 weights of >= 2^18 elements and N = 2-64; it is
    about even for one row or > 64 rows and mixed (0.7-2.4x) for small weights, such as all of the toy world's
    (`python -m bench.bench_linear` prints the table). Same product; only the float summation order differs.
    GPUs and other dtypes take nn.Linear's kernel."""

    def forward(self, x):
        n = x.numel() // x.shape[-1]                                           # rows: batch x new tokens
        if x.device.type != "cpu" or x.dtype != torch.float32 or not 2 <= n <= 64 or self.weight.numel() < 2**18:
            return super().forward(x)
        y = (self.weight @ x.reshape(n, -1).T).T.contiguous()                 # (out, n) -> (n, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)                                        # (..., out)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32 like the reference."""

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
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))  # (d/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # LLaMA-3.1: wavelengths longer than old_ctx / low_freq_factor are slowed by `factor`, shorter than
    # old_ctx / high_freq_factor are kept, and the band between is interpolated smoothly.
    factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0 = long (scaled), 1 = short (kept)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim: the HF layout of the RoPE rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(q, k, cos, sin):
    """Rotates each (i, i + d/2) pair of q and k by angle pos * theta_i (RoFormer eq. 34, rotate-half layout).
    q: (B, H, T, d), k: (B, Hkv, T, d), cos/sin: (B, 1, T, d)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x, n_rep):
    """(B, Hkv, S, d) -> (B, Hkv * n_rep, S, d): each kv head serves n_rep query heads (GQA, Ainslie et al. 2023).
    Equal to torch.repeat_interleave(x, n_rep, dim=1), written as expand + reshape to avoid a copy when n_rep=1."""
    if n_rep == 1:
        return x
    B, H, S, d = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, d).reshape(B, H * n_rep, S, d)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: k[i], v[i] are (B, Hkv, max_len, head_dim). `forward` writes the
    new chunk at [start_pos, start_pos + T) and attends over [0, start_pos + T) (Meta's start_pos semantics)."""
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    @classmethod
    def empty(cls, cfg, batch_size, max_len, dtype=torch.float32, device="cpu"):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(D, self.n_heads * self.head_dim, bias=b)
        self.k_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=b)
        self.v_proj = Linear(D, self.n_kv_heads * self.head_dim, bias=b)
        self.o_proj = Linear(self.n_heads * self.head_dim, D, bias=b)

    def forward(self, x, cos, sin, attn_mask, cache=None, start_pos=0):
        B, T, _ = x.shape
        # project and split heads: (B, T, H*d) -> (B, H, T, d)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_emb(q, k, cos, sin)
        if cache is not None:
            # write this chunk into the cache, then attend over everything cached so far: (B, Hkv, start_pos+T, d)
            cache.k[self.layer_idx][:, :, start_pos:start_pos + T] = k
            cache.v[self.layer_idx][:, :, start_pos:start_pos + T] = v
            k = cache.k[self.layer_idx][:, :, :start_pos + T]
            v = cache.v[self.layer_idx][:, :, :start_pos + T]
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                          # (B, H, S, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)  # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(D, H, bias=b)
        self.up_proj = Linear(D, H, bias=b)
        self.down_proj = Linear(H, D, bias=b)

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
        S = start_pos + T                                                      # keys visible to this chunk
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask: expected shape {(B, S)} (cache + new tokens), got "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask.bool()                                          # (B, S)
        # 1. position ids from the mask, so left pads do not shift positions: (B, T)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]
        # 2. RoPE angles pos * theta_i, duplicated for the two rotate-half halves: (B, 1, T, d)
        inv_freq = rope_inv_freq(self.config, input_ids.device)
        angles = pos[:, :, None].float() * inv_freq[None, None, :]             # (B, T, d/2)
        emb = torch.cat((angles, angles), dim=-1)[:, None]                     # (B, 1, T, d)
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # 3. boolean mask (B, 1, T, S): query t (absolute index start_pos + t) sees real keys j <= start_pos + t.
        # Each query also sees itself, so a pad query row is never fully masked (which gives NaN in SDPA);
        # outputs at pad positions are garbage that callers mask out.
        q_idx = torch.arange(start_pos, S, device=input_ids.device)[:, None]  # (T, 1)
        k_idx = torch.arange(S, device=input_ids.device)[None, :]             # (1, S)
        attn_mask = ((k_idx <= q_idx) & real[:, None, :]) | (k_idx == q_idx)   # (B, T, S)
        attn_mask = attn_mask[:, None]                                         # (B, 1, T, S)
        if cache is None and bool(real.all()):
            attn_mask = None          # no pads and no cache: SDPA's built-in causal kernel (faster) does the same
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, start_pos)
        return self.norm(x)


class LLaMA(nn.Module):
    """Causal LM (HF `LlamaForCausalLM`): backbone + LM head. `model(ids, mask)` -> logits (B, T, vocab)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Transformer(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:      # from_pretrained builds on meta: no init, the weights come from disk
            self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, input_ids, attention_mask=None, cache=None, start_pos=0):
        return self.lm_head(self.model(input_ids, attention_mask, cache, start_pos))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        cfg = load_config(path)
        with torch.device("meta"):                   # no memory for the random init: weights come from disk
            model = cls(cfg)
        load_weights(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path, max_shard_size=5 * 2**30):
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        save_weights(self, path, config, max_shard_size=max_shard_size)


def init_weights(module, std):
    """Normal(0, std) for linear and embedding weights, zeros for biases (HF's LLaMA init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
