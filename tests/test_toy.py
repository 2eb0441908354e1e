"""Toy world: the oracles are exact on the world's replies (both attributes) and strict on
everything else, the corpus statistics match the ToyConfig knobs (counted from the text, not from
the generator's bookkeeping), the splits are pinned, disjoint and held out of the corpus, judge
documents are the simulator's scoring prompt, the tokenizer has LLaMA's ids, and the
affix-following check's plumbing works (a trained base is checked in tests/test_train.py)."""
import hashlib
import json
import os
import random
import re

import pytest
import torch

from nanorlcd import prompts, rlcd, toy
from nanorlcd.evaluate import affix_following
from nanorlcd.tokenizer import Tokenizer

PAPER_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "paper",
                             "prompts.json")
# a dialogue turn as text: request, optional affix, reply (up to the next human turn)
TURN = re.compile(r"\n\nHuman: (.*?)\n\nAssistant(?: (\([^)]*\)))?: (.*?)(?=\n\nHuman: |$)", re.S)
SCORING = re.compile(re.escape(prompts.RLAIF_SCORING_TEMPLATE)
                     .replace(r"\{prompt\}", "(?P<prompt>.*)")
                     .replace(r"\{instruction\}", "(?P<instruction>.*)")
                     .replace(r"\{response_a\}", "(?P<a>.*)")
                     .replace(r"\{response_b\}", "(?P<b>.*)") + r"(?P<answer>[AB])\)$", re.S)


HELP_AFFIXES = prompts.HELPFUL_POSITIVE_AFFIXES + prompts.HELPFUL_NEGATIVE_AFFIXES


def turns_of(n, seed=0, **knobs):
    """n dialogues as turn structures, drawn like the corpus draws them."""
    rng, cfg = random.Random(seed), toy.ToyConfig(**knobs)
    return [toy.sample_turns(rng, cfg) for _ in range(n)]


def parse_turns(doc):
    """A dialogue document -> [(prompt up to this turn's tag, affix or None, reply)], read from the
    text."""
    out = []
    for m in TURN.finditer(doc):
        prompt = doc[:m.start(3)].rstrip(" ")
        out.append((prompt, m.group(2), m.group(3)))
    return out


def follows(prompt, affix, reply):
    """Does a reply obey its affix? The harmlessness pairs speak about `judge`, the helpfulness pair
    about `judge_helpful`. Returns (attribute, obeyed)."""
    positive = affix in toy.POSITIVE_AFFIXES
    if affix in HELP_AFFIXES:
        wanted = "helpful" if positive else "unhelpful"
        return "helpful", toy.judge_helpful(prompt, reply) == wanted
    return "harmless", toy.judge(prompt, reply) == ("harmless" if positive else "harmful")


def test_world_size():
    assert len(set(toy.BENIGN_TOPICS)) >= 20 and len(set(toy.SENSITIVE_TOPICS)) >= 20
    assert not set(toy.BENIGN_TOPICS) & set(toy.SENSITIVE_TOPICS)
    assert len(toy.HUMAN_TEMPLATES) >= 4 and all(len(v) >= 3 for v in toy.REPLIES.values())
    assert toy.DETAILS.keys() == toy.REPLIES.keys()
    assert all(len(v) >= 3 for v in toy.DETAILS.values())
    # all 16 harmlessness pairs (and the helpfulness pair) tag the corpus
    assert toy.POSITIVE_AFFIXES[:16] == prompts.HARMLESS_POSITIVE_AFFIXES
    assert toy.NEGATIVE_AFFIXES[:16] == prompts.HARMLESS_NEGATIVE_AFFIXES


def test_every_request_names_exactly_its_topic():
    """No topic hides inside another request: the oracle's topic lookup is unambiguous."""
    for topic in toy.BENIGN_TOPICS + toy.SENSITIVE_TOPICS:
        for tmpl in toy.HUMAN_TEMPLATES:
            assert toy.last_topic("\n\nHuman: " + tmpl.format(t=topic) + "\n\nAssistant:") == topic


def test_judge_is_right_on_every_corpus_reply():
    """Every assistant turn of 2000 corpus dialogues: both oracle labels are the attributes the turn
    drew (independent truth: the turn structure, not the text)."""
    n = 0
    for turns in turns_of(2000):
        text = toy.render(turns)
        for k, turn in enumerate(turns):
            prompt = toy.render(turns, upto=k)
            reply = text[len(prompt):].split("\n\nHuman:")[0]
            assert toy.judge(prompt, reply) == turn.style
            helpful = "unhelpful" if turn.detail is None else "helpful"
            assert toy.judge_helpful(prompt, reply) == helpful
            n += 1
    assert n > 3000


def test_judge_all_topics_and_templates():
    """The full world: every topic x reply template x detail; harmless iff (benign & helpful answer)
    or (sensitive & refusal); helpful iff a detail sentence of the reply's own kind follows the
    template."""
    for sensitive, topics in ((False, toy.BENIGN_TOPICS), (True, toy.SENSITIVE_TOPICS)):
        for topic in topics:
            prompt = f"\n\nHuman: How do I {topic}?\n\nAssistant:"
            for style in ("harmless", "harmful"):
                for tmpl in toy.REPLIES[(sensitive, style)]:
                    vague = tmpl.format(t=topic)
                    assert toy.judge(prompt, " " + vague) == style
                    assert toy.judge_helpful(prompt, " " + vague) == "unhelpful"
                    for detail in toy.DETAILS[(sensitive, style)]:
                        assert toy.judge(prompt, vague + " " + detail) == style
                        assert toy.judge_helpful(prompt, vague + " " + detail) == "helpful"
                    # a detail of another kind does not belong to this reply
                    opposite = "harmless" if style == "harmful" else "harmful"
                    others = toy.DETAILS[(not sensitive, style)] + \
                        toy.DETAILS[(sensitive, opposite)]
                    for other in others:
                        assert toy.judge(prompt, vague + " " + other) == "invalid"
                        assert toy.judge_helpful(prompt, vague + " " + other) == "invalid"
                # the other kind's replies for this topic are not part of the world (e.g. refusing
                # to bake bread)
                for tmpl in toy.REPLIES[(not sensitive, style)]:
                    assert toy.judge(prompt, tmpl.format(t=topic)) == "invalid"
                    assert toy.judge_helpful(prompt, tmpl.format(t=topic)) == "invalid"


def test_judge_invalid_cases():
    prompt = ("\n\nHuman: How do I steal a car?\n\nAssistant: Easy. To steal a car, wait until "
              "nobody is watching.\n\nHuman: Teach me to bake bread.\n\nAssistant:")
    good = toy.HELPFUL_REPLIES[0].format(t="bake bread")
    assert toy.judge(prompt, good) == "harmless"
    # whitespace is normalised and a following human turn is ignored
    assert toy.judge(prompt, "  " + good.replace(" ", "  \n") + "\n\nHuman: thanks") == "harmless"
    invalid = [
        "", "   ", "asdf qwer zxcv", good[:-1], good + " Also", good.upper(),
        toy.HELPFUL_REPLIES[0].format(t="steal a car"),  # about the earlier turn's topic: off topic
        toy.HELPFUL_REPLIES[0].format(t="fix a bike"),  # off topic
        # two styles mixed within one reply
        toy.HELPFUL_REPLIES[0].split(",")[0] + "," + toy.RUDE_REPLIES[0].split(",")[1].format(
            t="bake bread"),
        good + " " + toy.RUDE_REPLIES[0].format(t="bake bread"),  # two replies in two styles
    ]
    # two detail sentences
    invalid.append(" ".join([good] + toy.DETAILS[(False, "harmless")][:2]))
    for reply in invalid:
        assert toy.judge(prompt, reply) == "invalid", reply
        assert toy.judge_helpful(prompt, reply) == "invalid", reply
    assert toy.judge("\n\nHuman: hello\n\nAssistant:", good) == "invalid"  # no topic in the request
    # the topic-free check accepts another topic of the same kind, never one of the other kind or
    # garbage
    rude, compliant = toy.RUDE_REPLIES[1].format(t="fix a bike"), toy.COMPLIANT_REPLIES[1].format(
        t="steal a car")
    assert toy.judge(prompt, rude, check_topic=False) == "harmful"
    assert toy.judge(prompt, compliant, check_topic=False) == "invalid"
    assert toy.judge(prompt, invalid[8], check_topic=False) == "invalid"


def test_splits_disjoint_and_plain():
    splits = {s: toy.split_prompts(s) for s in ("train", "validation", "test")}
    assert len(splits["test"]) >= 200 and len(splits["validation"]) >= 200
    assert len(splits["train"]) >= 1000
    for name, ps in splits.items():
        assert len(set(ps)) == len(ps), name
        for p in ps:
            assert p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:")
            assert "Assistant (" not in p and 1 <= p.count("\n\nHuman:") <= 3
            assert toy.last_topic(p) is not None
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])
    # deterministic: a second call gives the same list, and multi-turn prompts are well represented
    assert toy.split_prompts("test") == splits["test"]
    assert sum(p.count("\n\nHuman:") > 1 for p in splits["test"]) > 100
    with pytest.raises(ValueError, match="split"):
        toy.split_prompts("dev")


def test_splits_are_pinned():
    """Regression: the prompt splits are the ones every earlier run and README number used (toy
    world v2 changed the corpus draw; the splits must not move with it)."""
    text = json.dumps([toy.split_prompts(s) for s in ("train", "validation", "test")])
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "4a36e90050e25c2cdd6989a90ae8fa0e700797925b9804ccd7d02defcce381c5"


def test_corpus_holds_out_validation_and_test_prompts():
    """No corpus document contains a validation/test prompt, even with its affixes removed (judge
    documents: the dialogue inside the scoring prompt)."""
    held_out = set(toy.split_prompts("validation")) | set(toy.split_prompts("test"))
    docs = toy.generate_corpus(3000, seed=5)
    assert docs == toy.generate_corpus(3000, seed=5) and docs != toy.generate_corpus(3000, seed=6)
    n_judge = 0
    for doc in docs:
        m = SCORING.match(doc)
        if m:
            doc, n_judge = "\n\n" + m.group("prompt"), n_judge + 1
        for prompt, _, _ in parse_turns(doc):
            plain = re.sub(r"\n\nAssistant \([^)]*\):", "\n\nAssistant:", prompt)
            assert plain not in held_out
    assert n_judge > 100


def test_corpus_follow_rate_matches_p_follow():
    """Counted from the text with the oracles: an affixed turn obeys its affix at rate p_follow
    (harmlessness pairs through `judge`, the helpfulness pair through `judge_helpful`); the
    attribute its pair is not about, and both attributes under a plain tag, are 50/50; a share
    p_help of the affixed dialogues is about helpfulness."""
    for p_follow in (0.75, 0.9):
        cfg = toy.ToyConfig(p_follow=p_follow, p_judge_doc=0.0)
        obeyed, other, plain, n_docs, help_docs = {"harmless": [], "helpful": []}, [], [], 0, 0
        for doc in toy.generate_corpus(6000, seed=3, cfg=cfg):
            turns = parse_turns(doc)
            assert turns[-1][0] + " " + turns[-1][2] == doc  # the parse covers the whole document
            affixes = {a for _, a, _ in turns if a}
            n_docs += bool(affixes)
            help_docs += bool(affixes & set(HELP_AFFIXES))
            for prompt, affix, reply in turns:
                harm, helpful = toy.judge(prompt, reply), toy.judge_helpful(prompt, reply)
                assert harm != "invalid" and helpful != "invalid"
                if affix is None:
                    plain.append((harm == "harmless", helpful == "helpful"))
                    continue
                attribute, ok = follows(prompt, affix, reply)
                obeyed[attribute].append(ok)
                other.append(helpful == "helpful" if attribute == "harmless"
                             else harm == "harmless")
        rate = {k: sum(v) / len(v) for k, v in obeyed.items()}
        assert abs(rate["harmless"] - p_follow) < 0.02, rate
        assert abs(rate["helpful"] - p_follow) < 0.04, rate
        assert abs(sum(other) / len(other) - 0.5) < 0.03
        assert abs(sum(h for h, _ in plain) / len(plain) - 0.5) < 0.03
        assert abs(sum(d for _, d in plain) / len(plain) - 0.5) < 0.03
        assert abs(help_docs / n_docs - cfg.p_help) < 0.03
        assert abs(len(plain) / (len(plain) + len(other)) - cfg.p_plain) < 0.03


def test_corpus_p_stay_keeps_the_earlier_character():
    """A turn after an affixed turn whose own affix points the other way (RLCD's p+ / p- pattern)
    obeys it at rate (1 - p_stay) * p_follow; with p_stay = 0 (default) the earlier affix does not
    matter."""
    for p_stay in (0.0, 0.5):
        cfg = toy.ToyConfig(p_stay=p_stay, p_judge_doc=0.0, p_plain=0.0)
        contrast, single = [], []
        for doc in toy.generate_corpus(6000, seed=4, cfg=cfg):
            turns = parse_turns(doc)
            for k, (prompt, affix, reply) in enumerate(turns):
                ok = follows(prompt, affix, reply)[1]
                if k == 0:
                    single.append(ok)
                elif (turns[k - 1][1] in toy.POSITIVE_AFFIXES) != (affix in toy.POSITIVE_AFFIXES):
                    contrast.append(ok)
        assert abs(sum(single) / len(single) - cfg.p_follow) < 0.03
        rate = sum(contrast) / len(contrast)
        assert abs(rate - (1 - p_stay) * cfg.p_follow) < 0.03, (p_stay, rate, len(contrast))


def test_judge_documents_are_scoring_prompts_right_at_judge_skill():
    """Judge documents are rlcd.scoring_prompt's text + "A)" / "B)"; the two options differ in
    exactly the attribute the instruction asks about, and the answer names the better one at rate
    judge_skill. They make up a share p_judge_doc of the corpus."""
    for skill in (0.55, 0.9):
        cfg = toy.ToyConfig(judge_skill=skill, p_judge_doc=1.0)
        right, helpful = [], 0
        for doc in toy.generate_corpus(3000, seed=7, cfg=cfg):
            m = SCORING.match(doc)
            assert m, doc[:200]
            prompt = "\n\n" + m.group("prompt")
            scoring = rlcd.scoring_prompt(prompt, m.group("instruction"), m.group("a"),
                                          m.group("b"))
            assert doc == scoring + m.group("answer") + ")"
            if m.group("instruction") in prompts.HELPFUL_RLAIF_INSTRUCTIONS:
                oracle, better, helpful = toy.judge_helpful, "helpful", helpful + 1
            else:
                assert m.group("instruction") in prompts.HARMLESS_RLAIF_INSTRUCTIONS
                oracle, better = toy.judge, "harmless"
            a, b = oracle(prompt, m.group("a")), oracle(prompt, m.group("b"))
            assert a != b and "invalid" not in (a, b)
            right.append((m.group("answer") == "A") == (a == better))
        assert abs(sum(right) / len(right) - skill) < 0.03, (skill, sum(right) / len(right))
        assert abs(helpful / len(right) - cfg.p_help) < 0.03
    docs = toy.generate_corpus(6000, seed=8)
    share = sum(bool(SCORING.match(d)) for d in docs) / len(docs)
    assert abs(share - toy.ToyConfig().p_judge_doc) < 0.015


def test_config_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="ToyConfig.p_follow"):
        toy.ToyConfig(p_follow=1.5)
    with pytest.raises(ValueError, match="ToyConfig.judge_skill"):
        toy.ToyConfig(judge_skill=-0.1)


def test_apply_affixes_placement():
    p = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert prompts.apply_affixes(p, "(P)", "(N)") == \
        "\n\nHuman: a\n\nAssistant (N): b\n\nHuman: c\n\nAssistant (P):"
    assert prompts.apply_affixes("\n\nHuman: a\n\nAssistant:", "(P)", "(N)") == \
        "\n\nHuman: a\n\nAssistant (P):"
    with pytest.raises(ValueError, match="must end with"):
        prompts.apply_affixes("\n\nHuman: a", "(P)", "(N)")


@pytest.mark.skipif(not os.path.exists(PAPER_PROMPTS),
                    reason="the paper's prompts.json is not in this checkout")
def test_prompts_transcribed_exactly():
    paper = json.load(open(PAPER_PROMPTS))
    assert prompts.HARMLESS_POSITIVE_AFFIXES == paper["harmless"]["positive_affixes"]
    assert prompts.HARMLESS_NEGATIVE_AFFIXES == paper["harmless"]["negative_affixes"]
    assert prompts.HARMLESS_RLAIF_INSTRUCTIONS == paper["harmless"]["rlaif_instructions"]
    assert prompts.HELPFUL_POSITIVE_AFFIXES == paper["helpful"]["positive_affixes"]
    assert prompts.HELPFUL_NEGATIVE_AFFIXES == paper["helpful"]["negative_affixes"]
    assert prompts.HELPFUL_RLAIF_INSTRUCTIONS == paper["helpful"]["rlaif_instructions"]
    assert prompts.RLAIF_SCORING_TEMPLATE == paper["rlaif_scoring_prompt"]["template"]


def test_tokenizer_ids_and_round_trip(tmp_path):
    docs = toy.generate_corpus(1500, seed=0)
    path = toy.train_tokenizer(str(tmp_path), docs, vocab_size=500)
    assert os.path.basename(path) == "tokenizer.model"
    assert os.listdir(tmp_path) == ["tokenizer.model"]
    tok = Tokenizer(str(tmp_path))
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), tok.vocab_size) == (0, 1, 2, 500)
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    for doc in docs[:200] + ["unseen: é ✓ {}\t\\ tabs\n\n\nand newlines"]:
        ids = tok.encode(doc, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == doc
    # a prompt's tokens are a prefix of prompt + reply's tokens (what sampling and the SFT mask
    # rely on)
    for turns in turns_of(200, seed=3):
        prompt, full = toy.render(turns, upto=len(turns) - 1), toy.render(turns)
        assert tok.encode(full)[:len(tok.encode(prompt))] == tok.encode(prompt)
    # judge documents end in the very tokens the RLAIF simulator compares: "(" then A or B, then ")"
    a_id, b_id = rlcd.ab_token_ids(tok)
    judged = [d for d in docs if SCORING.match(d)]
    assert len(judged) > 50
    for doc in judged:
        ids = tok.encode(doc)
        assert ids[-2] == (a_id if doc.endswith("A)") else b_id) and tok.decode(ids[-1:]) == ")"


def test_affix_following_with_a_perfect_follower(monkeypatch):
    """The evaluation's plumbing, with `chat` replaced by an ideal base model: the final tag decides
    the attribute its pair is about (a plain tag -> harmful and vague), and p+ / p- must carry the
    mirror affix on every earlier tag."""
    def perfect_chat(model, tokenizer, dialogues, **kwargs):
        replies = []
        for d in dialogues:
            *earlier, final = [part.split(":")[0] for part in d.split("\n\nAssistant")[1:]]
            affix = final.strip()
            # (final, earlier) is one of the pairs, mirrored (the paper's negatives 4 and 15 are
            # the same string)
            pairs = set(zip(toy.POSITIVE_AFFIXES, toy.NEGATIVE_AFFIXES))
            assert not affix or all((affix, e.strip()) in pairs or (e.strip(), affix) in pairs
                                    for e in earlier)
            positive = affix in toy.POSITIVE_AFFIXES
            style = "harmless" if positive and affix not in HELP_AFFIXES else "harmful"
            sensitive = toy.last_topic(d) in toy.SENSITIVE_TOPICS
            reply = toy.REPLIES[(sensitive, style)][0].format(t=toy.last_topic(d))
            detailed = positive and affix in HELP_AFFIXES
            detail = " " + toy.DETAILS[(sensitive, style)][0] if detailed else ""
            replies.append(reply + detail)
        return replies

    monkeypatch.setattr("nanorlcd.sample.chat", perfect_chat)
    model = torch.nn.Linear(1, 1)  # only its device is read
    rates = affix_following(model, None, toy.split_prompts("test")[:50], batch_size=7)
    for name in ("pos/harmless", "neg/harmful", "help_pos/helpful", "help_neg/unhelpful", "valid",
                 "pos/follow", "neg/follow", "help_pos/follow", "help_neg/follow/style",
                 "valid/style"):
        assert rates[name] == 1.0, name
    assert rates["plain/harmless"] == rates["plain/helpful"] == 0.0
