"""Tests for the checkpoint I/O in nanorlcd/model.py: the Hugging Face safetensors layout, round trips and errors.

What is checked:
- `save_pretrained` writes config.json + model.safetensors with exactly HF's tensor names (listed by hand below),
  or, above `max_shard_size`, model-0000k-of-0000n.safetensors + model.safetensors.index.json; loading either is
  bit-exact (every tensor, the config, the logits);
- tied embeddings: the file omits lm_head.weight; a tied checkpoint that still carries it also loads;
- every broken directory raises a one-line ValueError / FileNotFoundError naming the file, field or tensor:
  missing / unexpected / misshapen tensor, missing shard, malformed config.json (bad JSON, missing field),
  pickles only (refused: torch.load is never called), a non-LLaMA architecture, an unsupported rope_type.
Run: `python -m pytest tests/test_checkpoint.py -q`
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanorlcd.model import LLaMA

LOAD_ERRORS = (ValueError, FileNotFoundError)


def hf_tensor_names(n_layers, tied=False):
    """The tensor names of a transformers LlamaForCausalLM checkpoint."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not tied else set())
    for i in range(n_layers):
        names |= {f"model.layers.{i}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    return names


def file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def assert_same_model(a, b):
    """Bit-exact: same config, same tensors, same logits."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def load_error(path, match):
    """LLaMA.from_pretrained(path) must raise a one-line load error whose message contains `match` (literal)."""
    with pytest.raises(LOAD_ERRORS, match=re.escape(match)) as e:
        LLaMA.from_pretrained(path)
    assert "\n" not in str(e.value), f"multi-line error: {e.value}"
    return str(e.value)


@pytest.fixture
def saved(tmp_path, make_model):
    """A saved tiny checkpoint directory (single file) and the model it came from."""
    model = make_model()
    model.save_pretrained(tmp_path)
    return tmp_path, model


# ----------------------------------------------------------------------------- round trips

def test_round_trip_single_file(saved):
    path, model = saved
    assert (path / "config.json").is_file() and not (path / "model.safetensors.index.json").exists()
    assert file_keys(path / "model.safetensors") == hf_tensor_names(2)
    assert_same_model(model, LLaMA.from_pretrained(path, dtype=torch.float32, device="cpu"))


def test_round_trip_sharded(tmp_path, make_model):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_size=20_000)          # the tiny model is ~99 kB in fp32
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == hf_tensor_names(2)
    # every tensor sits in the shard the index names
    for shard in shards:
        assert file_keys(tmp_path / shard) == {k for k, v in index["weight_map"].items() if v == shard}
    assert_same_model(model, LLaMA.from_pretrained(tmp_path))


def test_round_trip_config_fields(tmp_path, make_model):
    """Non-default config fields (llama3 RoPE, eos list, explicit head_dim, pad id) survive the round trip."""
    model = make_model(head_dim=16, rope_theta=500000.0, eos_token_id=[2, 5], pad_token_id=0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model.save_pretrained(tmp_path)
    assert_same_model(model, LLaMA.from_pretrained(tmp_path))


def test_load_dtype(saved):
    path, model = saved
    half = LLaMA.from_pretrained(path, dtype=torch.bfloat16)
    for k, t in half.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, model.state_dict()[k].to(torch.bfloat16)), k


def test_tied_embeddings_save_and_load(tmp_path, make_model):
    model = make_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    # 1. the file omits lm_head.weight (as transformers does for tied models)
    assert file_keys(tmp_path / "model.safetensors") == hf_tensor_names(2, tied=True)
    loaded = LLaMA.from_pretrained(tmp_path)
    assert_same_model(model, loaded)
    # 2. the head is still the embedding after loading (one tensor, not a copy)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # 3. older tied checkpoints carry lm_head.weight anyway: it loads too
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_model(model, LLaMA.from_pretrained(tmp_path))


def test_safetensors_preferred_over_pickle(saved, monkeypatch):
    path, model = saved
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a pickle"))
    assert_same_model(model, LLaMA.from_pretrained(path))


# ----------------------------------------------------------------------------- bad checkpoints

def rewrite_tensors(path, edit):
    """Applies `edit(dict of tensors)` to path/model.safetensors in place."""
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    load_error(path, "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_error(path, "model.layers.0.self_attn.rotary_emb.inv_freq")


def test_wrong_shape(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    msg = load_error(path, "model.layers.1.self_attn.k_proj.weight")
    assert "16" in msg and "8" in msg                                # the expected and the found shape


def test_missing_shard(tmp_path, make_model):
    make_model().save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    load_error(tmp_path, shard)


def test_no_config(saved):
    path, _ = saved
    (path / "config.json").unlink()
    load_error(path, "config.json")


def test_config_bad_json(saved):
    path, _ = saved
    (path / "config.json").write_text('{"hidden_size": 32,')
    load_error(path, "config.json")


def test_config_missing_field(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    load_error(path, "num_hidden_layers")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth"])
def test_pickles_refused_never_loaded(saved, monkeypatch, name):
    """A directory with only a pickle (HF .bin, Meta .pth) is refused by name; nothing is unpickled."""
    path, _ = saved
    (path / "model.safetensors").unlink()
    (path / name).write_bytes(b"\x80\x04not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a pickle"))
    load_error(path, name)


@pytest.mark.parametrize("fields,match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "mistral"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"model_type": "gpt2"}, "gpt2"),
], ids=["mistral", "architectures", "model_type"])
def test_unknown_architecture(saved, fields, match):
    path, _ = saved
    cfg = {**json.loads((path / "config.json").read_text()), **fields}
    (path / "config.json").write_text(json.dumps(cfg))
    load_error(path, match)


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},                        # 4.x spelling
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},                             # 4.x legacy key "type"
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},  # 5.x spelling
], ids=["4.x", "4.x-type", "5.x"])
def test_unknown_rope_type(saved, rope):
    path, _ = saved
    cfg = {**json.loads((path / "config.json").read_text()), **rope}
    (path / "config.json").write_text(json.dumps(cfg))
    load_error(path, "yarn")
