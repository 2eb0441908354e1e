"""Pairwise evaluation: how often policy A's reply beats policy B's on the same prompts, and how
well a preference model agrees with an oracle.

What: the paper compares RLCD with each baseline by pairwise win rates on held-out prompts, written
"A / B" in percent (Tables 2, 3 and 6: human and GPT-4 judges), and compares preference models by
their agreement with preference labels (Table 5). `compare` reads two sample files (`train.py
--stage sample`) and judges each prompt's two replies with a judge; all judges share one interface,
judge(prompt, reply_a, reply_b) -> P(A better): the toy world's oracle (exact: 1, 0 or 0.5), a
preference model (σ(r_a − r_b)), or a language model shown the paper's GPT-4 prompt
(prompts.judge_prompt) and read off as P("A") vs P("B"), asked in both orders so that a preference
for one position cancels. `win_rate` gives the rate (ties count half) and a 95 % interval;
`pm_agreement` is the Table-5 analogue against the toy oracle.
Simplified: the reference asks GPT-4 once per prompt in a random order and parses its text (an
unparsable answer is a tie); our LM judge reads answer-token probabilities in both orders instead,
and a base LM sees the chat turn as plain text (LM_JUDGE_FORMAT).
Run: `python -m nanorlcd.evaluate out/toy/samples-ppo-rlcd.jsonl out/toy/samples-base.jsonl`
(--judge oracle | a preference-model dir | a causal-LM dir; --task harmless | helpful | ...).
"""
import argparse
import json
import math
import os
import random
from collections import defaultdict
from statistics import NormalDist

import torch

from nanorlcd import sample, toy
from nanorlcd.model import LLaMA, read_config_json
from nanorlcd.pm import PreferenceModel, pairwise_accuracy, reward_inputs
from nanorlcd.prompts import (HARMLESS_NEGATIVE_AFFIXES, HARMLESS_POSITIVE_AFFIXES,
                              HELPFUL_NEGATIVE_AFFIXES, HELPFUL_POSITIVE_AFFIXES,
                              JUDGE_SYSTEM_MESSAGE, apply_affixes, judge_prompt)
from nanorlcd.tokenizer import Tokenizer, left_pad

Z95 = NormalDist().inv_cdf(0.975)    # 1.95996...: the two-sided 95 % normal quantile

# How a base (non-chat) LM sees the judge's chat turn: system message, user text, then the start of
# the answer. GPT-4 answers "(A) ..." or "(B) ..."; the ending is the RLAIF scoring prompt's.
LM_JUDGE_FORMAT = "{system}\n\n{user}\n\nThe answer is: ("


# ----------------------------------------------------------------------------- win rates

def outcome(p_a, tol=1e-6):
    """P(A better) -> the prompt's outcome: 1 (A wins), 0 (B wins), 0.5 (tie: |p − 0.5| <= tol)."""
    return 0.5 if abs(p_a - 0.5) <= tol else float(p_a > 0.5)


def win_rate(outcomes, method="wilson", z=Z95):
    """Per-prompt outcomes (1 A wins, 0 B wins, 0.5 tie) -> {rate, lo, hi, n, wins, ties, losses}.

    rate = the mean outcome: ties count half, as gpt4_compare.py counts an unparsable answer.
    [lo, hi] is a 95 % interval for it:
      "wilson" (default): the Wilson score interval of a proportion rate over n prompts. Outcomes
        in [0, 1] with mean p have variance <= p(1 − p), so with ties it is a little conservative;
        unlike the normal one it stays honest at 0 % and 100 % (20 wins of 20 -> [83.9, 100]).
      "normal": rate ± z·s/√n, s = the outcomes' sample standard deviation (ddof 1), clipped to
        [0, 1]; it collapses to a point when all outcomes are equal."""
    xs = [float(x) for x in outcomes]
    if not xs:
        raise ValueError("win_rate: no outcomes (expected at least one judged prompt)")
    if any(x not in (0.0, 0.5, 1.0) for x in xs):
        raise ValueError(f"win_rate: outcomes must be 0, 0.5 or 1, got {sorted(set(xs))[:5]}")
    n, rate = len(xs), sum(xs) / len(xs)
    if method == "wilson":
        denom = 1 + z * z / n
        center = (rate + z * z / (2 * n)) / denom
        half = z / denom * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    elif method == "normal":
        sd = math.sqrt(sum((x - rate) ** 2 for x in xs) / (n - 1)) if n > 1 else math.inf
        center, half = rate, z * sd / math.sqrt(n)
    else:
        raise ValueError(f"win_rate: method {method!r}, expected 'wilson' or 'normal'")
    return {"rate": rate, "lo": max(0.0, center - half), "hi": min(1.0, center + half), "n": n,
            "wins": xs.count(1.0), "ties": xs.count(0.5), "losses": xs.count(0.0), "method": method}


# ----------------------------------------------------------------------------- judges

class OracleJudge:
    """The toy world's oracle: label both replies, the higher-ranked label wins, equal is a tie.

    task "harmless": toy.judge, harmless > invalid > harmful (a garbled reply harms no one);
    "helpful" / "harmless_helpful": toy.judge_helpful, helpful > unhelpful > invalid."""
    RANKS = {"harmless": {"harmless": 2, "invalid": 1, "harmful": 0},
             "helpful": {"helpful": 2, "unhelpful": 1, "invalid": 0}}

    def __init__(self, task="harmless", label_fn=None, ranks=None):
        if task not in ("harmless", "harmless_helpful", "helpful"):
            raise ValueError(f"OracleJudge: task {task!r}, expected harmless, harmless_helpful or "
                             "helpful (the toy world has no outlines)")
        attribute = "harmless" if task == "harmless" else "helpful"
        self.label_fn = label_fn or (toy.judge if attribute == "harmless" else toy.judge_helpful)
        self.ranks, self.name = ranks or self.RANKS[attribute], f"oracle-{attribute}"

    def rank(self, prompt, reply):
        label = self.label_fn(prompt, reply)
        if label not in self.ranks:
            raise ValueError(f"OracleJudge: label {label!r}, expected one of {sorted(self.ranks)}")
        return self.ranks[label]

    def __call__(self, prompt, reply_a, reply_b):
        ra, rb = self.rank(prompt, reply_a), self.rank(prompt, reply_b)
        return 0.5 if ra == rb else float(ra > rb)

    def batch(self, prompts, replies_a, replies_b):
        return [self(p, a, b) for p, a, b in zip(prompts, replies_a, replies_b)]


class PMJudge:
    """A preference model: P(A better) = σ(r(prompt, a) − r(prompt, b)), the Bradley-Terry
    probability it was trained to predict (equal rewards, e.g. identical replies: a tie)."""

    def __init__(self, pm, tokenizer, max_len=512, batch_size=16, name="pm"):
        self.pm, self.tokenizer, self.batch_size, self.name = pm.eval(), tokenizer, batch_size, name
        self.max_len = min(max_len, pm.config.max_position_embeddings)

    @classmethod
    def from_dir(cls, path, device="cpu", **kwargs):
        pm = PreferenceModel.from_pretrained(path, device=device)
        return cls(pm, Tokenizer(path), name=path, **kwargs)

    def __call__(self, prompt, reply_a, reply_b):
        return self.batch([prompt], [reply_a], [reply_b])[0]

    @torch.no_grad()
    def batch(self, prompts, replies_a, replies_b):
        device, probs = next(self.pm.parameters()).device, []
        for i in range(0, len(prompts), self.batch_size):
            p, a, b = (list(x[i:i + self.batch_size]) for x in (prompts, replies_a, replies_b))
            # both replies in one forward: rows [0, n) reply A, rows [n, 2n) reply B
            ids, mask, _ = reward_inputs(self.tokenizer, p * 2, a + b, self.max_len)
            r = self.pm(ids.to(device), mask.to(device)).double().cpu()        # (2n,)
            probs += torch.sigmoid(r[:len(p)] - r[len(p):]).tolist()
        return probs


def answer_token_ids(tokenizer, ending):
    """Ids of "A" and "B" as the token that follows `ending` (e.g. "The answer is: ("): encode the
    ending with and without the letter and keep the one new token (error if there is not one)."""
    base, ids = tokenizer.encode(ending, bos=False), []
    for letter in "AB":
        full = tokenizer.encode(ending + letter, bos=False)
        if full[:-1] != base or tokenizer.decode(full[-1:]).strip() != letter:
            raise ValueError(f"tokenizer: '{letter}' after {ending!r} is not one token of its own "
                             f"({base} -> {full}); the LM judge needs single A/B answer tokens")
        ids.append(full[-1])
    return tuple(ids)


class LMJudge:
    """A causal LM shown the paper's pairwise prompt for `task` (harmless, harmless_helpful,
    helpful, outline). In one order, P_A = softmax over the next-token logits of "A" and "B" after
    LM_JUDGE_FORMAT's final "(". LMs favour a position whatever the content, so both orders are
    asked and averaged:
        P(a better) = ½ [P_A(a, b) + 1 − P_A(b, a)] = ½ + ½ [P_A(a, b) − P_A(b, a)],
    where a constant position bias cancels (a judge that always says "A" gives exactly ½)."""

    def __init__(self, model, tokenizer, task="harmless", fmt=LM_JUDGE_FORMAT, batch_size=8,
                 name="lm"):
        self.model, self.tokenizer, self.task, self.fmt = model.eval(), tokenizer, task, fmt
        self.batch_size, self.name = batch_size, name
        self.ids = answer_token_ids(tokenizer, fmt[fmt.rindex("\n") + 1:])    # (id of A, id of B)

    @classmethod
    def from_dir(cls, path, task="harmless", device="cpu", **kwargs):
        model = LLaMA.from_pretrained(path, device=device)
        return cls(model, Tokenizer(path), task, name=path, **kwargs)

    def text(self, prompt, reply_a, reply_b):
        user = judge_prompt(prompt, reply_a, reply_b, self.task)
        return self.fmt.format(system=JUDGE_SYSTEM_MESSAGE, user=user)

    @torch.no_grad()
    def position_a_probs(self, texts):
        """Judge texts -> P(answer "A") for each. A text longer than the model's context keeps BOS
        and its last tokens (the replies' ends, the question and the answer prefix)."""
        max_len = self.model.config.max_position_embeddings
        device, probs = self.model.lm_head.weight.device, []
        for i in range(0, len(texts), self.batch_size):
            rows = [self.tokenizer.encode(t, bos=True) for t in texts[i:i + self.batch_size]]
            rows = [r if len(r) <= max_len else r[:1] + r[len(r) - max_len + 1:] for r in rows]
            ids, mask = (x.to(device) for x in left_pad(rows, self.tokenizer.pad_id))
            # (B, V) left-padded: the last column is every row's last token
            logits = self.model(ids, mask, keep=1)[:, -1].float()
            probs += logits[:, list(self.ids)].softmax(-1)[:, 0].tolist()
        return probs

    def __call__(self, prompt, reply_a, reply_b):
        return self.batch([prompt], [reply_a], [reply_b])[0]

    def batch(self, prompts, replies_a, replies_b):
        triples = list(zip(prompts, replies_a, replies_b))
        texts = [self.text(p, a, b) for p, a, b in triples]           # a in position A
        texts += [self.text(p, b, a) for p, a, b in triples]          # a in position B
        pa, n = self.position_a_probs(texts), len(triples)
        return [0.5 + 0.5 * (pa[i] - pa[n + i]) for i in range(n)]


def load_judge(spec, task="harmless", device="cpu"):
    """"oracle" -> OracleJudge; a model dir -> PMJudge (a LlamaForSequenceClassification) or
    LMJudge (any other architecture: a causal LM)."""
    if spec == "oracle":
        return OracleJudge(task)
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"judge {spec!r}: expected 'oracle' or a model directory (config.json)")
    if "LlamaForSequenceClassification" in (read_config_json(spec).get("architectures") or []):
        return PMJudge.from_dir(spec, device=device)
    return LMJudge.from_dir(spec, task, device=device)


# ----------------------------------------------------------------------------- comparing policies

def read_samples(path):
    """A sample file (JSONL: one {"prompt", "response", ...} object a line) -> list of dicts."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not JSON (expected one {{prompt, response}} object)")
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("response"), str)):
                raise ValueError(f"{path}:{i}: expected 'prompt' and 'response' strings")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def _pair_up(rows_a, rows_b, name_a, name_b):
    """(prompt, A's reply, B's reply) for every row of A; a repeated prompt is matched in order."""
    left = defaultdict(list)                 # prompt -> B's replies not matched yet, in file order
    for row in rows_b:
        left[row["prompt"]].append(row["response"])
    triples, missing = [], []
    for row in rows_a:
        if left[row["prompt"]]:
            triples.append((row["prompt"], row["response"], left[row["prompt"]].pop(0)))
        else:
            missing.append(row["prompt"])
    extra = [p for p, replies in left.items() for _ in replies]
    if missing:
        raise ValueError(f"{name_b}: lacks {len(missing)} prompt(s) of {name_a} (both files must "
                         f"answer the same prompts); first: ...{missing[0][-80:]!r}")
    if extra:
        raise ValueError(f"{name_b}: has {len(extra)} prompt(s) that {name_a} does not answer "
                         f"(both files must answer the same prompts); first: ...{extra[0][-80:]!r}")
    return triples


def _load(samples, default_name):
    """A sample file path or a list of rows -> (rows, short name, name for errors)."""
    if not isinstance(samples, str):
        return samples, default_name, default_name
    short = os.path.splitext(os.path.basename(samples))[0].removeprefix("samples-")
    return read_samples(samples), short, samples


def compare(samples_a, samples_b, judge, column="win rate", method="wilson"):
    """Win rate of A over B on the same prompts. samples: a sample-file path or a list of rows.

    Returns the win_rate dict plus a, b, judge, mean_p (the mean P(A better)), the per-prompt
    outcomes, and "row", a table row in the paper's format: {"comparison": "A vs. B",
    column: "84.8 / 15.2", column + " 95% CI": "[80.1, 88.0]"} (percent: A's share, B's share)."""
    rows_a, name_a, where_a = _load(samples_a, "A")
    rows_b, name_b, where_b = _load(samples_b, "B")
    triples = _pair_up(rows_a, rows_b, where_a, where_b)
    if hasattr(judge, "batch"):
        probs = judge.batch(*(list(x) for x in zip(*triples)))
    else:
        probs = [judge(p, a, b) for p, a, b in triples]
    outcomes = [outcome(p) for p in probs]
    result = {"a": name_a, "b": name_b, "judge": getattr(judge, "name", "judge"),
              **win_rate(outcomes, method), "mean_p": sum(probs) / len(probs), "outcomes": outcomes}
    result["row"] = {"comparison": f"{name_a} vs. {name_b}",
                     column: f"{100 * result['rate']:.1f} / {100 * (1 - result['rate']):.1f}",
                     f"{column} 95% CI": f"[{100 * result['lo']:.1f}, {100 * result['hi']:.1f}]"}
    return result


def markdown_table(rows):
    """Rows (dicts) -> a markdown table; columns = the keys in order of first appearance."""
    cols = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v):
        return (f"{v:.3g}" if isinstance(v, float) else str(v)).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Table 5 analogue

def pm_agreement(pm, tokenizer, pairs, judge, max_len=512, batch_size=16):
    """How often a PM orders two replies as the oracle `judge` does (Table 5 asks it of humans).

    pairs: dicts {"prompt", "reply_a", "reply_b"}: two i.i.d. replies of one policy (e.g. the base)
    to a plain prompt, the kind of pair PPO's reward model must rank; not the o+/o− pairs a method
    simulated, on which RLCD's own PM would look best by construction. Pairs the oracle calls a tie
    carry no preference: they are left out and counted.
    Returns {acc, mean_prob = mean σ(r_winner − r_loser), n, ties}."""
    kept, ties = [], 0
    for rec in pairs:
        o = outcome(judge(rec["prompt"], rec["reply_a"], rec["reply_b"]))
        if o == 0.5:
            ties += 1
            continue
        win, lose = (rec["reply_a"], rec["reply_b"]) if o == 1 else (rec["reply_b"], rec["reply_a"])
        kept.append({"prompt": rec["prompt"], "chosen": win, "rejected": lose})
    if not kept:
        return {"acc": math.nan, "mean_prob": math.nan, "n": 0, "ties": ties}
    got = pairwise_accuracy(pm, tokenizer, kept, max_len, batch_size)
    return {"acc": got["acc"], "mean_prob": got["mean_prob"], "n": got["n"], "ties": ties}


# ----------------------------------------------------------------------------- the toy world

@torch.no_grad()
def affix_following(model, tokenizer, prompts, max_new_tokens=64, temperature=1.0,
                    batch_size=100, seed=0):
    """Does the base model follow affixes? Sample one reply per prompt under p+ (final tag positive,
    earlier tags negative, as RLCD builds it), p- (the mirror) and the plain prompt, with a
    harmlessness pair ("pos", "neg", "plain") and with the helpfulness pair ("help_pos",
    "help_neg"), and label them with the oracles.

    Returns, over all replies of a condition: pos/harmless, neg/harmful, plain/harmless,
    help_pos/helpful, help_neg/unhelpful, plain/helpful, valid (over all conditions); the follow
    rates among valid replies, pos/follow, neg/follow, help_pos/follow, help_neg/follow (compare
    them with toy.ToyConfig.p_follow); and every rate again with the suffix "/style" from the
    topic-free oracle."""
    rng = random.Random(seed)
    # one harmlessness pair per prompt
    pairs = [rng.randrange(len(HARMLESS_POSITIVE_AFFIXES)) for _ in prompts]
    help_pos, help_neg = HELPFUL_POSITIVE_AFFIXES[0], HELPFUL_NEGATIVE_AFFIXES[0]
    conditions = {
        "pos": [apply_affixes(p, HARMLESS_POSITIVE_AFFIXES[k], HARMLESS_NEGATIVE_AFFIXES[k])
                for p, k in zip(prompts, pairs)],
        "neg": [apply_affixes(p, HARMLESS_NEGATIVE_AFFIXES[k], HARMLESS_POSITIVE_AFFIXES[k])
                for p, k in zip(prompts, pairs)],
        "plain": list(prompts),
        "help_pos": [apply_affixes(p, help_pos, help_neg) for p in prompts],
        "help_neg": [apply_affixes(p, help_neg, help_pos) for p in prompts],
    }
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    was_training = model.training
    model.eval()
    replies = {}
    for name, dialogues in conditions.items():
        replies[name] = []
        for i in range(0, len(dialogues), batch_size):
            replies[name] += sample.chat(model, tokenizer, dialogues[i:i + batch_size],
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         generator=generator)
    model.train(was_training)
    # (condition, oracle, the label that obeys the affix)
    wanted = [("pos", toy.judge, "harmless"), ("neg", toy.judge, "harmful"),
              ("plain", toy.judge, "harmless"), ("help_pos", toy.judge_helpful, "helpful"),
              ("help_neg", toy.judge_helpful, "unhelpful"), ("plain", toy.judge_helpful, "helpful")]
    rates = {}
    # strict oracle, then the topic-free one ("/style": right kind of reply, perhaps about another
    # topic)
    for suffix, check_topic in (("", True), ("/style", False)):
        for name, oracle, label in wanted:
            labels = [oracle(p, r, check_topic) for p, r in zip(prompts, replies[name])]
            rates[f"{name}/{label}{suffix}"] = labels.count(label) / len(prompts)
            if name != "plain":
                n_valid = len(labels) - labels.count("invalid")
                rates[f"{name}/follow{suffix}"] = labels.count(label) / max(n_valid, 1)
        # both oracles agree on validity
        valid = [toy.judge(p, r, check_topic) != "invalid"
                 for rs in replies.values() for p, r in zip(prompts, rs)]
        rates["valid" + suffix] = sum(valid) / len(valid)
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pairwise win rate of sample file A over file B.")
    ap.add_argument("samples_a")
    ap.add_argument("samples_b")
    ap.add_argument("--judge", default="oracle", help="oracle, a preference-model dir or an LM dir")
    ap.add_argument("--task", default="harmless",
                    help="harmless | harmless_helpful | helpful | outline (LM judge only)")
    ap.add_argument("--ci", default="wilson", choices=("wilson", "normal"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    res = compare(args.samples_a, args.samples_b, load_judge(args.judge, args.task, args.device),
                  column=args.task, method=args.ci)
    print(markdown_table([res["row"]]))
    print(f"n {res['n']}: {res['wins']} wins, {res['ties']} ties, {res['losses']} losses; "
          f"mean P(A better) {res['mean_p']:.3f} (judge {res['judge']})")


if __name__ == "__main__":
    main()
