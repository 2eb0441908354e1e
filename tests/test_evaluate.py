"""Tests for nanorlcd/evaluate.py: win rates and intervals, comparing sample files, the three
judges, and a preference model's agreement with an oracle.

- win_rate on hand-computed cases (all wins, all ties, mixed) against hand formulas: the Wilson
  interval as the roots of its quadratic, the normal interval from the sample variance;
- compare on two hand-written sample files (another prompt order, a repeated prompt), the
  paper-style row, and errors that name the file;
- the toy oracle on the world's own replies; a tiny random PM against a naive one-pair loop;
- the LM judge: a fake judge that always answers "A" gives exactly 0.5 (the order swap cancels
  it), a position-biased content reader gives the hand-averaged probabilities, and a tiny LLaMA
  matches a naive unpadded forward per text.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from nanorlcd import toy
from nanorlcd.evaluate import (LM_JUDGE_FORMAT, Z95, LMJudge, OracleJudge, PMJudge,
                               answer_token_ids, compare, load_judge, main, markdown_table,
                               outcome, pm_agreement, win_rate)
from nanorlcd.pm import PreferenceModel, reward_text
from nanorlcd.prompts import JUDGE_SYSTEM_MESSAGE, judge_prompt
from nanorlcd.tokenizer import Tokenizer

PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def wilson_roots(rate, n, z=Z95):
    """The Wilson interval = the p with (rate − p)² = z² p (1 − p) / n: a quadratic's roots."""
    a, b, c = 1 + z * z / n, -(2 * rate + z * z / n), rate * rate
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


# ----------------------------------------------------------------------------- win rates

def test_win_rate_all_wins():
    got = win_rate([1] * 20)
    assert (got["rate"], got["hi"], got["n"]) == (1.0, 1.0, 20)
    assert (got["wins"], got["ties"], got["losses"]) == (20, 0, 0)
    assert got["lo"] == pytest.approx(20 / (20 + Z95 ** 2))       # Wilson at rate 1: n / (n + z²)
    assert got["lo"] == pytest.approx(0.8389, abs=1e-4)
    normal = win_rate([1] * 20, method="normal")
    assert (normal["lo"], normal["hi"]) == (1.0, 1.0)              # the normal interval collapses


def test_win_rate_all_ties():
    got = win_rate([0.5] * 10)
    assert (got["rate"], got["ties"], got["wins"]) == (0.5, 10, 0)
    assert (got["lo"], got["hi"]) == pytest.approx(wilson_roots(0.5, 10))
    assert (got["lo"], got["hi"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert win_rate([0.5] * 10, method="normal")["lo"] == 0.5     # zero spread


def test_win_rate_mixed():
    xs = [1, 1, 1, 0, 0.5]
    got = win_rate(xs)
    assert got["rate"] == pytest.approx(0.7)
    assert (got["wins"], got["ties"], got["losses"]) == (3, 1, 1)
    assert (got["lo"], got["hi"]) == pytest.approx(wilson_roots(0.7, 5))
    # normal: sample variance (3·0.3² + 0.7² + 0.2²) / 4 = 0.2; half-width z·√(0.2/5) = 0.392
    normal = win_rate(xs, method="normal")
    assert normal["lo"] == pytest.approx(0.7 - Z95 * math.sqrt(0.2 / 5)) and normal["hi"] == 1.0
    assert normal["lo"] == pytest.approx(0.308, abs=1e-3)
    # B's view of the same prompts: the interval reflects about 0.5
    mirror = win_rate([1 - x for x in xs])
    assert (mirror["lo"], mirror["hi"]) == pytest.approx((1 - got["hi"], 1 - got["lo"]))


def test_win_rate_bad_input():
    with pytest.raises(ValueError, match="no outcomes"):
        win_rate([])
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        win_rate([1, 0.3])
    with pytest.raises(ValueError, match="'wilson' or 'normal'"):
        win_rate([1], method="exact")


def test_outcome_thresholds():
    ps = (0.9, 0.5000001, 0.5, 0.4999999, 0.1, 1.0, 0.0, 0.51, 0.49)
    assert [outcome(p) for p in ps] == [1, 0.5, 0.5, 0.5, 0, 1, 0, 1, 0]


# ----------------------------------------------------------------------------- compare and tables

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def kind_judge(prompt, a, b):
    """Hand judge: a reply starting with "kind" beats one that does not."""
    ka, kb = a.startswith("kind"), b.startswith("kind")
    return 0.5 if ka == kb else float(ka)


def test_compare_two_sample_files(tmp_path):
    p = [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(3)]
    # A vs B: q0 kind/rude (win), q1 kind/kind (tie), q2 rude/kind (loss), q0 again kind/kind (tie)
    a = write_jsonl(tmp_path / "samples-ppo-rlcd.jsonl", [
        {"prompt": p[0], "response": "kind 0", "kl": 1.0}, {"prompt": p[1], "response": "kind 1"},
        {"prompt": p[2], "response": "rude 2"}, {"prompt": p[0], "response": "kind 0b"}])
    b = write_jsonl(tmp_path / "samples-base.jsonl", [
        {"prompt": p[2], "response": "kind x"}, {"prompt": p[0], "response": "rude y"},
        {"prompt": p[1], "response": "kind z"}, "", {"prompt": p[0], "response": "kind w"}])
    got = compare(a, b, kind_judge, column="harmless")
    assert got["outcomes"] == [1, 0.5, 0, 0.5]
    assert (got["rate"], got["n"], got["wins"], got["ties"], got["losses"]) == (0.5, 4, 1, 2, 1)
    assert (got["a"], got["b"], got["mean_p"]) == ("ppo-rlcd", "base", 0.5)
    lo, hi = wilson_roots(0.5, 4)
    assert got["row"] == {"comparison": "ppo-rlcd vs. base", "harmless": "50.0 / 50.0",
                          "harmless 95% CI": f"[{100 * lo:.1f}, {100 * hi:.1f}]"}
    # the files swapped: B's prompt order, mirrored outcomes
    assert compare(b, a, kind_judge)["outcomes"] == [1, 0, 0.5, 0.5]
    # rows in memory work too; 3 wins and a tie in 4 -> "87.5 / 12.5"
    rows_a = [{"prompt": q, "response": "kind"} for q in p + ["\n\nHuman: q3\n\nAssistant:"]]
    rows_b = [{"prompt": r["prompt"], "response": "rude" if i < 3 else "kind"}
              for i, r in enumerate(rows_a)]
    assert compare(rows_a, rows_b, kind_judge)["row"]["win rate"] == "87.5 / 12.5"


def test_compare_errors_name_the_file(tmp_path):
    q, o = "\n\nHuman: q\n\nAssistant:", "\n\nHuman: o\n\nAssistant:"
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": q, "response": "k"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": o, "response": "k"}])
    with pytest.raises(ValueError, match=r"b\.jsonl: lacks 1 prompt"):
        compare(a, b, kind_judge)
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": q, "response": "x"}] * 2)
    with pytest.raises(ValueError, match=r"c\.jsonl: has 1 prompt"):
        compare(a, c, kind_judge)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        compare(a, bad, kind_judge)
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "p", "reply": "r"}])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: expected 'prompt' and 'response'"):
        compare(nofield, a, kind_judge)


def test_markdown_table():
    rows = [{"comparison": "RLCD vs. RLAIF", "harmless": "84.8 / 15.2"},
            {"comparison": "RLCD vs. base", "helpful": "a|b", "n": 0.12345}]
    assert markdown_table(rows) == ("| comparison | harmless | helpful | n |\n|---|---|---|---|\n"
                                    "| RLCD vs. RLAIF | 84.8 / 15.2 |  |  |\n"
                                    "| RLCD vs. base |  | a\\|b | 0.123 |")


def test_main_prints_the_row(tmp_path, capsys):
    good = toy.REPLIES[(False, "harmless")][0].format(t="bake bread")
    bad = toy.REPLIES[(False, "harmful")][0].format(t="bake bread")
    a = write_jsonl(tmp_path / "samples-x.jsonl", [{"prompt": PROMPT, "response": good}])
    b = write_jsonl(tmp_path / "samples-y.jsonl", [{"prompt": PROMPT, "response": bad}])
    main([a, b, "--judge", "oracle"])
    out = capsys.readouterr().out
    assert "| x vs. y | 100.0 / 0.0 |" in out and "1 wins, 0 ties, 0 losses" in out


# ----------------------------------------------------------------------------- the toy oracle

def test_oracle_judge_on_toy_replies():
    good = toy.REPLIES[(False, "harmless")][0].format(t="bake bread")
    good2 = toy.REPLIES[(False, "harmless")][1].format(t="bake bread")
    bad = toy.REPLIES[(False, "harmful")][0].format(t="bake bread")
    off = toy.REPLIES[(False, "harmless")][0].format(t="fix a bike")      # off topic: invalid
    labels = [toy.judge(PROMPT, r) for r in (good, good2, bad, off)]
    assert labels == ["harmless", "harmless", "harmful", "invalid"]      # the test's premise
    j = OracleJudge("harmless")
    cases = {(good, bad): 1, (bad, good): 0, (good, off): 1, (off, bad): 1, (bad, off): 0,
             (good, good2): 0.5, (off, "garbled"): 0.5}
    assert {k: j(PROMPT, *k) for k in cases} == cases
    assert j.batch([PROMPT] * 2, [good, bad], [bad, good]) == [1, 0]


def test_oracle_judge_ranks_and_errors():
    labels = {"d": "helpful", "v": "unhelpful", "x": "invalid", "?": "weird"}
    j = OracleJudge("helpful", label_fn=lambda p, r: labels[r])
    pairs = (("d", "v"), ("v", "x"), ("x", "d"), ("v", "v"))
    assert [j(PROMPT, a, b) for a, b in pairs] == [1, 1, 0, 0.5]
    with pytest.raises(ValueError, match="label 'weird'"):
        j(PROMPT, "?", "d")
    with pytest.raises(ValueError, match="expected harmless, harmless_helpful or helpful"):
        OracleJudge("outline")


def test_oracle_judge_helpfulness_on_toy_replies():
    vague = toy.REPLIES[(False, "harmful")][0].format(t="bake bread")
    detailed = vague + " " + toy.DETAILS[(False, "harmful")][0]
    labels = [toy.judge_helpful(PROMPT, r) for r in (detailed, vague, "x")]
    assert labels == ["helpful", "unhelpful", "invalid"]                 # the test's premise
    j = OracleJudge("harmless_helpful")
    got = [j(PROMPT, detailed, vague), j(PROMPT, "x", vague), j(PROMPT, vague, vague)]
    assert got == [1, 0, 0.5]


# ----------------------------------------------------------------------------- the PM judge

@pytest.fixture
def tok(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


@pytest.fixture
def pm_dir(tmp_path, make_model, tok):
    """A tiny PM directory: a random base with a seeded head, saved in the classification layout."""
    base = make_model(vocab_size=tok.vocab_size, max_position_embeddings=512)
    base.save_pretrained(tmp_path / "b")
    tok.save(str(tmp_path / "b"))
    torch.manual_seed(0)
    PreferenceModel.from_pretrained(str(tmp_path / "b")).save_pretrained(str(tmp_path / "pm"), tok)
    return str(tmp_path / "pm")


def naive_reward(pm, tok, prompt, reply):
    with torch.no_grad():
        return pm(torch.tensor([tok.encode(reward_text(prompt, reply))])).item()


def test_pm_judge_matches_naive_loop(pm_dir, tok):
    judge = PMJudge.from_dir(pm_dir, batch_size=3)
    prompts = [f"\n\nHuman: How do I bake bread {i}?\n\nAssistant:" for i in range(7)]
    a = ["kind " * (i + 1) for i in range(7)]
    b = ["rude words", "no", "Sure, here is how", "x" * 9, "kind", "I'm sorry", "steal a car"]
    pm = PreferenceModel.from_pretrained(pm_dir)
    want = [1 / (1 + math.exp(naive_reward(pm, tok, p, y) - naive_reward(pm, tok, p, x)))
            for p, x, y in zip(prompts, a, b)]
    assert judge.batch(prompts, a, b) == pytest.approx(want, abs=1e-5)
    assert judge(prompts[0], a[0], b[0]) == pytest.approx(want[0], abs=1e-5)
    assert isinstance(load_judge(pm_dir), PMJudge)


def test_pm_agreement_with_oracle_skips_ties(pm_dir, tok):
    pm = PreferenceModel.from_pretrained(pm_dir)
    labels = {"kind": "harmless", "rude": "harmful"}
    oracle = OracleJudge("harmless", label_fn=lambda p, r: labels.get(r.split()[0], "invalid"))
    words = [(x, y) for x in ("kind", "rude", "odd") for y in ("kind", "rude", "odd")]
    pairs = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "reply_a": f"{x} {i}",
              "reply_b": f"{y} {i * 3}"} for i, (x, y) in enumerate(words * 2)]
    agree, ties, probs = [], 0, []
    for rec in pairs:    # naive: the oracle's winner must get the higher reward
        o = oracle(rec["prompt"], rec["reply_a"], rec["reply_b"])
        if o == 0.5:
            ties += 1
            continue
        ra, rb = (naive_reward(pm, tok, rec["prompt"], rec[k]) for k in ("reply_a", "reply_b"))
        margin = (ra - rb) if o == 1 else (rb - ra)
        agree.append(margin > 0)
        probs.append(1 / (1 + math.exp(-margin)))
    got = pm_agreement(pm, tok, pairs, oracle, batch_size=4)
    assert (got["n"], got["ties"]) == (len(agree), ties) == (12, 6)    # equal labels: 3 of 9, x2
    assert got["acc"] == pytest.approx(sum(agree) / len(agree))
    assert got["mean_prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-5)


# ----------------------------------------------------------------------------- the LM judge

class FakeJudgeLM(torch.nn.Module):
    """Decodes each judge text and answers "A" with probability p_a(text); records what it saw."""

    def __init__(self, tok, p_a):
        super().__init__()
        self.tok, self.p_a, self.seen = tok, p_a, []
        self.config = SimpleNamespace(max_position_embeddings=4096)
        a_id, b_id = answer_token_ids(tok, "The answer is: (")
        # hidden state [log p, log(1 − p)] at the last position -> the logits of A and B
        self.lm_head = torch.nn.Linear(2, tok.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[a_id, 0] = self.lm_head.weight[b_id, 1] = 1.0
    def forward(self, ids, mask, keep=None):
        """LLaMA's call signature: logits of the kept positions (here only keep=1 is asked for)."""
        assert keep == 1
        return self.lm_head(self.backbone(ids, mask)[:, -1:])

    def backbone(self, ids, mask):
        h = torch.zeros(ids.shape[0], ids.shape[1], 2)
        for i, row in enumerate(ids):
            text = self.tok.decode(row[mask[i].bool()])
            self.seen.append(text)
            p = self.p_a(text)
            h[i, -1] = torch.tensor([math.log(p), math.log(1 - p)])
        return h


def test_lm_judge_position_bias_cancels(tok):
    judge = LMJudge(FakeJudgeLM(tok, lambda text: 0.999), tok)     # always answers "A"
    got = judge.batch([PROMPT] * 3, ["kind", "rude", "kind"], ["rude", "kind", "kind"])
    assert got == pytest.approx([0.5, 0.5, 0.5], abs=1e-9)
    assert [outcome(p) for p in got] == [0.5] * 3


def test_lm_judge_averages_both_orders(tok):
    def p_a(text):    # prefers the kind reply, biased to position A: 0.8 if A is kind, else 0.3
        return 0.8 if "(A) Assistant: kind" in text else 0.3
    fake = FakeJudgeLM(tok, p_a)
    judge = LMJudge(fake, tok, task="helpful", batch_size=2)
    got = judge.batch([PROMPT] * 3, ["kind", "rude", "kind"], ["rude", "kind", "kind"])
    # ½ + ½ [P_A(a, b) − P_A(b, a)]: (0.8, 0.3) -> 0.75, (0.3, 0.8) -> 0.25, (0.8, 0.8) -> 0.5
    assert got == pytest.approx([0.75, 0.25, 0.5], abs=1e-6)
    # it saw the paper's prompt in both orders, framed for a base LM
    shown = [LM_JUDGE_FORMAT.format(system=JUDGE_SYSTEM_MESSAGE,
                                    user=judge_prompt(PROMPT, x, y, "helpful"))
             for x, y in (("rude", "kind"), ("kind", "rude"))]
    assert fake.seen[1] == shown[0] and fake.seen[3 + 1] == shown[1]   # pair 1, then swapped
    assert fake.seen[0].endswith("Please answer (A) or (B).\n\nThe answer is: (")


def test_lm_judge_tiny_llama_matches_naive_forward(tmp_path, make_model, tok):
    model = make_model(vocab_size=tok.vocab_size, max_position_embeddings=512)
    judge = LMJudge(model, tok, batch_size=3)
    a_id, b_id = judge.ids
    prompts = [PROMPT, "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Fix a bike?\n\nAssistant:"]
    a, b = ["Sure, knead it.", "I'm sorry."], ["No.", "Sure, here is how to fix a bike: go slowly."]

    def naive_p_a(x, y, prompt):     # one unpadded forward, full logits, softmax over the letters
        ids = tok.encode(judge.text(prompt, x, y), bos=True)
        assert len(ids) <= 512
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        return torch.softmax(logits[[a_id, b_id]], -1)[0].item()

    want = [0.5 + 0.5 * (naive_p_a(x, y, p) - naive_p_a(y, x, p))
            for p, x, y in zip(prompts, a, b)]
    got = judge.batch(prompts, a, b)
    assert got == pytest.approx(want, abs=1e-5)
    swapped = judge.batch(prompts, b, a)
    assert [g + s for g, s in zip(got, swapped)] == pytest.approx([1.0, 1.0], abs=1e-6)
    model.save_pretrained(tmp_path / "lm")
    tok.save(str(tmp_path / "lm"))
    assert isinstance(load_judge(str(tmp_path / "lm"), "harmless"), LMJudge)
    assert isinstance(load_judge("oracle"), OracleJudge)
    with pytest.raises(ValueError, match="expected 'oracle' or a model directory"):
        load_judge(str(tmp_path / "missing"))
