"""Tests for nanorlcd/checkpoint.py: HF safetensors layout, atomic saves, training state, errors.

What is checked:
- `save_pretrained` writes config.json + model.safetensors with exactly HF's tensor names (listed by
  hand below), or, above `max_shard_size`, model-0000k-of-0000n.safetensors +
  model.safetensors.index.json; loading either is bit-exact (every tensor, the config, the logits);
- tied embeddings: the file omits lm_head.weight; a tied checkpoint that still carries it also
  loads;
- every broken directory raises a one-line ValueError / FileNotFoundError naming the file, field or
  tensor: missing / unexpected / misshapen tensor, missing shard, malformed config.json (bad JSON,
  missing field), pickles only (refused: torch.load is never called), a non-LLaMA architecture, an
  unsupported rope_type;
- every fault class of a damaged checkpoint gives a one-line ValueError at load time naming the file
  and the tensor or field (the table below, `TENSOR_FAULTS` / `INDEX_FAULTS` / `CONFIG_FAULTS`):
  truncated or garbage safetensors, int/bool tensors for float weights, NaN/inf weights (also inf
  made by the cast to the requested dtype), a shard index entry outside the directory (`../`,
  absolute), an index naming a tensor its shard lacks, config fields of the wrong type or value;
- atomic saves: a save that fails, or a process killed (SIGKILL) mid-write or between the two
  renames of the swap, leaves the old checkpoint loading bit-exact, never a mix, and its leftovers
  are removed by the next load or save; a set of models (PPO's policy/ + value/) switches as a
  whole; kept files survive the swap;
- training state: AdamW + step + RNG + data position through safetensors/JSON resume
  bit-identically.
Run: `python -m pytest tests/test_checkpoint.py -q`
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanorlcd import checkpoint
from nanorlcd.model import LLaMA

LOAD_ERRORS = (ValueError, FileNotFoundError)


def hf_tensor_names(n_layers, tied=False):
    """The tensor names of a transformers LlamaForCausalLM checkpoint."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    names |= {"lm_head.weight"} if not tied else set()
    for i in range(n_layers):
        names |= {f"model.layers.{i}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")}
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
    """LLaMA.from_pretrained(path) must raise a one-line load error whose message contains `match`
    (literal)."""
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
    # the tiny model is ~99 kB in fp32
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == hf_tensor_names(2)
    # every tensor sits in the shard the index names
    for shard in shards:
        in_shard = {k for k, v in index["weight_map"].items() if v == shard}
        assert file_keys(tmp_path / shard) == in_shard
    assert_same_model(model, LLaMA.from_pretrained(tmp_path))


def test_round_trip_config_fields(tmp_path, make_model):
    """Non-default config fields (llama3 RoPE, eos list, explicit head_dim, pad id) survive the
    round trip."""
    model = make_model(head_dim=16, rope_theta=500000.0, eos_token_id=[2, 5], pad_token_id=0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})
    model.save_pretrained(tmp_path)
    assert_same_model(model, LLaMA.from_pretrained(tmp_path))


def test_load_dtype(saved):
    path, model = saved
    half = LLaMA.from_pretrained(path, dtype=torch.bfloat16)
    for k, t in half.state_dict().items():
        assert t.dtype == torch.bfloat16, k
        assert torch.equal(t, model.state_dict()[k].to(torch.bfloat16)), k


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
    rewrite_tensors(path, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_error(path, "model.layers.0.self_attn.rotary_emb.inv_freq")


def test_wrong_shape(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.update(
        {"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    msg = load_error(path, "model.layers.1.self_attn.k_proj.weight")
    # the expected and the found shape
    assert "16" in msg and "8" in msg


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
    """A directory with only a pickle (HF .bin, Meta .pth) is refused by name; nothing is
    unpickled."""
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
    # 4.x spelling
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    # 4.x legacy key "type"
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},
    # 5.x spelling
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
], ids=["4.x", "4.x-type", "5.x"])
def test_unknown_rope_type(saved, rope):
    path, _ = saved
    cfg = {**json.loads((path / "config.json").read_text()), **rope}
    (path / "config.json").write_text(json.dumps(cfg))
    load_error(path, "yarn")


# ----------------------------------------------------------------------------- atomic saves

def leftovers(parent):
    """Temporary siblings a save may leave (`.NAME.tmp-PID`, `.NAME.old-PID`, `*.tmp-PID`)."""
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def perturbed(model, seed):
    """A copy of `model` with every weight moved: old and new checkpoints differ in every tensor."""
    new = LLaMA(model.config)
    new.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return new.eval()


def test_failed_sharded_save_keeps_old_checkpoint(tmp_path, make_model, monkeypatch):
    """The second shard's write fails: the directory still holds the old model, whole, and nothing
    else."""
    ckpt, old = tmp_path / "ckpt", make_model()
    old.save_pretrained(ckpt, max_shard_size=20_000)
    before = sorted(os.listdir(ckpt))
    calls, real_save_file = [], checkpoint.save_file

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        perturbed(old, 1).save_pretrained(ckpt, max_shard_size=20_000)
    assert sorted(os.listdir(ckpt)) == before and leftovers(tmp_path) == []
    assert_same_model(old, LLaMA.from_pretrained(ckpt))


KILLED_SAVE = """
import os, signal, sys
import torch
from nanorlcd import checkpoint
from nanorlcd.model import LLaMA
path, where = sys.argv[1], sys.argv[2]
model = LLaMA.from_pretrained(path)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
calls = []
def kill_on_second(real):
    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
if where == "between-shards":
    checkpoint.save_file = kill_on_second(checkpoint.save_file)
else:      # between the rename of the old directory aside and the rename of the new one in
    os.rename = kill_on_second(os.rename)
model.save_pretrained(path, max_shard_size=20_000)
"""


@pytest.mark.parametrize("where", ["between-shards", "between-renames"])
def test_killed_save_leaves_old_checkpoint(tmp_path, make_model, where):
    """kill -9 of a sharded save at its two dangerous points: the old checkpoint loads bit-exact
    (the killed save left a temp dir, or the old dir renamed aside), and the load or save after
    it cleans up."""
    ckpt, old = tmp_path / "ckpt", make_model()
    old.save_pretrained(ckpt, max_shard_size=20_000)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(ckpt), where], env=env)
    assert proc.returncode == -9
    assert leftovers(tmp_path) != []                           # the kill did leave something behind
    assert_same_model(old, LLaMA.from_pretrained(ckpt))
    assert leftovers(tmp_path) == []
    new = perturbed(old, 2)
    new.save_pretrained(ckpt, max_shard_size=20_000)
    assert_same_model(new, LLaMA.from_pretrained(ckpt))


def test_set_of_models_switches_as_a_whole(tmp_path, make_model):
    """PPO's policy/ + value/ in one atomic_dir: a failure while writing value/ keeps both old
    models."""
    ckpt, policy, value = tmp_path / "ppo", make_model(seed=0), make_model(seed=1)
    with checkpoint.atomic_dir(ckpt) as tmp:
        policy.save_pretrained(os.path.join(tmp, "policy"))
        value.save_pretrained(os.path.join(tmp, "value"))
    with pytest.raises(RuntimeError, match="killed"):
        with checkpoint.atomic_dir(ckpt) as tmp:
            perturbed(policy, 3).save_pretrained(os.path.join(tmp, "policy"))
            raise RuntimeError("killed while writing value/")
    assert leftovers(tmp_path) == [] and sorted(os.listdir(ckpt)) == ["policy", "value"]
    assert_same_model(policy, LLaMA.from_pretrained(ckpt / "policy"))
    assert_same_model(value, LLaMA.from_pretrained(ckpt / "value"))


def test_swap_keeps_other_files_and_drops_stale_shards(tmp_path, make_model):
    """save_pretrained into a directory holding a tokenizer and an open log: both survive the swap
    (the open log keeps writing into the new directory); the old shards do not survive a
    single-file save."""
    ckpt, model = tmp_path / "ckpt", make_model()
    model.save_pretrained(ckpt, max_shard_size=20_000)
    (ckpt / "tokenizer.model").write_bytes(b"spm")
    with open(ckpt / "log.jsonl", "a") as log:
        log.write("line 1\n")
        log.flush()
        model.save_pretrained(ckpt)
        log.write("line 2\n")
    assert sorted(os.listdir(ckpt)) == ["config.json", "log.jsonl", "model.safetensors",
                                        "tokenizer.model"]
    assert (ckpt / "log.jsonl").read_text() == "line 1\nline 2\n"
    assert (ckpt / "tokenizer.model").read_bytes() == b"spm"
    assert_same_model(model, LLaMA.from_pretrained(ckpt))


def test_atomic_dir_keep(tmp_path):
    """atomic_dir replaces the directory as a whole: only names in `keep` are carried over."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("old a")
    (d / "b").write_text("old b")
    (d / "log.jsonl").write_text("log")
    with checkpoint.atomic_dir(d, keep=("log.jsonl", "a")) as tmp:
        with open(os.path.join(tmp, "a"), "w") as f:
            f.write("new a")
    assert sorted(os.listdir(d)) == ["a", "log.jsonl"]
    assert (d / "a").read_text() == "new a" and (d / "log.jsonl").read_text() == "log"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------ training state (resume)

def adamw_steps(model, optimizer, n):
    """n AdamW steps on random data drawn from the global torch RNG (so RNG state matters for
    resume)."""
    for _ in range(n):
        ids = torch.randint(3, 97, (2, 9))
        logits = model(ids[:, :-1])                                        # (2, 8, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_training_state_resume_is_bit_identical(tmp_path, make_model, monkeypatch):
    """3 steps, save (weights + optimizer + step + RNG + data position), 2 more steps; against: load
    into a fresh model and optimizer, restore RNG, 2 steps. Same weights bit for bit; nothing is
    unpickled."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    torch.manual_seed(0)
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    adamw_steps(model, opt, 3)
    with checkpoint.atomic_dir(tmp_path / "ckpt") as tmp:
        model.save_pretrained(tmp)
        checkpoint.save_training_state(tmp, opt, step=3, rng_states=checkpoint.rng_states(),
                                       extra={"data_pos": 6, "prompts": "a.jsonl"})
    adamw_steps(model, opt, 2)

    resumed = LLaMA.from_pretrained(tmp_path / "ckpt").train()
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=5.0)  # hyper-parameters come from the file
    torch.manual_seed(123)                                   # overwritten by the restored RNG state
    state = checkpoint.load_training_state(tmp_path / "ckpt", opt2)
    checkpoint.set_rng_states(state["rng_states"])
    assert state["step"] == 3 and state["extra"] == {"data_pos": 6, "prompts": "a.jsonl"}
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    adamw_steps(resumed, opt2, 2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_state_errors(tmp_path, make_model):
    """A state saved for other parameters, or a damaged tensor file, is a one-line ValueError naming
    the file."""
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters())
    adamw_steps(model, opt, 1)
    checkpoint.save_training_state(tmp_path, opt, step=1, rng_states=checkpoint.rng_states())
    other = make_model(intermediate_size=48).train()
    with pytest.raises(ValueError, match=re.escape(checkpoint.STATE_TENSORS)) as e:
        checkpoint.load_training_state(tmp_path, torch.optim.AdamW(other.parameters()))
    assert "shape" in str(e.value) and "\n" not in str(e.value)
    fewer = torch.optim.AdamW(list(model.parameters())[:3])
    with pytest.raises(ValueError, match=re.escape(checkpoint.STATE_JSON)):
        checkpoint.load_training_state(tmp_path, fewer)
    (tmp_path / checkpoint.STATE_TENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ValueError, match=re.escape(checkpoint.STATE_TENSORS)):
        checkpoint.load_training_state(tmp_path, torch.optim.AdamW(model.parameters()))


# --------------------------------------------------------------------- fault classes at load time
# Each case damages a saved tiny checkpoint one way; loading must raise a one-line ValueError whose
# message names the file and contains `match` (the tensor, field or reason). The old loader let
# every one of these through, as a traceback at load or first forward, or silently.

def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


TENSOR_FAULTS = {   # id: (edit of the single-file checkpoint directory, load dtype, match)
    "truncated-file": (lambda d: truncate(d / "model.safetensors"), torch.float32, "damaged"),
    "garbage-file": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), torch.float32,
                     "damaged"),
    "int-tensor": (lambda d: rewrite_tensors(d, lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.int32)})), torch.float32,
        "'model.norm.weight' has dtype torch.int32"),
    "bool-tensor": (lambda d: rewrite_tensors(d, lambda t: t.update(
        {"lm_head.weight": t["lm_head.weight"] > 0})), torch.float32,
        "'lm_head.weight' has dtype torch.bool"),
    "nan-weight": (lambda d: rewrite_tensors(d, lambda t: t["model.layers.0.mlp.up_proj.weight"]
                                             .view(-1).__setitem__(5, float("nan"))), torch.float32,
                   "'model.layers.0.mlp.up_proj.weight' has 1 NaN"),
    "inf-weight": (lambda d: rewrite_tensors(d, lambda t: t["model.embed_tokens.weight"].view(-1)
                                             .__setitem__(0, float("-inf"))), torch.float32,
                   "'model.embed_tokens.weight' has 0 NaN and 1 inf"),
    "inf-after-cast": (lambda d: rewrite_tensors(d, lambda t: t["model.norm.weight"].view(-1)
                                                 .__setitem__(0, 1e6)), torch.float16,
                       "'model.norm.weight' has 0 NaN and 1 inf values as torch.float16"),
}


@pytest.mark.parametrize("fault", list(TENSOR_FAULTS))
def test_tensor_faults(saved, fault):
    path, _ = saved
    edit, dtype, match = TENSOR_FAULTS[fault]
    edit(path)
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        LLaMA.from_pretrained(path, dtype=dtype)
    assert str(e.value).startswith(str(path / "model.safetensors")) and "\n" not in str(e.value)


INDEX = "model.safetensors.index.json"


def edit_index(d, name, shard):
    """Points tensor `name` at `shard` in the index; returns the file the error should name."""
    index = json.loads((d / INDEX).read_text())
    index["weight_map"][name] = shard
    (d / INDEX).write_text(json.dumps(index))
    return INDEX


def shard_of(d, name):
    return json.loads((d / INDEX).read_text())["weight_map"][name]


def truncate_shard(d):
    shard = shard_of(d, "model.layers.0.self_attn.q_proj.weight")
    truncate(d / shard)
    return shard


INDEX_FAULTS = {    # id: (edit of a sharded dir, returning the file the error names; match)
    "dotdot-path": (lambda d: edit_index(d, "model.norm.weight", "../x.safetensors"),
                    "'../x.safetensors' is outside"),
    "absolute-path": (lambda d: edit_index(d, "model.norm.weight", "/etc/passwd"),
                      "'/etc/passwd' is outside"),
    "tensor-not-in-shard": (lambda d: edit_index(d, "model.norm.weight",
                                                 shard_of(d, "lm_head.weight"))
                            and shard_of(d, "lm_head.weight"),
                            "'model.norm.weight' listed in the shard index is not in this file"),
    "truncated-shard": (truncate_shard, "damaged"),
}


@pytest.mark.parametrize("fault", list(INDEX_FAULTS))
def test_index_faults(tmp_path, make_model, fault):
    """Sharded checkpoints: index entries outside the directory are refused before any file is
    opened."""
    ckpt = tmp_path / "ckpt"
    make_model().save_pretrained(ckpt, max_shard_size=20_000)
    outside = tmp_path / "x.safetensors"             # what the `../` entry would have read
    save_file({"model.norm.weight": torch.ones(32)}, outside)
    edit, match = INDEX_FAULTS[fault]
    file = edit(ckpt)
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        LLaMA.from_pretrained(ckpt)
    assert str(e.value).startswith(str(ckpt / file)) and "\n" not in str(e.value)


LLAMA3_NO_FACTOR = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}
CONFIG_FAULTS = {   # id: (config.json fields, match)
    "string-int": ({"vocab_size": "97"}, "'vocab_size' is '97', expected a positive integer"),
    "float-int": ({"hidden_size": 32.0}, "'hidden_size' is 32.0, expected a positive integer"),
    "null-int": ({"num_hidden_layers": None}, "'num_hidden_layers' is None"),
    "bool-int": ({"intermediate_size": True}, "'intermediate_size' is True"),
    "zero-int": ({"max_position_embeddings": 0}, "'max_position_embeddings' is 0"),
    "negative-int": ({"num_attention_heads": -4}, "'num_attention_heads' is -4"),
    "zero-kv-heads": ({"num_key_value_heads": 0}, "'num_key_value_heads' is 0"),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3},
                              "'num_key_value_heads' is 3, expected a divisor"),
    "hidden-not-divisible": ({"hidden_size": 30, "head_dim": None},
                             "'hidden_size' is 30, expected a multiple"),
    "odd-head-dim": ({"head_dim": 7}, "'head_dim' is 7, expected an even number"),
    "zero-eps": ({"rms_norm_eps": 0}, "'rms_norm_eps' is 0"),
    "string-theta": ({"rope_theta": "10000"}, "'rope_theta' is '10000'"),
    "string-bool": ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' is 'false'"),
    "string-eos": ({"eos_token_id": "2"}, "'eos_token_id' is '2'"),
    "llama3-without-factor": ({"rope_scaling": LLAMA3_NO_FACTOR}, "'rope_scaling.factor' is None"),
    "llama3-zero-factor": ({"rope_scaling": {**LLAMA3_NO_FACTOR, "factor": 0}},
                           "'rope_scaling.factor' is 0"),
    "llama3-equal-bands": ({"rope_scaling": {**LLAMA3_NO_FACTOR, "factor": 8.0,
                                             "high_freq_factor": 1.0}},
                           "'rope_scaling.high_freq_factor' is 1.0"),
    "rope-not-object": ({"rope_scaling": "linear"}, "'rope_scaling' is 'linear'"),
    "gelu": ({"hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_config_faults(saved, fault):
    path, _ = saved
    changes, match = CONFIG_FAULTS[fault]
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                  **changes}))
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        LLaMA.from_pretrained(path)
    assert str(e.value).startswith(str(path / "config.json")) and "\n" not in str(e.value)


def test_config_not_an_object(saved):
    path, _ = saved
    (path / "config.json").write_text("[1, 2]")
    load_error(path, "config.json: expected a JSON object")
