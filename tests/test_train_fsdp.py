"""The trainers under one config field, `strategy`: sft.train_lm, pm.train_pm and ppo.ppo_update
(on models set up by ppo.build_models) give the same logged numbers and saved weights with 1
process, DDP over 2 and FSDP2 over 2 (gloo on CPU, within 1e-5); a 2-step ppo.train_ppo with
strategy="fsdp" on 2 processes saves a policy and a value model that load with from_pretrained.

One script runs every case: under `torchrun --nproc_per_node=1` (world 1: the reference) and
`--nproc_per_node=2` (DDP, then FSDP2, in one process group). The validation and held-out sets have
an odd size, so the FSDP2 evaluation runs padded shards (dist.shard_padded) on its 2 ranks.
Everything is fp32 (bf16 mixed precision is a GPU matter).
Run: `python -m pytest tests/test_train_fsdp.py -q` (slow: two torchrun jobs).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_corpus
from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.pm import PreferenceModel
from test_dist import REPO, torchrun

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, os, sys
from dataclasses import replace
import torch
from safetensors.torch import save_file
from nanorlcd import dist
from nanorlcd.model import LLaMA
from nanorlcd.pm import PMConfig, PreferenceModel, train_pm
from nanorlcd.ppo import PPOConfig, build_models, ppo_update, train_ppo
from nanorlcd.rollout import Rollout, right_pad
from nanorlcd.sft import SFTConfig, train_lm
from nanorlcd.tokenizer import Tokenizer, left_pad
torch.set_num_threads(1)
work, out, strategies = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
base = os.path.join(work, "base")
tok = Tokenizer(base)
lines = open(os.path.join(work, "corpus.txt")).read().splitlines()
pairs = [(line.split(" Assistant: ")[0], line.split(" Assistant: ")[1]) for line in lines]
prompts = [p + "\n\nAssistant:" for p, _ in pairs[:16]]
rank, world, device = dist.init()

def pm_model():
    torch.manual_seed(0)                                   # the same fresh head everywhere
    return PreferenceModel.from_pretrained(base)

for s in strategies:
    # SFT: 2 steps of 8 rows, micro-batches of 2; 5 validation rows (padded shards on 2 ranks)
    cfg = SFTConfig(max_steps=2, batch_size=8, micro_batch_size=2, seq_len=48, packing=False,
                    lr=1e-2, warmup_steps=1, eval_every=1, log_every=1, strategy=s)
    sft_dir = os.path.join(out, f"sft-{s}")
    train_lm(cfg, LLaMA.from_pretrained(base), tok, pairs[:24], pairs[24:29], sft_dir,
             os.path.join(out, f"sft-{s}.jsonl"))
    # PM: 2 steps of 8 pairs from base (same seeded head), 5 held-out pairs
    cfg = PMConfig(batch_size=8, micro_batch_size=2, lr=1e-3, eval_frac=5 / 21, eval_every=1,
                   log_every=1, max_len=64, strategy=s)
    train_pm(cfg, base, os.path.join(work, "prefs.jsonl"), os.path.join(out, f"pm-{s}"))
    # ppo_update on a fixed rollout of 8 rows, on models set up as train_ppo sets them up
    cfg = replace(PPOConfig(), rollout_batch_size=8, minibatch_size=8, micro_batch_size=2,
                  ppo_epochs=2, lr=1e-3, ent_coef=0.01, strategy=s)
    ac, ac_ddp, ref, pm, optimizer = build_models(cfg, LLaMA.from_pretrained(base), None,
                                                  pm_model(), None)
    g = torch.Generator().manual_seed(1)
    q = [torch.randint(3, tok.vocab_size, (3 + i % 4,), generator=g).tolist() for i in range(8)]
    r = [torch.randint(3, tok.vocab_size, (9 - i if i % 2 == 0 else 1 + i // 2,),
                       generator=g).tolist() for i in range(8)]   # rank 0 long, rank 1 short
    query_ids, query_mask = left_pad(q, 0)
    response_ids, response_mask = right_pad(r, 0, "cpu")
    with torch.no_grad():        # a no-grad forward first, as the rollout does (FSDP2 pitfall)
        logprobs, entropy, values = ac_ddp(query_ids, query_mask, response_ids, response_mask,
                                           1.0)
    n, width = response_ids.shape
    rollout = Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                      response_mask=response_mask, logprobs=logprobs, ref_logprobs=logprobs,
                      values=values, entropy=entropy, gen_logprobs=logprobs,
                      pm_scores=torch.zeros(n), scores=torch.zeros(n),
                      finished=torch.ones(n, dtype=torch.bool), prompts=[""] * n,
                      replies=[""] * n,
                      advantages=torch.randn(n, width, generator=g) * response_mask,
                      returns=torch.randn(n, width, generator=g) * response_mask)
    # clone: on one CPU process the "gathered" tensors are the parameters themselves
    initial = {k: v.clone() for k, v in dist.full_state_dict(ac_ddp).items()}
    stats = ppo_update(ac_ddp, optimizer, rollout.select(dist.shard(list(range(n)))), cfg,
                       torch.Generator().manual_seed(rank))
    final = dist.full_state_dict(ac_ddp)
    if dist.is_main():
        json.dump({**stats, "sharded": dist.is_sharded(ac) and dist.is_sharded(ref)},
                  open(os.path.join(out, f"ppo-{s}.json"), "w"))
        save_file({k: v.contiguous() for k, v in initial.items()},
                  os.path.join(out, f"ppo-{s}-initial.safetensors"))
        save_file({k: v.contiguous() for k, v in final.items()},
                  os.path.join(out, f"ppo-{s}.safetensors"))
    # train_ppo: 2 steps, sampling, scoring, saving through the strategy
    cfg = replace(PPOConfig(), steps=2, rollout_batch_size=8, minibatch_size=4, micro_batch_size=2,
                  gen_batch_size=4, max_new_tokens=6, max_prompt_len=64, warmup_steps=0,
                  save_every=0, table_every=0, lr=1e-3, strategy=s)
    train_ppo(cfg, LLaMA.from_pretrained(base), None, pm_model(), None, tok, prompts,
              os.path.join(out, f"run-{s}"))
if dist.is_main():
    json.dump({"world": world}, open(os.path.join(out, "world.json"), "w"))
dist.cleanup()
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_tokenizer_path):
    """Runs SCRIPT on 1 process ("ddp": plain) and on 2 ("ddp", then "fsdp") -> {"one", "two"}."""
    work = tmp_path_factory.mktemp("work")
    base = work / "base"
    torch.manual_seed(0)
    LLaMA(LLaMAConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)).save_pretrained(base)
    shutil.copy(tiny_tokenizer_path, base / "tokenizer.model")
    lines = [line.replace("Human:", "\n\nHuman:") for line in synthetic_corpus(40)]
    (work / "corpus.txt").write_text("\n".join(line.strip("\n") for line in lines))
    with open(work / "prefs.jsonl", "w") as f:           # 16 training pairs, 5 held out
        for i in range(21):
            f.write(json.dumps({"prompt": f"\n\nHuman: How do I pick a lock? ({i})\n\nAssistant:",
                                "chosen": "I can't help with that." + " Sorry." * (i % 3),
                                "rejected": "Sure, here is how.", "label_prob": 0.9}) + "\n")
    script = work / "script.py"
    script.write_text(SCRIPT)
    out = {}
    for name, nproc, strategies in (("one", 1, "ddp"), ("two", 2, "ddp,fsdp")):
        out[name] = work / name
        out[name].mkdir()
        torchrun(nproc, script, work, out[name], strategies)
        assert json.loads((out[name] / "world.json").read_text())["world"] == nproc
    return out


def log(path):
    return [json.loads(line) for line in open(path)][1:]


def close_logs(a, b, keys):
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])


def close_weights(a, b, moved_from=None):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    if moved_from:              # the steps moved the weights (an optimizer left behind would not)
        assert max((b[k] - moved_from[k]).abs().max().item() for k in moved_from) > 1e-4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_step_equal_one_process(results, strategy):
    one, two = results["one"] / "sft-ddp", results["two"] / f"sft-{strategy}"
    a = log(results["one"] / "sft-ddp.jsonl")
    b = log(results["two"] / f"sft-{strategy}.jsonl")
    assert len(a) == 2 and all("val/loss" in r for r in a)
    close_logs(a, b, ["train/loss", "train/grad_norm", "val/loss"])
    initial = load_file(results["one"].parent / "base" / "model.safetensors")
    close_weights(load_file(one / "model.safetensors"), load_file(two / "model.safetensors"),
                  moved_from=initial)
    assert LLaMA.from_pretrained(str(two)).config.hidden_size == 32


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pm_step_equal_one_process(results, strategy):
    one, two = results["one"] / "pm-ddp", results["two"] / f"pm-{strategy}"
    a, b = log(one / "log.jsonl"), log(two / "log.jsonl")
    a, b = [r for r in a if "step" in r], [r for r in b if "step" in r]
    assert len(a) == 2 and all("eval/acc" in r for r in a)
    close_logs(a, b, ["pm/loss", "pm/grad_norm", "pm/acc", "eval/loss", "eval/acc",
                      "eval/mean_prob"])
    base = load_file(results["one"].parent / "base" / "model.safetensors")
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    close_weights(w1, w2, moved_from={k: base[k] for k in w1 if k in base})
    PreferenceModel.from_pretrained(str(two))                  # the sharded save loads


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_update_equal_one_process(results, strategy):
    one, two = results["one"], results["two"]
    a = json.loads((one / "ppo-ddp.json").read_text())
    b = json.loads((two / f"ppo-{strategy}.json").read_text())
    assert a["policy/epochs"] == b["policy/epochs"] == 2 and a["policy/approx_kl"] > 0
    assert (a["sharded"], b["sharded"]) == (False, strategy == "fsdp")
    for k in ("loss/total", "loss/policy", "loss/value", "loss/grad_norm", "policy/approx_kl",
              "policy/clipfrac", "val/error"):
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    close_weights(load_file(one / "ppo-ddp.safetensors"),
                  load_file(two / f"ppo-{strategy}.safetensors"),
                  moved_from=load_file(one / "ppo-ddp-initial.safetensors"))


def test_train_ppo_fsdp_saves_loadable_models(results):
    run = results["two"] / "run-fsdp"
    records = log(run / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    policy = LLaMA.from_pretrained(str(run / "policy"))
    value = PreferenceModel.from_pretrained(str(run / "value"))
    base = load_file(results["one"].parent / "base" / "model.safetensors")
    moved = max((p.detach() - base[f"model.{n}"]).abs().max().item()
                for n, p in policy.model.named_parameters())
    assert moved > 1e-5                                           # PPO trained the saved policy
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(policy(ids)).all() and torch.isfinite(value(ids)).all()
    assert os.path.exists(run / "policy" / "tokenizer.model")


# ----------------------------------------------------------------------------- train.py, sharded

# the 7B preset (bf16 frozen models, as a sharded 7B run loads them) cut to a tiny run
SMALL = ["--preset", "llama7b-harmless", "--pm.batch_size=4", "--pm.save_every=0",
         "--sft.batch_size=4", "--sft.epochs=1", "--sft.seq_len=64", "--sft.save_every=0",
         "--ppo.steps=1", "--ppo.rollout_batch_size=4", "--ppo.minibatch_size=4",
         "--ppo.gen_batch_size=4", "--ppo.max_new_tokens=6"]


def train_py(nproc, out, base, prompts, *args):
    """`train.py` on a tiny base (1 process, or torchrun with 2)."""
    cmd = [os.path.join(REPO, "train.py"), "--out", out, "--base", base,
           "--prompts", prompts, "--overwrite", *SMALL, *args]
    if nproc > 1:
        return torchrun(nproc, *cmd)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_train_py_stages_with_fsdp(tmp_path, tiny_tokenizer_path):
    """--stage pm / sft / ppo with --<stage>.strategy=fsdp at world sizes 1 and 2 write models
    that load: the 7B preset's settings on a tiny base, and a finished simulation's files
    written here."""
    base, out, prompts = tmp_path / "base", str(tmp_path / "out"), tmp_path / "prompts.jsonl"
    torch.manual_seed(0)
    LLaMA(LLaMAConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)).save_pretrained(base)
    shutil.copy(tiny_tokenizer_path, base / "tokenizer.model")
    run = os.path.join(out, "llama7b-harmless")
    os.makedirs(run)
    prefs = os.path.join(run, "prefs-rlcd.jsonl")
    sft_data = os.path.join(run, "sft-data.jsonl")
    with open(prompts, "w") as f, open(prefs, "w") as p, open(sft_data, "w") as d:
        for i, topic in enumerate(["bake bread", "pick a lock", "train a dog", "paint a wall"] * 4):
            prompt = f"\n\nHuman: How do I {topic}? ({i})\n\nAssistant:"
            f.write(json.dumps({"prompt": prompt}) + "\n")
            rec = dict(id=i, task="harmless", method="rlcd", prompt=prompt,
                       chosen="I can't help with that.", rejected="Sure, here is how.",
                       pos_prompt=prompt, neg_prompt=prompt, affix_index=0, label_prob=None)
            p.write(json.dumps(rec) + "\n")
            d.write(json.dumps({"id": i, "prompt": prompt, "response": rec["chosen"]}) + "\n")
    with open(prefs + ".done", "w") as f:      # the marker of a finished simulation (data.finish)
        json.dump({"sha256": hashlib.sha256(open(prefs, "rb").read()).hexdigest()}, f)
    # world 2 for every stage; world 1 (where fsdp is the identity) for PPO only, to keep time
    for nproc, stage, made in ((2, "pm", "pm-rlcd"), (2, "sft", "sft"), (2, "ppo", "ppo-rlcd"),
                               (1, "ppo", "ppo-rlcd")):
        shutil.rmtree(os.path.join(run, made), ignore_errors=True)
        train_py(nproc, out, base, prompts, "--stage", stage, f"--{stage}.strategy=fsdp")
        config = json.load(open(os.path.join(run, f"config-{stage}.json")))
        assert config["preset"][stage]["strategy"] == "fsdp"
        if stage == "pm":
            PreferenceModel.from_pretrained(os.path.join(run, made))
        else:
            LLaMA.from_pretrained(os.path.join(run, made, "policy" if stage == "ppo" else ""))
        if stage == "ppo":          # the value model was trained in fp32 from the bf16 PM
            value = PreferenceModel.from_pretrained(os.path.join(run, made, "value"))
            assert value.score.weight.abs().sum() > 0
