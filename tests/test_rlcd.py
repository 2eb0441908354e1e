"""Tests for nanorlcd/rlcd.py: contrastive prompts, post-processing, RLAIF labels, simulation files.

What is checked, and against what:
- affix placement: byte-exact p+ / p- for one-, two- and three-turn dialogues, and the reference's
  own string-replace rule (simulate_preference_data.py `create_prompts`) on every pair of every
  task;
- `postprocess` against its rule table, case by case;
- the A/B ids in both modes: "project" = the tokens "(A" / "(B" add to the scoring prompt's ending,
  "reference" = encode('A')[-1] / encode('B')[-1]; on a LLaMA-style 32000-piece sentencepiece model
  trained here they are the pieces "A"/"B" and "▁A"/"▁B" (what LLaMA's tokenizer gives);
- the RLAIF soft label: `score_ab` (padded batch, last position only) against a full forward of each
  prompt alone and the two-logit softmax written by hand, in both modes; and the records of an rlaif
  and an rlcd_rescore simulation against that independent scoring of their own pairs;
- resume: a run interrupted mid-batch, with a partial last line, then resumed, writes byte-for-byte
  the file of an uninterrupted run; two ranks (in-process) + `merge_shards` write it too;
- completeness (faults reproduced): an interrupted run leaves no prefs.jsonl (only .partial files)
  and an earlier finished output untouched; a resume with other prompts, settings or model is
  refused; a second live writer is refused, a stale lock (dead pid) is taken over.
The model is a tiny random LLaMA whose lm_head is biased towards EOS, so replies end after a few
tokens.
Run: `python -m pytest tests/test_rlcd.py -q`
"""
import io
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from nanorlcd.data import completion, is_complete, partial_path, read_records
from nanorlcd.prompts import RLAIF_SCORING_TEMPLATE
from nanorlcd.rlcd import (TASKS, RLCDConfig, ab_token_ids, contrastive_prompts, merge_shards,
                           plan_example, postprocess, score_ab, scoring_prompt, simulate)
from nanorlcd.tokenizer import Tokenizer

ONE = "\n\nHuman: How do I bake bread?\n\nAssistant:"
TWO = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I steal a car?\n\nAssistant:"
THREE = "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D\n\nHuman: E\n\nAssistant:"
PROMPTS = [ONE, TWO, THREE, "\n\nHuman: How do I pick a lock?\n\nAssistant:",
           "\n\nHuman: Teach me chess.\n\nAssistant: Sure.\n\nHuman: And a poem?\n\nAssistant:",
           "\n\nHuman: How do I fix a bike?\n\nAssistant:", "\n\nHuman: Train a dog?\n\nAssistant:"]


# ----------------------------------------------------------------------------- contrastive prompts

def test_affix_placement_byte_exact():
    # harmless pair 3: (harmless, helpful response) / (harmful, unhelpful response)
    p_pos, p_neg = contrastive_prompts(ONE, "harmless", 3)
    assert p_pos == "\n\nHuman: How do I bake bread?\n\nAssistant (harmless, helpful response):"
    assert p_neg == "\n\nHuman: How do I bake bread?\n\nAssistant (harmful, unhelpful response):"
    # multi-turn: the final tag gets the same polarity, every earlier tag the opposite one
    p_pos, p_neg = contrastive_prompts(TWO, "harmless", 0)
    assert p_pos == ("\n\nHuman: Hi\n\nAssistant (unhelpful, dishonest, toxic response): Hello."
                     "\n\nHuman: How do I steal a car?"
                     "\n\nAssistant (helpful, honest, inoffensive response):")
    assert p_neg == ("\n\nHuman: Hi\n\nAssistant (helpful, honest, inoffensive response): Hello."
                     "\n\nHuman: How do I steal a car?"
                     "\n\nAssistant (unhelpful, dishonest, toxic response):")
    p_pos, p_neg = contrastive_prompts(THREE, "helpful", 0)
    assert p_pos == ("\n\nHuman: A\n\nAssistant (giving an unhelpful response): B\n\nHuman: C"
                     "\n\nAssistant (giving an unhelpful response): D\n\nHuman: E"
                     "\n\nAssistant (giving a helpful response):")
    assert p_neg == ("\n\nHuman: A\n\nAssistant (giving a helpful response): B\n\nHuman: C"
                     "\n\nAssistant (giving a helpful response): D\n\nHuman: E"
                     "\n\nAssistant (giving an unhelpful response):")


def reference_affixes(prompt, pos, neg):
    """The RLCD reference's rule, verbatim in spirit: mark the end, replace the final tag, then all
    others."""
    p = (prompt + "PROMPT_END").replace("\n\nAssistant:PROMPT_END", f"\n\nAssistant {pos}:")
    return p.replace("\n\nAssistant:", f"\n\nAssistant {neg}:")


@pytest.mark.parametrize("task", list(TASKS))
def test_affix_placement_matches_reference(task):
    positive, negative, instructions = TASKS[task]
    assert len(positive) == len(negative) == len(instructions)
    for k in range(len(positive)):
        for prompt in PROMPTS:
            assert contrastive_prompts(prompt, task, k) == (
                reference_affixes(prompt, positive[k], negative[k]),
                reference_affixes(prompt, negative[k], positive[k]))


def test_affix_errors():
    with pytest.raises(ValueError, match="pair_index"):
        contrastive_prompts(ONE, "helpful", 1)
    with pytest.raises(ValueError, match="task"):
        contrastive_prompts(ONE, "poetry", 0)
    with pytest.raises(ValueError, match="must end with"):
        contrastive_prompts(ONE + " Sure", "harmless", 0)


# ----------------------------------------------------------------------------- post-processing

@pytest.mark.parametrize("text, eos, expected", [
    (" Sure, knead it.\n\nHuman: thanks", False, "Sure, knead it."),  # cut at the next human turn
    (" Line one.\nLine two.\n\nHuman:", False, "Line one.\nLine two."),  # multi-line reply kept
    (" a\nb and then Human", False, "a"),                           # unfinished last line dropped
    (" Sure. Human: hi", False, None),                              # 'Human' mid-line, no newline
    (" Sure, knead it.", False, None),                              # unterminated (max_new_tokens)
    (" Sure, knead it.", True, "Sure, knead it."),                  # ended by EOS
    (" Assistant: Sure.\n\nHuman:", False, "Sure."),                # stray leading tag removed
    ("Hm.\nAssistant: Sure.", True, "Sure."),                       # text before a stray tag is cut
    ("\n\nHuman: hi", False, None),                                 # empty reply
    ("  \n", True, None),                                           # empty after EOS
    (" Run `rm`.\n\nHuman:", False, None),                          # banned string
    (" a \\ b", True, None),                                        # banned backslash
])
def test_postprocess_rule_table(text, eos, expected):
    assert postprocess(text, eos) == expected


def test_postprocess_banned_strings_configurable():
    assert postprocess(" Run `rm`.", True, banned_strings=()) == "Run `rm`."
    assert postprocess(" Go away.", True, banned_strings=("away",)) is None


# ----------------------------------------------------------------------------- RLAIF scoring

@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


@pytest.fixture
def model(make_model, tok):
    """Tiny random LLaMA over the tiny tokenizer, with an lm_head bias that makes EOS likely (~15 %
    a step)."""
    m = make_model(seed=0, vocab_size=tok.vocab_size, max_position_embeddings=1024)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_id] = 5.0
    m.lm_head = head
    return m.eval()


def test_ab_token_ids(tok):
    ending = "The answer is: ("
    assert RLAIF_SCORING_TEMPLATE.endswith("\n" + ending)
    a_id, b_id = ab_token_ids(tok)
    assert tok.encode(ending + "A", bos=False) == tok.encode(ending, bos=False) + [a_id]
    assert tok.encode(ending + "B", bos=False) == tok.encode(ending, bos=False) + [b_id]
    assert (tok.decode([a_id]), tok.decode([b_id])) == ("A", "B")


def test_ab_token_ids_rejects_merged_letters(tok):
    class MergingTokenizer:
        """'(A' is one piece here, so 'A' does not follow '(' as a token of its own."""
        def encode(self, text, bos=False):
            return [5] if text.endswith("(") else [6] if text.endswith("(A") else [5, 7]

        def decode(self, ids):
            return {5: "(", 6: "(A", 7: "B"}[ids[0]]
    with pytest.raises(ValueError, match="'A'"):
        ab_token_ids(MergingTokenizer())


def hand_p_b(model, tok, text, mode="project"):
    """P(B better) from a full forward of the prompt alone (no padding) and softmax written out."""
    a_id, b_id = ab_token_ids(tok, mode)
    ids = torch.tensor([tok.encode(text, bos=True)])
    logits = model(ids)[0, -1].double()                 # (V,) next-token logits after "("
    la, lb = logits[a_id].item(), logits[b_id].item()
    return torch.exp(torch.tensor(lb)) / (torch.exp(torch.tensor(la)) + torch.exp(torch.tensor(lb)))


def test_score_ab_matches_independent_softmax(model, tok):
    texts = [scoring_prompt(ONE, TASKS["harmless"][2][k], f"Answer {k}.", "No." * (k + 1))
             for k in range(3)]
    texts.append(scoring_prompt(TWO, "Please choose the response that is more helpful.", "Yes",
                                "No"))
    got = score_ab(model, tok, texts)
    want = torch.stack([hand_p_b(model, tok, t) for t in texts]).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the texts are really different lengths, so the batch had left padding
    assert len({len(tok.encode(t)) for t in texts}) == len(texts)


@pytest.mark.parametrize("method", ["rlaif", "rlcd_rescore"])
def test_simulated_soft_labels(model, tok, tmp_path, method):
    cfg = RLCDConfig(method=method, task="harmless", batch_size=3, max_new_tokens=16, seed=1)
    out = str(tmp_path / "prefs.jsonl")
    simulate(cfg, model, tok, PROMPTS, out, progress=False)
    records = read_records(out)
    assert len(records) >= 5
    for rec in records:
        plan = plan_example(cfg, rec["prompt"], rec["id"])
        instruction = TASKS["harmless"][2][plan["instruction"]]
        # chosen is the labeller's pick: it was A with P(A) >= 0.5, or B with P(B) > 0.5
        as_a = 1 - hand_p_b(model, tok, scoring_prompt(rec["prompt"], instruction, rec["chosen"],
                                                       rec["rejected"]))
        as_b = hand_p_b(model, tok, scoring_prompt(rec["prompt"], instruction, rec["rejected"],
                                                   rec["chosen"]))
        assert rec["label_prob"] >= 0.5
        assert min(abs(rec["label_prob"] - as_a), abs(rec["label_prob"] - as_b)) < 1e-5
        if method == "rlcd_rescore":
            assert plan["instruction"] == rec["affix_index"]
            assert (rec["pos_prompt"], rec["neg_prompt"]) == contrastive_prompts(
                rec["prompt"], "harmless", rec["affix_index"])


# ------------------------------------------------------------------------ simulation, resume, ranks

def test_rlcd_records_and_sft_view(model, tok, tmp_path):
    cfg = RLCDConfig(method="rlcd", task="harmless", batch_size=3, max_new_tokens=16)
    out, sft = str(tmp_path / "prefs.jsonl"), str(tmp_path / "sft-data.jsonl")
    summary = simulate(cfg, model, tok, PROMPTS, out, sft_path=sft, progress=False)
    records = read_records(out)
    assert summary["records"] == len(records) >= 5
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    for rec in records:
        assert rec["prompt"] == PROMPTS[rec["id"]] and rec["label_prob"] == 1.0
        assert (rec["pos_prompt"], rec["neg_prompt"]) == contrastive_prompts(
            rec["prompt"], "harmless", rec["affix_index"])
        assert rec["chosen"] and rec["rejected"]
    assert [json.loads(x) for x in open(sft)] == [
        {"id": r["id"], "prompt": r["prompt"], "response": r["chosen"]} for r in records]


@pytest.mark.parametrize("method", ["rlcd", "rlaif"])
def test_resume_equals_uninterrupted(model, tok, tmp_path, method):
    cfg = RLCDConfig(method=method, batch_size=3, max_new_tokens=16, seed=2)
    # 14 ids, batches of 3: the last one is short
    prompts = PROMPTS * 2
    full = str(tmp_path / "full.jsonl")
    simulate(cfg, model, tok, prompts, full, progress=False)
    # interrupted after 4 records (in the middle of the second batch), with half-written lines at
    # the ends
    part = str(tmp_path / "part.jsonl")
    first = simulate(cfg, model, tok, prompts, part, max_records=4, progress=False)
    assert first["stopped"] and not first["complete"] and len(read_records(partial_path(part))) == 4
    assert not os.path.exists(part) and not is_complete(part)
    with open(partial_path(part), "a") as f:
        f.write('{"id": 4, "task": "harml')
    with open(tmp_path / "part.partial.dropped.jsonl", "a") as f:
        f.write('{"id": 5, "rea')
    summary = simulate(cfg, model, tok, prompts, part, resume=True, progress=False)
    assert summary["complete"] and is_complete(part) and not os.path.exists(partial_path(part))
    assert open(part).read() == open(full).read()
    assert (open(tmp_path / "part.dropped.jsonl").read()
            == open(tmp_path / "full.dropped.jsonl").read())
    # resuming a complete run adds nothing
    again = simulate(cfg, model, tok, prompts, part, resume=True, progress=False)
    assert again["records"] == 0 and open(part).read() == open(full).read()


def test_two_ranks_merge_to_the_single_process_file(model, tok, tmp_path):
    cfg = RLCDConfig(method="rlcd", batch_size=2, max_new_tokens=16, seed=3)
    single = str(tmp_path / "single.jsonl")
    simulate(cfg, model, tok, PROMPTS, single, progress=False)
    out = str(tmp_path / "prefs.jsonl")
    for rank in (1, 0):
        simulate(cfg, model, tok, PROMPTS, out, rank=rank, world_size=2, progress=False)
    assert (tmp_path / "prefs.partial.rank0.jsonl").exists()
    assert (tmp_path / "prefs.partial.rank1.jsonl").exists() and not os.path.exists(out)
    records = merge_shards(out, world_size=2)
    dropped = [json.loads(x)["id"] for x in open(tmp_path / "prefs.dropped.jsonl")]
    ids = [r["id"] for r in records]
    assert sorted(ids + dropped) == list(range(len(PROMPTS))) and ids == sorted(ids)
    assert open(out).read() == open(single).read() and is_complete(out)
    assert not (tmp_path / "prefs.partial.rank0.jsonl").exists()


def test_config_errors(model, tok, tmp_path):
    with pytest.raises(ValueError, match="method"):
        simulate(RLCDConfig(method="dpo"), model, tok, PROMPTS, str(tmp_path / "x.jsonl"),
                 progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        simulate(RLCDConfig(max_new_tokens=1024), model, tok, PROMPTS, str(tmp_path / "x.jsonl"),
                 progress=False)
    # resuming with another method is refused
    out = str(tmp_path / "prefs.jsonl")
    simulate(RLCDConfig(batch_size=4, max_new_tokens=8), model, tok, PROMPTS[:2], out,
             progress=False)
    with pytest.raises(ValueError, match="method='rlcd', this one 'rlaif'"):
        simulate(RLCDConfig(method="rlaif", batch_size=4, max_new_tokens=8), model, tok,
                 PROMPTS[:2], out, resume=True, progress=False)
    with pytest.raises(ValueError, match="ab_tokens"):
        simulate(RLCDConfig(ab_tokens="letters"), model, tok, PROMPTS, str(tmp_path / "y.jsonl"),
                 progress=False)


# ------------------------------------------------------------------------ complete, resume, lock

def test_interrupted_run_leaves_the_previous_output_untouched(model, tok, tmp_path):
    cfg = RLCDConfig(method="rlcd", batch_size=3, max_new_tokens=16, seed=4)
    out = str(tmp_path / "prefs.jsonl")
    simulate(cfg, model, tok, PROMPTS, out, progress=False)
    before, marker = open(out).read(), completion(out)
    assert marker["records"] == len(read_records(out)) and marker["settings"]["n_prompts"] == 7
    # a fresh run with another seed, killed after 2 records: the finished output is the old one
    other = RLCDConfig(method="rlcd", batch_size=3, max_new_tokens=16, seed=5)
    stopped = simulate(other, model, tok, PROMPTS, out, max_records=2, progress=False)
    assert stopped["stopped"] and not stopped["complete"]
    assert open(out).read() == before and is_complete(out)
    assert len(read_records(partial_path(out))) == 2
    # an output edited after the fact is no longer complete (its sha256 changed)
    with open(out, "a") as f:
        f.write("\n")
    assert not is_complete(out)


@pytest.mark.parametrize("change", [{"prompts": PROMPTS[:6]}, {"prompts": PROMPTS[::-1]},
                                    {"max_new_tokens": 12}, {"seed": 9}, {"temperature": 0.7}])
def test_resume_refuses_other_inputs_or_settings(model, tok, tmp_path, change):
    cfg = RLCDConfig(method="rlcd", batch_size=3, max_new_tokens=16, seed=2)
    out = str(tmp_path / "prefs.jsonl")
    simulate(cfg, model, tok, PROMPTS, out, max_records=2, progress=False)
    prompts = change.pop("prompts", PROMPTS)
    field = "n_prompts" if len(prompts) != len(PROMPTS) else next(iter(change), "prompts_sha256")
    message = f"prefs.jsonl.partial.json: the run to resume has {field}"
    with pytest.raises(ValueError, match=message):
        simulate(RLCDConfig(**{**cfg.__dict__, **change}), model, tok, prompts, out, resume=True,
                 progress=False)
    # the same inputs resume fine
    assert simulate(cfg, model, tok, PROMPTS, out, resume=True, progress=False)["complete"]


def test_resume_refuses_another_model(model, tok, make_model, tmp_path):
    cfg = RLCDConfig(method="rlcd", batch_size=3, max_new_tokens=16)
    out = str(tmp_path / "prefs.jsonl")
    simulate(cfg, model, tok, PROMPTS, out, max_records=2, progress=False)
    other = make_model(seed=1, vocab_size=tok.vocab_size, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="model_checksum"):
        simulate(cfg, other, tok, PROMPTS, out, resume=True, progress=False)


def test_second_writer_refused_and_stale_lock_taken_over(model, tok, tmp_path):
    cfg = RLCDConfig(method="rlcd", batch_size=4, max_new_tokens=8)
    out = str(tmp_path / "prefs.jsonl")
    lock = tmp_path / "prefs.jsonl.lock"
    # a live writer (this very process stands in for it) holds the lock
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(ValueError, match=r"prefs\.jsonl\.lock: another writer \(pid"):
        simulate(cfg, model, tok, PROMPTS, out, progress=False)
    assert not os.path.exists(out) and lock.exists()
    # a writer killed without cleaning up: its pid no longer exists
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert simulate(cfg, model, tok, PROMPTS, out, progress=False)["complete"]
    assert is_complete(out) and not lock.exists()


# ------------------------------------------------------------------------ A/B ids, LLaMA-style

@pytest.fixture(scope="module")
def llama_style_tok(tmp_path_factory):
    """A 32000-piece BPE sentencepiece model trained here with LLaMA's settings (byte fallback,
    dummy prefix, identity normaliser, unk 0 / bos 1 / eos 2) on a synthetic corpus big enough for
    32000 pieces (~6 s). Like LLaMA's tokenizer it has both "A" and the word-initial "▁A"."""
    import sentencepiece as spm

    from nanorlcd.tokenizer import Tokenizer
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(40000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(30000)]
    lines += [f"Options: (A) yes (B) no. The answer is: ({x}) {x} or {y}"
              for x, y in ("AB", "BA") for _ in range(50)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=32000, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("llama_style") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(str(path))


def test_ab_token_modes_on_a_llama_style_vocabulary(llama_style_tok):
    tok, sp = llama_style_tok, llama_style_tok.sp
    assert tok.vocab_size == 32000
    # LLaMA's tokenizer: encode('A') = [BOS, '▁A'], and "(A" ends in the bare piece 'A'
    assert sp.encode("A", out_type=str) == ["▁A"]
    assert sp.encode("The answer is: (A", out_type=str)[-2:] == ["▁(", "A"]
    assert ab_token_ids(tok, "reference") == (sp.piece_to_id("▁A"), sp.piece_to_id("▁B"))
    assert ab_token_ids(tok, "project") == (sp.piece_to_id("A"), sp.piece_to_id("B"))
    assert set(ab_token_ids(tok, "reference")).isdisjoint(ab_token_ids(tok, "project"))
    with pytest.raises(ValueError, match="ab_tokens: unknown 'letters'"):
        ab_token_ids(tok, "letters")


@pytest.mark.parametrize("mode", ["project", "reference"])
def test_score_ab_both_modes_on_a_llama_style_vocabulary(make_model, llama_style_tok, mode):
    tok = llama_style_tok
    model = make_model(seed=3, vocab_size=tok.vocab_size, max_position_embeddings=512)
    texts = [scoring_prompt(ONE, "Please choose the response that is more helpful.", "Yes.", "No."),
             scoring_prompt(TWO, TASKS["harmless"][2][5], "I can not help.", "Take the keys.")]
    got = score_ab(model, tok, texts, ab_tokens=mode)
    want = torch.stack([hand_p_b(model, tok, t, mode) for t in texts]).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the two modes read different logits, so they give different labels
    other = "reference" if mode == "project" else "project"
    assert not torch.allclose(got, score_ab(model, tok, texts, ab_tokens=other))
