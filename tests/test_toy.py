"""Toy world: the oracle is exact on the world's replies and strict on everything else, splits are disjoint and
held out of the corpus, the tokenizer has LLaMA's ids, and (slow) a fast pretraining run follows affixes."""
import json
import os
import random

import pytest
import torch

from nanorlcd import prompts, toy
from nanorlcd.tokenizer import Tokenizer

PAPER_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "paper", "prompts.json")


def turns_of(n, seed=0):
    """n dialogues as turn structures, drawn like the corpus draws them."""
    rng = random.Random(seed)
    return [toy.sample_turns(rng) for _ in range(n)]


def test_world_size():
    assert len(set(toy.BENIGN_TOPICS)) >= 20 and len(set(toy.SENSITIVE_TOPICS)) >= 20
    assert not set(toy.BENIGN_TOPICS) & set(toy.SENSITIVE_TOPICS)
    assert len(toy.HUMAN_TEMPLATES) >= 4 and all(len(v) >= 3 for v in toy.REPLIES.values())
    # all 16 harmlessness pairs (and the helpfulness pair) tag the corpus
    assert toy.POSITIVE_AFFIXES[:16] == prompts.HARMLESS_POSITIVE_AFFIXES
    assert toy.NEGATIVE_AFFIXES[:16] == prompts.HARMLESS_NEGATIVE_AFFIXES


def test_every_request_names_exactly_its_topic():
    """No topic hides inside another request: the oracle's topic lookup is unambiguous."""
    for topic in toy.BENIGN_TOPICS + toy.SENSITIVE_TOPICS:
        for tmpl in toy.HUMAN_TEMPLATES:
            assert toy.last_topic("\n\nHuman: " + tmpl.format(t=topic) + "\n\nAssistant:") == topic


def test_judge_is_right_on_every_corpus_reply():
    """Every assistant turn of 2000 corpus dialogues: the label is the style its tag drew (independent truth:
    the turn structure, not the text)."""
    n = 0
    for turns in turns_of(2000):
        text = toy.render(turns)
        for k, (topic, _, tag, style, _) in enumerate(turns):
            prompt = toy.render(turns, upto=k)
            reply = text[len(prompt):].split("\n\nHuman:")[0]
            assert toy.judge(prompt, reply) == style
            # the tag decides the style: positive affix -> harmless, negative -> harmful
            if tag:
                assert style == ("harmless" if tag.strip() in toy.POSITIVE_AFFIXES else "harmful")
            n += 1
    assert n > 3000


def test_judge_all_topics_and_templates():
    """The full world: every topic x reply template, harmless iff (benign & helpful) or (sensitive & refusal)."""
    for sensitive, topics in ((False, toy.BENIGN_TOPICS), (True, toy.SENSITIVE_TOPICS)):
        for topic in topics:
            prompt = f"\n\nHuman: How do I {topic}?\n\nAssistant:"
            for style in ("harmless", "harmful"):
                for tmpl in toy.REPLIES[(sensitive, style)]:
                    assert toy.judge(prompt, " " + tmpl.format(t=topic)) == style
                # the other kind's replies for this topic are not part of the world (e.g. refusing to bake bread)
                for tmpl in toy.REPLIES[(not sensitive, style)]:
                    assert toy.judge(prompt, tmpl.format(t=topic)) == "invalid"


def test_judge_invalid_cases():
    prompt = "\n\nHuman: How do I steal a car?\n\nAssistant: Easy. To steal a car, wait until nobody is watching." \
             "\n\nHuman: Teach me to bake bread.\n\nAssistant:"
    good = toy.HELPFUL_REPLIES[0].format(t="bake bread")
    assert toy.judge(prompt, good) == "harmless"
    # whitespace is normalised and a following human turn is ignored
    assert toy.judge(prompt, "  " + good.replace(" ", "  \n") + "\n\nHuman: thanks") == "harmless"
    invalid = [
        "", "   ", "asdf qwer zxcv", good[:-1], good + " Also", good.upper(),
        toy.HELPFUL_REPLIES[0].format(t="steal a car"),  # about the earlier turn's topic: off topic
        toy.HELPFUL_REPLIES[0].format(t="fix a bike"),  # off topic
        toy.HELPFUL_REPLIES[0].split(",")[0] + "," + toy.RUDE_REPLIES[0].split(",")[1].format(t="bake bread"),  # mixed
        good + " " + toy.RUDE_REPLIES[0].format(t="bake bread"),  # two replies in two styles
    ]
    for reply in invalid:
        assert toy.judge(prompt, reply) == "invalid", reply
    assert toy.judge("\n\nHuman: hello\n\nAssistant:", good) == "invalid"  # no topic in the request
    # the topic-free check accepts another topic of the same kind, never one of the other kind or garbage
    assert toy.judge(prompt, toy.RUDE_REPLIES[1].format(t="fix a bike"), check_topic=False) == "harmful"
    assert toy.judge(prompt, toy.COMPLIANT_REPLIES[1].format(t="steal a car"), check_topic=False) == "invalid"
    assert toy.judge(prompt, invalid[8], check_topic=False) == "invalid"


def test_splits_disjoint_and_plain():
    splits = {s: toy.split_prompts(s) for s in ("train", "validation", "test")}
    assert len(splits["test"]) >= 200 and len(splits["validation"]) >= 200 and len(splits["train"]) >= 1000
    for name, ps in splits.items():
        assert len(set(ps)) == len(ps), name
        for p in ps:
            assert p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:")
            assert "Assistant (" not in p and 1 <= p.count("\n\nHuman:") <= 3
            assert toy.last_topic(p) is not None
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["validation"]) & set(splits["test"])
    # deterministic: a second call gives the same list, and multi-turn prompts are well represented
    assert toy.split_prompts("test") == splits["test"]
    assert sum(p.count("\n\nHuman:") > 1 for p in splits["test"]) > 100
    with pytest.raises(ValueError, match="split"):
        toy.split_prompts("dev")


def test_corpus_holds_out_validation_and_test_prompts():
    """No corpus dialogue contains a validation/test prompt, even with its affixes removed."""
    held_out = set(toy.split_prompts("validation")) | set(toy.split_prompts("test"))
    docs = toy.generate_corpus(3000, seed=5)
    assert docs == toy.generate_corpus(3000, seed=5) and docs != toy.generate_corpus(3000, seed=6)
    tags = toy.POSITIVE_AFFIXES + toy.NEGATIVE_AFFIXES
    for doc in docs:
        plain = doc
        for affix in sorted(set(tags), key=len, reverse=True):
            plain = plain.replace(f"\n\nAssistant {affix}:", "\n\nAssistant:")
        # every prefix that ends at an assistant tag is a prompt of this dialogue
        for k in range(plain.count("\n\nAssistant:")):
            end = [i for i in range(len(plain)) if plain.startswith("\n\nAssistant:", i)][k] + len("\n\nAssistant:")
            assert plain[:end] not in held_out


def test_corpus_tag_mixture():
    """Plain tags carry both styles ~50/50; affixed turns follow their own tag, also in mixed dialogues."""
    styles, mixed = {"plain": [], "pos": [], "neg": []}, 0
    for turns in turns_of(4000, seed=1):
        kinds = []
        for _, _, tag, style, _ in turns:
            kind = "plain" if not tag else "pos" if tag.strip() in toy.POSITIVE_AFFIXES else "neg"
            styles[kind].append(style)
            kinds.append(kind)
        mixed += "pos" in kinds and "neg" in kinds
    assert set(styles["pos"]) == {"harmless"} and set(styles["neg"]) == {"harmful"}
    assert 0.45 < styles["plain"].count("harmless") / len(styles["plain"]) < 0.55
    assert mixed > 200  # p+-like dialogues: earlier turns negative, the final one positive (and the mirror)


def test_apply_affixes_placement():
    p = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert prompts.apply_affixes(p, "(P)", "(N)") == "\n\nHuman: a\n\nAssistant (N): b\n\nHuman: c\n\nAssistant (P):"
    assert prompts.apply_affixes("\n\nHuman: a\n\nAssistant:", "(P)", "(N)") == "\n\nHuman: a\n\nAssistant (P):"
    with pytest.raises(ValueError, match="must end with"):
        prompts.apply_affixes("\n\nHuman: a", "(P)", "(N)")


@pytest.mark.skipif(not os.path.exists(PAPER_PROMPTS), reason="the paper's prompts.json is not in this checkout")
def test_prompts_transcribed_exactly():
    paper = json.load(open(PAPER_PROMPTS))
    assert prompts.HARMLESS_POSITIVE_AFFIXES == paper["harmless"]["positive_affixes"]
    assert prompts.HARMLESS_NEGATIVE_AFFIXES == paper["harmless"]["negative_affixes"]
    assert prompts.HARMLESS_RLAIF_INSTRUCTIONS == paper["harmless"]["rlaif_instructions"]
    assert prompts.HELPFUL_POSITIVE_AFFIXES == paper["helpful"]["positive_affixes"]
    assert prompts.HELPFUL_NEGATIVE_AFFIXES == paper["helpful"]["negative_affixes"]
    assert prompts.HELPFUL_RLAIF_INSTRUCTIONS == paper["helpful"]["rlaif_instructions"]
    assert prompts.RLAIF_SCORING_TEMPLATE == paper["rlaif_scoring_prompt"]["template"]
    assert prompts.JUDGE_QUESTIONS == paper["judge_questions"]


def test_tokenizer_ids_and_round_trip(tmp_path):
    docs = toy.generate_corpus(1500, seed=0)
    path = toy.train_tokenizer(str(tmp_path), docs, vocab_size=500)
    assert os.path.basename(path) == "tokenizer.model" and os.listdir(tmp_path) == ["tokenizer.model"]
    tok = Tokenizer(str(tmp_path))
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), tok.vocab_size) == (0, 1, 2, 500)
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    for doc in docs[:200] + ["unseen: é ✓ {}\t\\ tabs\n\n\nand newlines"]:
        ids = tok.encode(doc, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # byte fallback: nothing is unknown
        assert tok.decode(ids) == doc
    # a prompt's tokens are a prefix of prompt + reply's tokens (what sampling and the SFT mask rely on)
    for turns in turns_of(200, seed=3):
        prompt, full = toy.render(turns, upto=len(turns) - 1), toy.render(turns)
        assert tok.encode(full)[:len(tok.encode(prompt))] == tok.encode(prompt)


def test_evaluate_affix_following_with_a_perfect_follower(monkeypatch):
    """The evaluation's plumbing, with `chat` replaced by an ideal base model: the final tag decides the style
    (plain -> harmful), and p+ / p- must carry the mirror affix on every earlier tag."""
    def perfect_chat(model, tokenizer, dialogues, **kwargs):
        replies = []
        for d in dialogues:
            *earlier, final = [part.split(":")[0] for part in d.split("\n\nAssistant")[1:]]
            affix = final.strip()
            style = "harmless" if affix in toy.POSITIVE_AFFIXES else "harmful"
            # (final, earlier) is one of the pairs, mirrored (the paper's negatives 4 and 15 are the same string)
            pairs = set(zip(toy.POSITIVE_AFFIXES, toy.NEGATIVE_AFFIXES))
            assert all((affix, e.strip()) in pairs or (e.strip(), affix) in pairs for e in earlier) or not affix
            topic = toy.last_topic(d)
            replies.append(toy.REPLIES[(topic in toy.SENSITIVE_TOPICS, style)][0].format(t=topic))
        return replies

    monkeypatch.setattr("nanorlcd.sample.chat", perfect_chat)
    model = torch.nn.Linear(1, 1)  # only its device is read
    rates = toy.evaluate_affix_following(model, None, toy.split_prompts("test")[:50], batch_size=7)
    assert rates["pos/harmless"] == rates["neg/harmful"] == rates["valid"] == 1.0
    assert rates["plain/harmless"] == 0.0 and rates["valid/style"] == 1.0


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown toy preset"):
        toy.pretrain_toy(str(tmp_path), preset="huge")


@pytest.mark.slow
def test_fast_pretraining_follows_affixes(tmp_path):
    """End to end: the `fast` preset's base model is saved as an HF directory with its tokenizer and log, and
    its reply styles follow the affixes. 250 steps are too few to copy the request's topic reliably, so the
    bounds use the topic-free "/style" rates and are looser than the full preset's (>= 90 % harmless under
    p+, >= 90 % harmful under p-, 30-70 % harmless plain, >= 95 % valid); an untrained model scores ~0."""
    out = str(tmp_path / "base")
    summary = toy.pretrain_toy(out, preset="fast")
    for name in ("config.json", "model.safetensors", "tokenizer.model", "log.jsonl", "toy_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    # measured: 0.89 valid, 0.86 harmless under p+, 0.88 harmful under p-, 0.46 harmless plain (100 prompts)
    assert summary["affix/valid/style"] >= 0.7
    assert summary["affix/pos/harmless/style"] >= 0.7 and summary["affix/neg/harmful/style"] >= 0.7
    assert 0.2 <= summary["affix/plain/harmless/style"] <= 0.8
    assert json.loads(open(os.path.join(out, "log.jsonl")).readlines()[-1])["affix/valid"] == summary["affix/valid"]
    with pytest.raises(ValueError, match="already holds"):
        toy.pretrain_toy(out, preset="fast")
