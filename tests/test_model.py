"""Tests for nanorlcd/model.py: the LLaMA forward pass against independent computations.

What is checked, and against what:
- the full forward (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, LM head, tied or
  not) against `naive_logits` below: a per-position, per-head loop over the raw state dict, in
  float64;
- RoPE frequencies: theta^(-2i/d) and the LLaMA-3 rescaling written out from Meta's `apply_scaling`
  loop;
- config.json in both spellings (transformers 4.x `rope_theta`/`rope_scaling`, 5.x
  `rope_parameters`), head_dim, the LLaMA-1 defaults (no num_key_value_heads / rope_theta), an eos
  list;
- `repeat_kv` against `torch.repeat_interleave`;
- `FastLinear`'s CPU few-row fast path: taken exactly where documented, same values and gradients as
  F.linear;
- left-padding invariance, causal masking, and the KV cache (prefill, chunked prefill at
  start_pos > 0, decode) against the full forward; a lazily allocated cache takes the compute dtype
  (bf16 weights, autocast);
- `keep` (which positions get logits) against slicing the full logits; a bf16 load against fp32;
- logit parity with transformers' `LlamaForCausalLM` (eager, fp32) in both checkpoint directions
  (skipped when transformers is not installed).
Run: `python -m pytest tests/test_model.py -q`
"""

import json
import math

import pytest
import torch

from nanorlcd.model import LLaMA, FastLinear, KVCache, load_config, repeat_kv

# LLaMA-3 RoPE scaling chosen so that the tiny head_dim 8 hits all three bands at rope_theta 2000:
# wavelengths 2*pi/inv_freq = 6.3 (< 64/4: kept), 42 (between: smoothed), 281 and 1880 (> 64/1:
# divided by 8).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


# --------------------------------------------------------------------------- independent references

def hand_inv_freq(theta, head_dim, scaling=None):
    """theta^(-2i/d), i < d/2, in float64; with `scaling`, Meta's llama3 `apply_scaling` loop,
    element by element."""
    freqs = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    if scaling is None:
        return torch.tensor(freqs, dtype=torch.float64)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:          # high frequency: unchanged
            out.append(f)
        elif wavelen > old_ctx / low:         # low frequency: slowed down by `factor`
            out.append(f / factor)
        else:                                 # in between: interpolate
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rope_one(x, pos, inv_freq):
    """Rotates x (n_heads, d) at one position, HF rotate-half layout: pairs are (i, i + d/2)."""
    freqs = pos * inv_freq                                    # (d/2,)
    emb = torch.cat([freqs, freqs])                           # (d,)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[:, half:], x[:, :half]], dim=-1)  # rotate_half(x)
    return x * emb.cos() + rotated * emb.sin()


def rope_one_interleaved(x, pos, inv_freq):
    """Meta's interleaved layout (pairs (2i, 2i+1)): the WRONG convention for HF checkpoints."""
    xc = torch.view_as_complex(x.reshape(x.shape[0], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(inv_freq), pos * inv_freq)
    return torch.view_as_real(xc * rot).reshape(x.shape)


def naive_logits(model, ids, inv_freq, rope=rope_one):
    """Logits (T, V) of one unpadded sequence `ids` (list of ints), from `model`'s state dict, with
    loops."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, KV, d, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    T = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = sd["model.embed_tokens.weight"][ids]                                          # (T, D)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, H, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, KV, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, KV, d)
        q = torch.stack([rope(q[t], t, inv_freq) for t in range(T)])
        k = torch.stack([rope(k[t], t, inv_freq) for t in range(T)])
        att = torch.zeros(T, H, d, dtype=torch.float64)
        for t in range(T):
            for head in range(H):
                g = head // (H // KV)                          # the kv head this query head shares
                # (t+1,): keys 0..t only (causal)
                scores = k[: t + 1, g] @ q[t, head] / math.sqrt(d)
                att[t, head] = torch.softmax(scores, dim=0) @ v[: t + 1, g]
        x = x + att.reshape(T, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = h @ sd[p + "mlp.gate_proj.weight"].T
        up = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    head_w = sd["model.embed_tokens.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head_w.T


def random_ids(B, T, vocab=97, seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded_batch(lengths, T, seed=0, pad_id=0):
    """(ids, mask) with row b holding lengths[b] real tokens right-aligned; pads are `pad_id`."""
    ids = random_ids(len(lengths), T, seed=seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : T - n] = pad_id
        mask[b, T - n:] = 1
    return ids, mask


# --------------------------------------------------------------------------- forward vs naive loops

@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=4),                       # MHA
    dict(num_key_value_heads=2),                       # GQA: 2 query heads per kv head
    dict(num_key_value_heads=1),                       # MQA
    dict(tie_word_embeddings=True),                    # tied LM head
    dict(head_dim=16),                                 # explicit head_dim != hidden_size / heads
], ids=["mha", "gqa", "mqa", "tied", "head_dim"])
def test_forward_matches_naive_loop(make_model, overrides):
    model = make_model(**overrides)
    ids = random_ids(1, 12)
    inv_freq = hand_inv_freq(10000.0, model.config.head_dim)
    with torch.no_grad():
        got = model(ids)[0].double()
    want = naive_logits(model, ids[0].tolist(), inv_freq)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rope_convention_is_rotate_half(make_model):
    """The reference is sensitive to the layout: Meta's interleaved rotation gives clearly different
    logits."""
    model = make_model()
    ids = random_ids(1, 12)
    inv_freq = hand_inv_freq(10000.0, model.config.head_dim)
    with torch.no_grad():
        got = model(ids)[0].double()
    wrong = naive_logits(model, ids[0].tolist(), inv_freq, rope=rope_one_interleaved)
    assert (got - wrong).abs().max() > 1e-2


def test_llama3_rope_scaling_matches_hand_formula(make_model):
    model = make_model(rope_theta=2000.0, rope_scaling=dict(LLAMA3))
    scaled, plain = hand_inv_freq(2000.0, 8, LLAMA3), hand_inv_freq(2000.0, 8)
    # the chosen settings exercise every band: kept, smoothed, divided by factor
    assert scaled[0] == plain[0] and scaled[3] == plain[3] / 8
    assert plain[1] / 8 < scaled[1] < plain[1]
    ids = random_ids(1, 24)
    with torch.no_grad():
        got = model(ids)[0].double()
    torch.testing.assert_close(got, naive_logits(model, ids[0].tolist(), scaled),
                               rtol=1e-4, atol=1e-4)
    assert (got - naive_logits(model, ids[0].tolist(), plain)).abs().max() > 1e-3


def test_repeat_kv_equals_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)                                    # (B, Hkv, S, d)
    for n_rep in (1, 2, 4):
        torch.testing.assert_close(repeat_kv(x, n_rep), torch.repeat_interleave(x, n_rep, dim=1),
                                   rtol=0, atol=0)


# (out, in, input shape, bias, dtype, fast path expected): the swap needs CPU fp32, 2-64 rows, >=
# 2^18 weights
LINEAR_CASES = {
    "fast-3d": (1024, 256, (2, 3, 256), False, torch.float32, True),
    "fast-bias": (1024, 256, (5, 256), True, torch.float32, True),
    "fast-64-rows": (256, 1024, (8, 8, 1024), False, torch.float32, True),
    "one-row": (1024, 256, (1, 1, 256), False, torch.float32, False),
    "65-rows": (1024, 256, (65, 256), True, torch.float32, False),
    "small-weight": (1023, 256, (4, 256), False, torch.float32, False),
    "float64": (1024, 256, (4, 256), False, torch.float64, False),
}


@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_linear_fast_path_matches_f_linear(case):
    """FastLinear computes few-row CPU products as (W @ x^T)^T (faster with CPU BLAS): it must take
    that path exactly where its docstring says, and give F.linear's values and gradients
    everywhere."""
    out_f, in_f, shape, bias, dtype, fast = case
    torch.manual_seed(0)
    layer = FastLinear(in_f, out_f, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], out_f) and y.is_contiguous()
    # which path ran: the swap's own arithmetic, bit for bit, or F.linear's
    b = layer.bias if bias else 0
    swapped = ((layer.weight @ x.reshape(-1, in_f).T).T + b).reshape(y.shape)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(y, swapped if fast else plain)
    # same values and gradients as F.linear (up to float summation order)
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref = torch.autograd.grad(plain, [x, *layer.parameters()], g)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_backbone_returns_final_normed_hidden_states(make_model):
    model = make_model()
    ids = random_ids(2, 9)
    with torch.no_grad():
        h = model.model(ids)                                       # (B, T, D)
        logits = model(ids)
    assert h.shape == (2, 9, 32)
    torch.testing.assert_close(logits, h @ model.lm_head.weight.T)


# ----------------------------------------------------------------------------- config.json parsing

def write_config(path, extra, drop=()):
    """A minimal HF LLaMA config.json for the tiny model, with `extra` fields added and `drop`
    fields removed."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
         "hidden_act": "silu", "tie_word_embeddings": False, **extra}
    for k in drop:
        d.pop(k)
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("spelling", [
    # transformers 4.x
    {"rope_theta": 2000.0, "rope_scaling": dict(LLAMA3)},
    # 4.x with legacy "type" too
    {"rope_theta": 2000.0, "rope_scaling": {**LLAMA3, "type": "llama3"}},
    # transformers 5.x
    {"rope_parameters": {"rope_theta": 2000.0, **LLAMA3}},
], ids=["4.x", "4.x-type", "5.x"])
def test_config_spellings_give_same_llama3_logits(tmp_path, make_model, spelling):
    """Weights saved once; config.json rewritten in each spelling; logits follow the hand-scaled
    frequencies."""
    make_model(rope_theta=2000.0, rope_scaling=dict(LLAMA3)).save_pretrained(tmp_path)
    write_config(tmp_path, spelling)
    model = LLaMA.from_pretrained(tmp_path)
    ids = random_ids(1, 24)
    with torch.no_grad():
        got = model(ids)[0].double()
    want = naive_logits(model, ids[0].tolist(), hand_inv_freq(2000.0, 8, LLAMA3))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spelling", [
    {"rope_theta": 500000.0, "rope_scaling": None},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
], ids=["4.x", "5.x"])
def test_config_rope_theta_is_read(tmp_path, make_model, spelling):
    make_model().save_pretrained(tmp_path)
    write_config(tmp_path, spelling)
    model = LLaMA.from_pretrained(tmp_path)
    ids = random_ids(1, 12)
    with torch.no_grad():
        got = model(ids)[0].double()
    want = naive_logits(model, ids[0].tolist(), hand_inv_freq(500000.0, 8))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_config_llama1_defaults_head_dim_and_eos_list(tmp_path):
    """LLaMA-1 configs lack num_key_value_heads and rope_theta; LLaMA-3 ones carry head_dim and an
    eos list."""
    write_config(tmp_path, {}, drop=("num_key_value_heads",))
    cfg = load_config(tmp_path)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8 and cfg.rope_theta == 10000.0
    write_config(tmp_path, {"head_dim": 16, "eos_token_id": [2, 5], "rope_theta": 500000.0})
    cfg = load_config(tmp_path)
    assert cfg.head_dim == 16 and list(cfg.eos_token_id) == [2, 5] and cfg.rope_theta == 500000.0
    assert LLaMA(cfg).model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)


# ------------------------------------------------------------------------- masking and the KV cache

def test_left_padding_invariance(make_model):
    model = make_model()
    ids, mask = left_padded_batch([10, 6, 1], T=10, seed=1)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        # pad rows too: NaN * 0 would poison masked losses
        assert torch.isfinite(batch).all()
        for b, n in enumerate([10, 6, 1]):
            alone = model(ids[b:b + 1, 10 - n:])[0]
            torch.testing.assert_close(batch[b, 10 - n:], alone, rtol=1e-5, atol=1e-5)


def test_pad_token_values_do_not_matter(make_model):
    model = make_model()
    ids, mask = left_padded_batch([10, 4], T=10, seed=2)
    other = ids.clone()
    other[mask == 0] = 50                           # a different pad id
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[mask.bool()], model(other, mask)[mask.bool()],
                                   rtol=1e-6, atol=1e-6)


def test_causal_mask(make_model):
    model = make_model()
    ids = random_ids(2, 12, seed=3)
    changed = ids.clone()
    changed[:, 7:] = random_ids(2, 5, seed=4)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # ...while the changed positions do change


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [3, 4, 1, 1, 3], [12]],
                         ids=["prefill+decode", "chunked", "one-shot"])
def test_kv_cache_equals_full_forward(make_model, chunks):
    """Prefill, then chunks at start_pos > 0 with a mask over cache + new tokens, on a left-padded
    batch."""
    model = make_model()
    ids, mask = left_padded_batch([12, 9, 4], T=12, seed=5)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)                                     # (B, 12, V)
        cache = KVCache.empty(model.config, batch_size=3, max_len=16, dtype=torch.float32,
                              device="cpu")
        start, pieces = 0, []
        for n in chunks:
            # (B, n, V)
            pieces.append(model(ids[:, start:start + n], attention_mask=mask[:, :start + n],
                                cache=cache, start_pos=start))
            start += n
    cached = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [1, 4, slice(3, -1), slice(0, 12)],
                         ids=["last", "last-4", "slice", "all"])
def test_keep_equals_slicing_full_logits(make_model, keep):
    """forward(keep=k) is the full logits sliced (last k, or the slice), on a left-padded batch."""
    model = make_model()
    ids, mask = left_padded_batch([12, 9, 4], T=12, seed=7)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)                                     # (B, 12, V)
        kept = model(ids, attention_mask=mask, keep=keep)
    want = full[:, -keep:] if isinstance(keep, int) else full[:, keep]
    assert kept.shape == want.shape
    torch.testing.assert_close(kept, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keep", [0, -1, True, 1.0])
def test_keep_rejects_bad_values(make_model, keep):
    with pytest.raises(ValueError, match="keep"):
        make_model()(random_ids(1, 4), keep=keep)


def test_bf16_load_close_to_fp32(tmp_path, make_model):
    """from_pretrained(dtype=bf16) gives bf16 weights whose logits (computed in bf16 on the CPU)
    stay close to the fp32 model's: bf16 keeps 8 bits of mantissa, so relative error ~1e-2 over
    two layers."""
    make_model().save_pretrained(tmp_path)
    fp32 = LLaMA.from_pretrained(tmp_path)
    bf16 = LLaMA.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids, mask = left_padded_batch([10, 6], T=10, seed=3)
    with torch.no_grad():
        want, got = fp32(ids, mask), bf16(ids, mask)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    err = (got.float() - want)[real].abs().max() / want[real].abs().max()
    assert err < 0.05, err
    # the two models agree on the most likely next token nearly everywhere
    agree = (got.float().argmax(-1) == want.argmax(-1))[real].float().mean()
    assert agree > 0.9, agree


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_lazy_cache_takes_compute_dtype(make_model, mode):
    """KVCache.empty(dtype=None) allocates each layer at its first write in the dtype of its keys,
    so bf16 weights and fp32 weights under bf16 autocast both cache bf16; cached decoding equals
    the uncached forward computed the same way."""
    model = make_model()
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    ids, mask = left_padded_batch([8, 5], T=8, seed=11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        full = model(ids, attention_mask=mask)                                       # (B, 8, V)
        cache = KVCache.empty(model.config, batch_size=2, max_len=8)
        assert cache.k == [None, None]
        pieces = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache, keep=1)]
        for t in range(5, 8):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                                start_pos=t))
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}
    assert cache.k[0].shape == (2, 2, 8, 8)
    cached = torch.cat(pieces, dim=1).float()                               # positions 4..7
    torch.testing.assert_close(cached, full[:, 4:].float(), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------- parity with transformers

HF_CASES = {"mha": dict(num_key_value_heads=4), "gqa": dict(num_key_value_heads=2),
            "llama3": dict(rope_theta=2000.0, rope_scaling=dict(LLAMA3)),
            "tied": dict(tie_word_embeddings=True)}


def hf_load(path):
    transformers = pytest.importorskip("transformers")
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                         **{dtype_kw: torch.float32}).eval()


def hf_logits(hf, ids, mask):
    """HF does not derive positions from the mask in forward (only in generate), so pass them
    explicitly."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("case", list(HF_CASES))
def test_parity_with_transformers_our_checkpoint(tmp_path, make_model, case):
    """save_pretrained (ours) -> LlamaForCausalLM.from_pretrained: same logits to 1e-4."""
    model = make_model(**HF_CASES[case])
    model.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    ids, mask = left_padded_batch([40, 25], T=40, seed=6)
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf_logits(hf, ids, mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_parity_with_transformers_hf_checkpoint(tmp_path, make_model, case):
    """LlamaForCausalLM.save_pretrained (safetensors) -> LLaMA.from_pretrained: same logits to
    1e-4."""
    transformers = pytest.importorskip("transformers")
    make_model(**HF_CASES[case]).save_pretrained(tmp_path / "ours")
    # the parity test above checks this step
    hf = hf_load(tmp_path / "ours")
    kw = {"safe_serialization": True} if int(transformers.__version__.split(".")[0]) < 5 else {}
    hf.save_pretrained(tmp_path / "hf", **kw)
    model = LLaMA.from_pretrained(tmp_path / "hf")
    ids, mask = left_padded_batch([40, 25], T=40, seed=8)
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask), hf_logits(hf, ids, mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
