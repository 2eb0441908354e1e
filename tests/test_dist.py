"""dist.py and DDP training: sharding round-trips, and 2 processes under torchrun (gloo) follow the
same loss curve and reach the same weights as 1 process for the same global batch; the collective
timeout setting, wrap() on one process, activation checkpointing, and the two bench scripts
(bench/memory.py's formulas against exact counts, bench/gpu_check.py --tiny). FSDP2 itself is
tested in tests/test_fsdp.py, which shares `torchrun` from here."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanorlcd import dist, toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trains a tiny LLaMA for a few steps from a fixed init; rank 0 writes log.jsonl and the checkpoint.
SCRIPT = """
import json, sys, torch
from nanorlcd import dist, sft, toy
from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.tokenizer import Tokenizer
tok_dir, out = sys.argv[1], sys.argv[2]
rank, world, device = dist.init()
tok = Tokenizer(tok_dir)
torch.manual_seed(0)
model = LLaMA(LLaMAConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256))
docs = toy.generate_corpus(120, seed=0)
cfg = sft.SFTConfig(max_steps=4, batch_size=8, micro_batch_size=4, seq_len=128, lr=1e-2,
                    warmup_steps=1, eval_every=2, log_every=1)
sft.train_lm(cfg, model, tok, [("", d) for d in docs[:100]], [("", d) for d in docs[100:]], out,
             out + "/log.jsonl")
order = dist.gather(dist.shard(list(range(11))))
if dist.is_main():
    json.dump({"world": world, "order": order}, open(out + "/dist.json", "w"))
dist.cleanup()
"""


def test_shard_gather_single_process():
    items = list("abcdefg")
    assert dist.shard(items) == items and dist.gather(dist.shard(items)) == items
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert dist.all_reduce_mean({"a": 1.5}) == {"a": 1.5}


def torchrun(nproc, script, *args, timeout=600, env=None):
    """Runs `script args...` under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU, one
    thread per rank, this checkout first on PYTHONPATH) and asserts it exits 0. Shared by the DDP
    and FSDP tests."""
    path = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    first_error = res.stderr[max(0, res.stderr.find("Traceback")):][:4000]   # the failing rank's
    assert res.returncode == 0, res.stdout[-2000:] + first_error
    return res


def run(nproc, tok_dir, out, script):
    os.makedirs(out)
    torchrun(nproc, script, tok_dir, out)
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))][1:]
    return (records, json.load(open(os.path.join(out, "dist.json"))),
            load_file(os.path.join(out, "model.safetensors")))


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    tok_dir = str(tmp_path / "tok")
    toy.train_tokenizer(tok_dir, toy.generate_corpus(500, seed=0), vocab_size=400)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    one, info1, w1 = run(1, tok_dir, str(tmp_path / "one"), str(script))
    two, info2, w2 = run(2, tok_dir, str(tmp_path / "two"), str(script))
    assert (info1["world"], info2["world"]) == (1, 2)
    assert info2["order"] == list(range(11))  # shard + gather keep the order across ranks
    # the same loss curve, step by step (2 ranks x 1 micro-step vs 1 rank x 2 micro-steps, same 8
    # rows)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["train/tokens"] == a["train/tokens"]
        if "val/loss" in a:
            assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
    assert one[-1]["train/loss"] < one[0]["train/loss"]
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.slow     # a subprocess that imports torch and runs 6 tiny checks: ~15 s of CPU
def test_gpu_check_runs_tiny_on_cpu():
    """bench/gpu_check.py --tiny: the one-GPU check's code paths (decode, sharded fwd+bwd with and
    without AC, a PPO-style step with four sharded models) run on the CPU and print the full table.
    """
    res = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--tiny"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 6, res.stdout
    assert "PPO step, 4 sharded models" in table[-1]


def test_memory_formulas_match_exact_counts():
    """bench/memory.py --check: parameter counts, fp32 AdamW state bytes, KV cache bytes and saved
    activations per layer (fp32 and bf16, two shapes: GQA and tied) equal the exact counts; the 7B
    figures are sane."""
    sys.path.insert(0, REPO)
    from bench import memory
    text, ok = memory.check()
    assert ok, text
    cfg = memory.config("llama-7b")
    assert memory.param_count(cfg) == 6_738_415_616                  # LLaMA-7B's published size
    ppo = sum(memory.stage_bytes(cfg, "ppo-rollout", 8, False).values()) / 1e9
    assert 40 < ppo < 80                             # fits 80 GB only because all four models shard
    assert sum(memory.stage_bytes(cfg, "ppo-rollout", 1, False).values()) / 1e9 > 200


def test_shard_padded_gives_every_rank_the_same_length(monkeypatch):
    items = list(range(7))
    for world in (1, 2, 3, 4):
        monkeypatch.setattr(dist, "world_size", lambda: world)
        shares = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda: r)
            shares.append(dist.shard_padded(items))
        assert {len(share) for share, _ in shares} == {-(-7 // world)}
        real = sorted(x for share, n in shares for x in share[:n])
        assert real == items                                  # the real items, each exactly once


def test_timeout_setting():
    assert dist.timeout(5) == 5.0
    with pytest.raises(ValueError, match="NANORLCD_DIST_TIMEOUT"):
        dist.timeout("soon")
    with pytest.raises(ValueError, match="strategy"):
        dist.wrap(torch.nn.Linear(2, 2), "zero3")


def test_one_process_wrap_is_identity_and_checkpointing_is_exact(make_model):
    """On one process wrap() returns the model itself; per-block activation checkpointing changes no
    gradient (it only recomputes) and no parameter name."""
    model, ref = make_model(seed=0).train(), make_model(seed=0).train()
    for strategy in dist.STRATEGIES:
        assert dist.wrap(model, strategy) is model
    names = [n for n, _ in model.named_parameters()]
    dist.checkpoint_blocks(model)
    assert [n for n, _ in model.named_parameters()] == names
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for m in (model, ref):
        m(ids).float().pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    with torch.no_grad():                            # decoding/eval paths skip checkpointing
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
