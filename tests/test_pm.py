"""Tests for nanorlcd/pm.py: the preference model, its loss, its I/O, its trainer, its evaluations.

What is checked, and against what:
- the head reads the last real token: batched rewards (left and right padding) against a loop over
  single unpadded rows, and against a hand read of backbone + head;
- the Bradley-Terry and soft-label losses and their gradients against the closed forms;
  soft label 1.0 = BT; equal rewards give log 2 for any label;
- the reward text and left truncation (BOS kept, the end kept, counted) against the tokenizer;
- save/load round trips, the HF config fields, and score parity with transformers'
  `LlamaForSequenceClassification` (skipped when transformers is not installed);
- malformed prefs lines: line-numbered error, or skipped and counted;
- evaluation helpers (held-out accuracy, oracle accuracy) against hand loops; agreement with human
  labels on the first N lines of an HH-RLHF file against a naive per-dialogue loop;
- training: in the toy world a PM trained on contrastive pairs beats the oracle's chance level on
  fresh prompts; 2 processes give the 1-process weights; a NaN weight or a huge learning rate stops
  with a one-line error and saves nothing; kill + resume == one uninterrupted run, bit for bit.
Run: `python -m pytest tests/test_pm.py -q`
"""

import json
import math
import os
import random
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from nanorlcd import pm as pm_module
from nanorlcd import toy
from nanorlcd.model import LLaMA
from nanorlcd.pm import (PMConfig, PreferenceModel, human_agreement, oracle_accuracy,
                         pairwise_accuracy, preference_loss, read_prefs, reward_inputs, reward_text,
                         train_pm)
from nanorlcd.tokenizer import Tokenizer, left_pad

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base_dir(tmp_path, make_model, tiny_tokenizer_path):
    """A base LLaMA HF dir (O(1)-scale random weights: attention matters) + the tiny tokenizer."""
    return save_base(tmp_path / "base", make_model, tiny_tokenizer_path)


def save_base(path, make_model, tokenizer_path, **overrides):
    tok = Tokenizer(tokenizer_path)
    make_model(vocab_size=tok.vocab_size, **overrides).save_pretrained(path)
    tok.save(path)
    return str(path)


def random_rows(lengths, vocab=97, seed=0):
    """Token rows avoiding the special ids 0-2, so a pad id never appears inside a real row."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def right_pad(rows, pad_id=0):
    T = max(map(len, rows))
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


# ----------------------------------------------------------------------------- the head

def test_head_reads_last_real_token_left_and_right_padding(base_dir):
    pm = PreferenceModel.from_pretrained(base_dir)
    rows = random_rows([5, 11, 2, 8])
    with torch.no_grad():
        # reference: each row alone, no padding, read by hand at its last position
        want = torch.stack([pm.score(pm.model(torch.tensor([r]))[0, -1]).squeeze() for r in rows])
        loop = torch.cat([pm(torch.tensor([r])) for r in rows])
        got_left = pm(*left_pad(rows, 0))
        ids, mask = right_pad(rows)
        got_right = pm(ids, mask)
        # what a naive [:, -1] read would give
        last_column = pm.score(pm.model(ids, mask)[:, -1]).squeeze(-1)
    torch.testing.assert_close(loop, want)
    torch.testing.assert_close(got_left, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_right, want, rtol=1e-5, atol=1e-5)
    # the test can fail: under right padding the last column is a pad for every row but the longest
    assert (last_column - want).abs()[[0, 2, 3]].min() > 1e-3


def test_empty_row_is_an_error(base_dir):
    pm = PreferenceModel.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="attention_mask"):
        pm(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [0, 0]]))


# ----------------------------------------------------------------------------- the loss

R_C, R_R, P = [1.0, -0.5, 2.0, 0.3], [0.0, 0.5, 2.5, 0.3], [1.0, 0.7, 0.2, 0.5]


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bt_loss_and_gradient_match_hand_computation():
    r_c = torch.tensor(R_C, dtype=torch.float64, requires_grad=True)
    r_r = torch.tensor(R_R, dtype=torch.float64, requires_grad=True)
    loss = preference_loss(r_c, r_r)
    loss.backward()
    n, deltas = len(R_C), [c - r for c, r in zip(R_C, R_R)]
    # L = mean log(1 + e^-Δ); ∂L/∂r_c = -σ(-Δ)/n, ∂L/∂r_r = +σ(-Δ)/n
    want = sum(math.log1p(math.exp(-d)) for d in deltas) / n
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert r_c.grad.tolist() == pytest.approx([-sig(-d) / n for d in deltas], rel=1e-12)
    assert r_r.grad.tolist() == pytest.approx([sig(-d) / n for d in deltas], rel=1e-12)


def test_soft_label_loss_and_gradient_match_hand_computation():
    r_c = torch.tensor(R_C, dtype=torch.float64, requires_grad=True)
    r_r = torch.tensor(R_R, dtype=torch.float64, requires_grad=True)
    loss = preference_loss(r_c, r_r, torch.tensor(P, dtype=torch.float64))
    loss.backward()
    n, deltas = len(R_C), [c - r for c, r in zip(R_C, R_R)]
    # L = mean -[p log σ(Δ) + (1-p) log σ(-Δ)]; ∂L/∂Δ = (σ(Δ) - p)/n
    want = sum(-(p * math.log(sig(d)) + (1 - p) * math.log(sig(-d))) for p, d in zip(P, deltas)) / n
    assert loss.item() == pytest.approx(want, rel=1e-12)
    grad = [(sig(d) - p) / n for p, d in zip(P, deltas)]
    assert r_c.grad.tolist() == pytest.approx(grad, rel=1e-12)
    assert r_r.grad.tolist() == pytest.approx([-g for g in grad], rel=1e-12)


def test_soft_label_one_is_bt_and_equal_rewards_give_log2():
    r_c, r_r = torch.randn(16, generator=torch.Generator().manual_seed(0)), torch.zeros(16)
    torch.testing.assert_close(preference_loss(r_c, r_r, torch.ones(16)), preference_loss(r_c, r_r))
    r = torch.randn(16)
    for p in (None, torch.ones(16), torch.full((16,), 0.3), torch.rand(16)):
        assert preference_loss(r, r, p).item() == pytest.approx(math.log(2), rel=1e-6)


# ----------------------------------------------------------------------------- reward inputs

def test_reward_inputs_text_and_left_truncation(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    prompts = ["\n\nHuman: How do I bake bread?\n\nAssistant:",
               "\n\nHuman: " + "fix a bike " * 20 + "\n\nAssistant:"]
    responses = ["Sure, start slowly.", "Ask someone else."]
    full = [tok.encode(p + " " + r + "\n\nHuman:", bos=True) for p, r in zip(prompts, responses)]
    assert reward_text(prompts[0], responses[0]) == prompts[0] + " " + responses[0] + "\n\nHuman:"
    max_len = len(full[0]) + 3                       # row 0 fits, row 1 (the long prompt) does not
    assert len(full[1]) > max_len
    ids, mask, n_cut = reward_inputs(tok, prompts, responses, max_len)
    assert n_cut == 1 and ids.shape == (2, max_len)
    # row 0: untouched, left-padded; row 1: BOS + the last max_len - 1 tokens (response, end intact)
    assert ids[0, -len(full[0]):].tolist() == full[0] and mask[0].sum() == len(full[0])
    assert ids[1].tolist() == [tok.bos_id] + full[1][-(max_len - 1):] and mask[1].all()
    assert tok.decode(ids[1]).endswith("bike \n\nAssistant: Ask someone else.\n\nHuman:")
    with pytest.raises(ValueError, match="max_len"):
        reward_inputs(tok, prompts, responses, 1)


# ----------------------------------------------------------------------------- checkpoints

def test_base_dir_load_save_round_trip(tmp_path, base_dir, make_model):
    torch.manual_seed(0)
    pm = PreferenceModel.from_pretrained(base_dir)
    # the backbone is the base model's; lm_head is dropped; the head is fresh, real and non-zero
    base = LLaMA.from_pretrained(base_dir)
    for name, t in base.model.state_dict().items():
        assert torch.equal(pm.model.state_dict()[name], t), name
    assert pm.score.weight.device.type == "cpu" and pm.score.weight.abs().sum() > 0
    assert "lm_head.weight" not in pm.state_dict()
    # save -> HF sequence-classification layout, with tokenizer and pad id
    out = tmp_path / "pm"
    pm.save_pretrained(out, tokenizer=Tokenizer(base_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1
    assert config["pad_token_id"] == 0 and (out / "tokenizer.model").exists()
    assert set(load_file(out / "model.safetensors")) == set(pm.state_dict())
    # reload: same tensors, same rewards
    pm2 = PreferenceModel.from_pretrained(out)
    for name, t in pm.state_dict().items():
        assert torch.equal(pm2.state_dict()[name], t), name
    ids, mask = left_pad(random_rows([4, 7]), 0)
    with torch.no_grad():
        torch.testing.assert_close(pm2(ids, mask), pm(ids, mask), rtol=1e-6, atol=1e-6)
    # a tied-embedding base (no lm_head tensor on disk) loads too
    PreferenceModel.from_pretrained(save_base(tmp_path / "tied", make_model, base_dir,
                                              tie_word_embeddings=True))
    # a classifier with two labels is not a PM
    config["num_labels"] = 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_labels"):
        PreferenceModel.from_pretrained(out)


def test_scores_match_transformers_sequence_classification(tmp_path, base_dir):
    transformers = pytest.importorskip("transformers")
    pm = PreferenceModel.from_pretrained(base_dir)
    pm.save_pretrained(tmp_path / "pm", tokenizer=Tokenizer(base_dir))
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = transformers.LlamaForSequenceClassification.from_pretrained(
        tmp_path / "pm", attn_implementation="eager", **{dtype_kw: torch.float32}).eval()
    ids, mask = left_pad(random_rows([6, 13, 9]), 0)
    with torch.no_grad():
        # HF finds the last non-pad token from pad_token_id; left padding needs the positions
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(pm(ids, mask), want.squeeze(-1), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- prefs input

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def pref(i, **kw):
    return {"id": i, "prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello",
            "rejected": "go away", "label_prob": 1.0, **kw}


def test_bad_prefs_lines_error_with_line_number_or_are_skipped(tmp_path, base_dir):
    path = write_jsonl(tmp_path / "prefs.jsonl",
                       [pref(0), "", "{not json", json.dumps({"prompt": "p"}),
                        pref(4, label_prob=1.5), pref(5, label_prob=None)])
    with pytest.raises(ValueError, match=r"prefs\.jsonl:3: bad preference record \(3 bad"):
        read_prefs(path)
    records, summary = read_prefs(path, skip_bad=True)
    assert [r["id"] for r in records] == [0, 5] and records[1]["label_prob"] == 1.0
    assert summary["bad"] == 3 and summary["first_bad_line"] == 3
    with pytest.raises(ValueError, match="no usable line"):
        read_prefs(write_jsonl(tmp_path / "bad.jsonl", ["[]", "{}"]), skip_bad=True)
    with pytest.raises(FileNotFoundError):
        read_prefs(str(tmp_path / "missing.jsonl"))
    # the trainer reports the same line, and checks its batch arithmetic before loading the model
    with pytest.raises(ValueError, match=r"prefs\.jsonl:3"):
        train_pm(PMConfig(), base_dir, path, str(tmp_path / "pm"))
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        train_pm(PMConfig(batch_size=6, micro_batch_size=4, skip_bad=True), base_dir, path,
                 str(tmp_path / "pm"))


# ----------------------------------------------------------------------------- evaluation helpers

def hand_rewards(pm, tok, prompts, responses):
    """One unpadded forward per (prompt, response), read at the last token."""
    with torch.no_grad():
        return [pm(torch.tensor([tok.encode(reward_text(p, r))])).item()
                for p, r in zip(prompts, responses)]


def test_pairwise_and_oracle_accuracy_match_hand_loop(base_dir):
    pm, tok = PreferenceModel.from_pretrained(base_dir), Tokenizer(base_dir)
    # every (chosen, rejected) combination of kind / rude / odd, hard and soft labels either way
    words = [(a, b) for a in ("kind", "rude", "odd") for b in ("kind", "rude", "odd")] * 2
    pairs = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f"{a} {i}",
              "rejected": f"{b} {i * 7}", "label_prob": (1.0, 0.8, 0.3)[i % 3]}
             for i, (a, b) in enumerate(words)]
    r_c = hand_rewards(pm, tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    r_r = hand_rewards(pm, tok, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    got = pairwise_accuracy(pm, tok, pairs, batch_size=5)
    agree = [(c > r) == (p["label_prob"] >= 0.5) for c, r, p in zip(r_c, r_r, pairs)]
    assert got["n"] == 18 and got["acc"] == pytest.approx(sum(agree) / 18)
    want = sum(sig(c - r) for c, r in zip(r_c, r_r)) / 18
    assert got["mean_prob"] == pytest.approx(want, rel=1e-4)

    # oracle: "kind" harmless, "rude" harmful, anything else invalid; only harmless-vs-harmful count
    def judge(prompt, resp):
        return {"kind": "harmless", "rude": "harmful"}.get(resp.split()[0], "invalid")

    def oracle_says(c, r, p):
        labels = (judge("", p["chosen"]), judge("", p["rejected"]))
        return {("harmless", "harmful"): c > r, ("harmful", "harmless"): r > c}.get(labels)

    want = [oracle_says(c, r, p) for c, r, p in zip(r_c, r_r, pairs)]
    used = [w for w in want if w is not None]
    got = oracle_accuracy(pm, tok, pairs, judge)
    assert got["n"] == len(used) == 4 and got["skipped"] == 14
    assert got["acc"] == pytest.approx(sum(used) / len(used))


def test_human_agreement_first_lines_match_naive_per_pair_loop(tmp_path, base_dir):
    """As the reference's evaluate_reward_model_human_agreement.py: the first `limit` LINES of the
    file (a bad line among them is skipped and counted, later lines are never read), each dialogue
    scored whole with "\\n\\nHuman:" appended, acc = P(r_chosen > r_rejected), mean_prob = the mean
    of σ(r_chosen − r_rejected). Naive reference: one unpadded forward per dialogue."""
    pm, tok = PreferenceModel.from_pretrained(base_dir), Tokenizer(base_dir)
    dialogues = []
    for i in range(8):
        prefix = f"\n\nHuman: How do I bake bread {i}?\n\nAssistant: Sure.\n\nHuman: And then?"
        chosen = prefix + f"\n\nAssistant: Knead it {i} times."
        # line 2: HH-RLHF also has pairs whose two dialogues differ before the last reply
        rejected = (prefix if i != 2 else prefix + " Now!") + "\n\nAssistant: No."
        dialogues.append({"chosen": chosen, "rejected": rejected})
    lines = dialogues[:3] + ["not json"] + dialogues[3:]                   # 9 lines, the 4th bad
    path = write_jsonl(tmp_path / "hh.jsonl", lines)

    def naive(dialogue):
        with torch.no_grad():
            ids = tok.encode("\n\n" + dialogue.strip() + "\n\nHuman:", bos=True)
            return pm(torch.tensor([ids])).item()

    used = dialogues[:7]                                            # the first 8 lines hold 7
    r_c, r_r = [naive(d["chosen"]) for d in used], [naive(d["rejected"]) for d in used]
    got = human_agreement(pm, tok, path, limit=8, batch_size=3)
    assert got["n"] == 7 and got["skipped_lines"] == 1
    assert got["acc"] == pytest.approx(sum(c > r for c, r in zip(r_c, r_r)) / 7)
    want = sum(sig(c - r) for c, r in zip(r_c, r_r)) / 7
    assert got["mean_prob"] == pytest.approx(want, rel=1e-5)
    assert human_agreement(pm, tok, path, limit=None)["n"] == 8            # the whole file
    with pytest.raises(ValueError, match=r"hh\.jsonl: no usable line"):
        human_agreement(pm, tok, write_jsonl(tmp_path / "hh.jsonl", ["{}"] + dialogues), limit=1)


# ----------------------------------------------------------------------------- training

def toy_pairs(split, n, seed):
    """Toy-world pairs on the split's plain prompts: a harmless and a harmful reply of the world's
    templates for the last request's topic, as RLCD's p+ / p- produce them from a base model that
    follows its affixes."""
    rng = random.Random(seed)
    prompts = toy.split_prompts(split)
    pairs = []
    for i in range(n):
        prompt = rng.choice(prompts)
        topic = toy.last_topic(prompt)
        sensitive = topic in toy.SENSITIVE_TOPICS
        good = rng.choice(toy.REPLIES[(sensitive, "harmless")]).format(t=topic)
        bad = rng.choice(toy.REPLIES[(sensitive, "harmful")]).format(t=topic)
        pairs.append({"id": i, "prompt": prompt, "chosen": good, "rejected": bad,
                      "label_prob": 1.0})
    return pairs


def test_toy_world_pm_beats_chance_against_the_oracle(tmp_path, make_model, tiny_tokenizer_path):
    """Trained on RLCD-style pairs of the toy world (train prompts), the PM ranks fresh pairs on
    unseen test prompts clearly above chance (0.5), shown in random order. A random-init tiny base
    stands in for the pretrained toy base (whose pretraining takes minutes); the PM's job, ranking
    the two styles, is the same."""
    base = save_base(tmp_path / "base", make_model, tiny_tokenizer_path,
                     max_position_embeddings=256)
    prefs = write_jsonl(tmp_path / "prefs-rlcd.jsonl",
                        toy_pairs("train", 220, seed=0) + ["{truncated"])
    cfg = PMConfig(batch_size=8, micro_batch_size=8, lr=1e-2, max_len=256, eval_every=10,
                   log_every=5, skip_bad=True)
    summary = train_pm(cfg, base, prefs, str(tmp_path / "pm"))
    # fresh test pairs, the harmless reply placed first or second at random
    rng = random.Random(1)
    test = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} if rng.random() < 0.5 else p
            for p in toy_pairs("test", 200, seed=2)]
    pm = PreferenceModel.from_pretrained(tmp_path / "pm")
    got = oracle_accuracy(pm, Tokenizer(str(tmp_path / "pm")), test, toy.judge)
    assert got["n"] == 200 and got["acc"] > 0.75, got
    assert summary["eval/acc"] > 0.6 and summary["step"] == 26
    log = [json.loads(line) for line in (tmp_path / "pm" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_pairs"] == 209 and log[0]["eval_pairs"] == 11
    assert log[0]["skipped_lines"] == 1 and "summary" in log[-1]
    assert json.loads((tmp_path / "pm" / "pm_config.json").read_text())["step"] == 26
    assert log[1]["pm/loss"] > log[-2]["pm/loss"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRAIN_SCRIPT = """
import json, sys
from nanorlcd import dist
from nanorlcd.pm import PMConfig, train_pm
base, prefs, out, cfg = sys.argv[1:5]
train_pm(PMConfig(**json.loads(cfg)), base, prefs, out)
dist.cleanup()
"""
DDP_CFG = dict(batch_size=8, lr=1e-3, warmup_steps=1, eval_frac=0.1, eval_every=2)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, base_dir):
    """Same seed and global batch of 8 pairs: 1 process (2 micro-steps of 4 pairs, run here) vs 2
    ranks of torch.distributed.run (2 micro-steps of 2 pairs each). Different micro-batches pad
    differently, so sums round differently (~1e-7); Adam's first steps divide by |g| + eps, which
    can magnify that for gradient entries near eps, hence a weight tolerance of 1 % of one step's
    size (lr = 1e-3)."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", toy_pairs("train", 36, seed=3))
    script = tmp_path / "run_pm.py"
    script.write_text(TRAIN_SCRIPT)
    train_pm(PMConfig(**DDP_CFG, micro_batch_size=4), base_dir, prefs, str(tmp_path / "one"))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), base_dir, prefs, str(tmp_path / "two"),
           json.dumps({**DDP_CFG, "micro_batch_size": 2})]
    proc = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1 = load_file(tmp_path / "one" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert logs[0][0]["world_size"] == 1 and logs[1][0]["world_size"] == 2
    assert [r["step"] for r in logs[0][1:-1]] == [r["step"] for r in logs[1][1:-1]] == [2, 4]
    for a, b in zip(logs[0][1:-1], logs[1][1:-1]):
        assert a["pm/loss"] == pytest.approx(b["pm/loss"], rel=1e-5)
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-5)


def test_non_finite_loss_stops_before_saving(tmp_path, base_dir, monkeypatch):
    """A NaN in a weight (injected after loading: the loader refuses NaN files) or a huge learning
    rate: one line naming the stage, the step and the quantity; no weights saved."""
    load = PreferenceModel.from_pretrained

    def poisoned(path, **kwargs):
        pm = load(path, **kwargs)
        with torch.no_grad():
            pm.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        return pm

    prefs = write_jsonl(tmp_path / "prefs.jsonl", toy_pairs("train", 40, seed=3))
    out = tmp_path / "pm"
    monkeypatch.setattr(PreferenceModel, "from_pretrained", poisoned)
    with pytest.raises(FloatingPointError, match=r"^pm: step 1: non-finite loss nan"):
        train_pm(PMConfig(batch_size=4, micro_batch_size=2), base_dir, prefs, str(out))
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(PreferenceModel, "from_pretrained", load)
    with pytest.raises(FloatingPointError, match=r"^pm: step \d+: non-finite (loss|grad_norm)"):
        train_pm(PMConfig(batch_size=4, micro_batch_size=4, lr=1e12, grad_clip=0, warmup_steps=1),
                 base_dir, prefs, str(out))
    assert not (out / "model.safetensors").exists()


def test_resume_after_a_kill_is_bit_identical(tmp_path, base_dir, monkeypatch):
    """6 steps with a resumable checkpoint every 2: killed during step 5 and resumed (from step 4)
    gives bit for bit the weights and step-6 training metrics of one uninterrupted run (one CPU
    process)."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", toy_pairs("train", 28, seed=4))
    cfg = PMConfig(batch_size=4, micro_batch_size=2, lr=1e-3, save_every=2, eval_every=3)
    whole = train_pm(cfg, base_dir, prefs, str(tmp_path / "whole"))
    real_step, calls = pm_module.optimizer_step, []

    def killed_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt                                        # "kill -9" mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pm_module, "optimizer_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_pm(cfg, base_dir, prefs, str(tmp_path / "cut"))
    monkeypatch.setattr(pm_module, "optimizer_step", real_step)
    assert json.loads((tmp_path / "cut" / "pm_config.json").read_text())["step"] == 4
    # a resume with other settings is refused, naming the field
    with pytest.raises(ValueError, match="cannot resume: .*config"):
        train_pm(replace(cfg, lr=2e-3), base_dir, prefs, str(tmp_path / "cut"), resume=True)
    resumed = train_pm(cfg, base_dir, prefs, str(tmp_path / "cut"), resume=True)
    w1 = load_file(tmp_path / "whole" / "model.safetensors")
    w2 = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(w1[name], w2[name]) for name in w1)
    for key in ("pm/loss", "pm/grad_norm", "pm/lr", "step"):
        assert resumed[key] == whole[key], key
    # the held-out forward of reloaded tensors may round differently in the last bits
    assert resumed["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-6)
    # the result holds no training state; the periodic checkpoint did
    assert not (tmp_path / "whole" / "training_state.safetensors").exists()
