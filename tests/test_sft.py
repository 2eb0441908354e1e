"""SFT trainer: the response-only loss equals a hand computation (packed rows, one example per
row, token- or example-weighted), the reference's end marker is in the target and under the loss,
packing keeps every example whole, gradient accumulation changes nothing, the warmup resolves from a
ratio, a non-finite loss stops training before anything is saved, a checkpoint round-trips, and
kill + resume equals one uninterrupted run."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nanorlcd import sft, toy
from nanorlcd.data import read_sft_data, write_sft_data
from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    toy.train_tokenizer(str(d), toy.generate_corpus(1000, seed=0), vocab_size=400)
    return Tokenizer(str(d))


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512))


def examples(n, seed=0):
    """(prompt, response) pairs from the toy world: the last turn's reply is the response."""
    out = []
    for doc in toy.generate_corpus(n, seed=seed):
        # the end of the last assistant tag (affixes hold no ":")
        cut = doc.index(":", doc.rindex("\n\nAssistant")) + 1
        out.append((doc[:cut], doc[cut:].strip()))
    return out


def test_tokenize_example_masks_exactly_the_response(tok):
    for prompt, response in examples(50):
        ids, mask = sft.tokenize_example(tok, prompt, response, seq_len=1000)
        n_prompt = len(tok.encode(prompt, bos=True))
        assert ids == tok.encode(prompt + " " + response, bos=True, eos=True)
        assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
        assert tok.decode(ids[n_prompt:]).strip() == response and ids[-1] == tok.eos_id
    # pretraining: an empty prompt puts every token but BOS under the loss
    ids, mask = sft.tokenize_example(tok, "", "hello world", seq_len=200)
    assert ids[0] == tok.bos_id and mask == [0] + [1] * (len(ids) - 1)
    # an over-long example keeps its end (the response), at most seq_len + 1 tokens
    ids, mask = sft.tokenize_example(tok, *examples(1)[0], seq_len=8)
    assert len(ids) == 9 and mask == [1] * 9


def test_distillation_data_is_tokenized_as_the_policy_samples_it(tok, tmp_path):
    """Regression: train.py once read sft-data.jsonl as (prompt, " " + response), so
    tokenize_example's seam space made a double space: every training reply began with an extra "▁"
    piece that the base model never emits after "Assistant:". The distilled policy learned to start
    with junk (14 % invalid replies) and its KL to the base was 26.8 nats. The file -> pairs ->
    tokens path must give exactly the dialogue that sampling and the PM see:
    prompt + " " + response."""
    records = [{"id": i, "prompt": p, "chosen": r} for i, (p, r) in enumerate(examples(20, seed=5))]
    path = str(tmp_path / "sft-data.jsonl")
    write_sft_data(records, path)
    pairs = read_sft_data(path)
    assert pairs == [(r["prompt"], r["chosen"]) for r in records]
    for prompt, response in pairs:
        ids, mask = sft.tokenize_example(tok, prompt, response, seq_len=1000)
        assert ids == tok.encode(prompt + " " + response, bos=True, eos=True)
        assert "  " not in tok.decode(ids)
        # a response with its own leading space (raw HH replies) still gets one seam space
        assert sft.tokenize_example(tok, prompt, " " + response, seq_len=1000) == (ids, mask)
    # a line without "response" names the file and line
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"sft-data.jsonl:21: .*response"):
        read_sft_data(path)


def test_pack_rows_keeps_examples_whole(tok):
    tokd = [sft.tokenize_example(tok, p, r, seq_len=600) for p, r in examples(60)]
    rows = sft.pack_rows(tokd, seq_len=600, seed=3)
    assert all(len(ids) <= 601 and len(ids) == len(mask) for ids, mask in rows)
    # cut rows back into examples at each BOS: the multiset of examples is unchanged
    pieces = []
    for ids, mask in rows:
        starts = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
        assert starts[0] == 0
        pieces += [(tuple(ids[a:b]), tuple(mask[a:b])) for a, b in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted((tuple(i), tuple(m)) for i, m in tokd)
    assert len(rows) < len(tokd)  # packing actually packs


def test_collate_shifts_and_pads():
    inputs, targets, mask = sft.collate([([1, 5, 6, 2], [0, 0, 1, 1]), ([1, 7], [0, 1])], pad_id=0)
    assert inputs.tolist() == [[1, 5, 6], [1, 7, 0]] and targets.tolist() == [[5, 6, 2], [7, 0, 0]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_response_only_loss_equals_hand_computation(tok):
    """The first logged training loss = mean over all response tokens (+EOS) of -log p, computed
    example by example with a plain forward pass and log_softmax."""
    # the 6 longest of 100 examples: similar lengths, so that no two fit one row (rows = examples)
    exs = sorted(examples(100, seed=1), key=lambda e: len(tok.encode(e[0] + " " + e[1])))[-6:]
    seq_len = max(len(sft.tokenize_example(tok, p, r, 500)[0]) for p, r in exs)
    assert 2 * min(len(sft.tokenize_example(tok, p, r, 500)[0]) for p, r in exs) > seq_len + 1
    model = tiny_model(tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in exs:
            ids = tok.encode(prompt + " " + response, bos=True, eos=True)
            n_prompt = len(tok.encode(prompt, bos=True))
            logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
            for t in range(n_prompt, len(ids)):  # token t is predicted at position t - 1
                total -= logp[t - 1, ids[t]].item()
                count += 1
    cfg = sft.SFTConfig(max_steps=1, batch_size=6, micro_batch_size=3, seq_len=seq_len, lr=0.0,
                        warmup_steps=1)
    summary = sft.train_lm(cfg, model, tok, exs, exs)
    assert summary["train/loss"] == pytest.approx(total / count, rel=1e-5)
    # lr 0: the weights did not move
    assert summary["val/loss"] == pytest.approx(total / count, rel=1e-5)


def test_gradient_accumulation_is_exact(tok):
    """2 steps with batch 8 as 1 x 8 rows or 4 x 2 rows give the same weights."""
    exs = examples(40, seed=2)
    cfg = sft.SFTConfig(max_steps=2, batch_size=8, micro_batch_size=8, seq_len=64, lr=1e-2,
                        warmup_steps=1)
    a, b = tiny_model(tok), tiny_model(tok)
    sft.train_lm(cfg, a, tok, exs, [])
    sft.train_lm(replace(cfg, micro_batch_size=2), b, tok, exs, [])
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


class CharTokenizer:
    """One id per character (ord), BOS 1, EOS 2: token ids a reader can write down by hand."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [ord(c) for c in text] + [2] * eos


def test_no_packing_rows_and_end_marker_by_hand():
    """One example per row, right-padded; the end marker "\\n\\nHuman:" and EOS in the target and
    under the loss, the prompt (and BOS) outside it. Ids written by hand (a character tokenizer)."""
    tok = CharTokenizer()
    a = sft.tokenize_example(tok, "Q:", " ab ", seq_len=100, end_marker=True)
    b = sft.tokenize_example(tok, "Q:", "c", seq_len=100)
    marker = [ord(c) for c in "\n\nHuman:"]
    # BOS "Q:" | " ab" (the reply's own spaces stripped, one seam space) + marker + EOS
    assert a == ([1, 81, 58, 32, 97, 98] + marker + [2], [0, 0, 0] + [1] * (3 + len(marker) + 1))
    assert b == ([1, 81, 58, 32, 99, 2], [0, 0, 0, 1, 1, 1])
    rows = sft.epoch_rows([a, b], seq_len=100, packing=False, seed=0)
    assert sorted(rows) == sorted([a, b])                       # whole examples, one per row
    inputs, targets, mask = sft.collate([a, b], pad_id=0)
    n = len(a[0]) - 1
    assert inputs.tolist() == [a[0][:-1], b[0] + [0] * (n - 6)]      # pads after b's EOS
    assert targets.tolist() == [a[0][1:], b[0][1:] + [0] * (n - 5)]
    assert mask.tolist() == [a[1][1:], b[1][1:] + [0] * (n - 5)]
    # an over-long example keeps its end: the marker and EOS stay under the loss
    ids, m = sft.tokenize_example(tok, "Q:", "abcdef", seq_len=12, end_marker=True)
    assert ids == ([ord(c) for c in "cdef"] + marker + [2]) and m == [1] * 13


def test_end_marker_with_sentencepiece(tok):
    """The real tokenizer: the masked part decodes to the reply + "\\n\\nHuman:", then EOS."""
    for prompt, response in examples(20, seed=6):
        ids, mask = sft.tokenize_example(tok, prompt, response, seq_len=1000, end_marker=True)
        assert ids == tok.encode(prompt + " " + response + "\n\nHuman:", bos=True, eos=True)
        start = mask.index(1)
        assert mask[start:] == [1] * (len(ids) - start) and ids[-1] == tok.eos_id
        assert tok.decode(ids[start:]).strip() == response + "\n\nHuman:"
        assert tok.decode(ids[:start]) == tok.decode(tok.encode(prompt))


@pytest.mark.parametrize("per_example", [False, True])
def test_no_packing_loss_equals_hand_computation(tok, per_example):
    """packing=False: the first loss = the mean over response tokens (per_example=False) or the mean
    of each example's mean (per_example=True, the reference's weighting), by one forward each."""
    exs = examples(7, seed=3)
    model = tiny_model(tok)
    sums, counts = [], []
    with torch.no_grad():
        for prompt, response in exs:
            ids = tok.encode(prompt + " " + response + "\n\nHuman:", bos=True, eos=True)
            n_prompt = len(tok.encode(prompt, bos=True))
            logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)     # (T, V)
            nll = [-logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]
            sums.append(sum(nll))
            counts.append(len(nll))
    want = (sum(s / c for s, c in zip(sums, counts)) / len(exs) if per_example
            else sum(sums) / sum(counts))
    cfg = sft.SFTConfig(max_steps=1, batch_size=7, micro_batch_size=7, seq_len=500, lr=0.0,
                        warmup_steps=1, packing=False, append_end_marker=True,
                        per_example_loss=per_example)
    summary = sft.train_lm(cfg, model, tok, exs, exs)
    assert summary["train/loss"] == pytest.approx(want, rel=1e-5)
    assert summary["val/loss"] == pytest.approx(want, rel=1e-5)


def test_no_packing_accumulation_is_exact(tok):
    """Per-example weighting: 1 x 6 rows or 3 x 2 rows (different padding) give the same weights."""
    exs = examples(30, seed=4)
    cfg = sft.SFTConfig(max_steps=2, batch_size=6, micro_batch_size=6, seq_len=128, lr=1e-2,
                        warmup_steps=1, packing=False, per_example_loss=True)
    a, b = tiny_model(tok), tiny_model(tok)
    sft.train_lm(cfg, a, tok, exs, [])
    sft.train_lm(replace(cfg, micro_batch_size=2), b, tok, exs, [])
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_warmup_ratio_and_logged_schedule(tmp_path, tok):
    """warmup_steps=0, warmup_ratio=0.25 of 10 steps -> ceil(2.5) = 3 warmup steps; the logged lrs
    are lr_at's warmup + cosine to min_lr_ratio, and the resolved warmup is saved in the config."""
    cfg = sft.SFTConfig(max_steps=10, batch_size=2, seq_len=64, lr=1e-3, warmup_steps=0,
                        warmup_ratio=0.25, min_lr_ratio=0.0, log_every=1, packing=False)
    log = str(tmp_path / "log.jsonl")
    sft.train_lm(cfg, tiny_model(tok), tok, examples(8), [], log_path=log)
    records = [json.loads(line) for line in open(log)]
    assert records[0]["config"]["warmup_steps"] == 3
    hand = [1e-3 * (s + 1) / 3 if s < 3 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7))
            for s in range(10)]
    assert [r["train/lr"] for r in records[1:]] == pytest.approx(hand)


def test_non_finite_loss_stops_before_saving(tmp_path, tok):
    """A NaN in a weight, or a huge learning rate: a one-line error naming the stage, the step and
    the quantity; no checkpoint."""
    model = tiny_model(tok)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    out = tmp_path / "sft"
    cfg = sft.SFTConfig(max_steps=3, batch_size=2, seq_len=64, warmup_steps=1)
    with pytest.raises(FloatingPointError, match=r"^sft: step 1: non-finite loss nan"):
        sft.train_lm(cfg, model, tok, examples(8), [], out_dir=str(out))
    assert not out.exists()
    # a huge learning rate: the weights blow up within a few steps, and training stops there
    cfg = sft.SFTConfig(max_steps=30, batch_size=2, seq_len=64, warmup_steps=1, lr=1e12,
                        grad_clip=0)
    with pytest.raises(FloatingPointError, match=r"^sft: step \d+: non-finite (loss|grad_norm)"):
        sft.train_lm(cfg, tiny_model(tok), tok, examples(8), [], out_dir=str(out))
    assert not out.exists()


def test_training_lowers_loss_and_saves_checkpoint(tmp_path, tok):
    docs = toy.generate_corpus(300, seed=4)
    model = tiny_model(tok)
    cfg = sft.SFTConfig(max_steps=20, batch_size=8, micro_batch_size=8, seq_len=128, lr=1e-2,
                        warmup_steps=5, eval_every=10, log_every=5)
    out, log = str(tmp_path / "base"), str(tmp_path / "base" / "log.jsonl")
    os.makedirs(out)
    summary = sft.train_lm(cfg, model, tok, [("", d) for d in docs[:250]],
                           [("", d) for d in docs[250:]], out, log)
    records = [json.loads(line) for line in open(log)]
    assert records[0]["config"]["max_steps"] == 20
    losses = [r["train/loss"] for r in records[1:]]
    vals = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] and losses[-1] < losses[0] - 1.0
    assert summary["step"] == 20 and summary["val/loss"] == vals[-1]
    # the checkpoint is an HF directory that reloads to the same logits
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.model", "sft_config.json"} <= files
    again = LLaMA.from_pretrained(out)
    x = torch.tensor([tok.encode(docs[0])])
    torch.testing.assert_close(again(x), model.eval()(x))


def test_bad_batch_config(tok):
    with pytest.raises(ValueError, match="batch_size"):
        sft.train_lm(sft.SFTConfig(batch_size=6, micro_batch_size=4), tiny_model(tok), tok,
                     examples(4), [])
    with pytest.raises(ValueError, match="empty"):
        sft.train_lm(sft.SFTConfig(batch_size=4, micro_batch_size=4), tiny_model(tok), tok, [], [])
    with pytest.raises(ValueError, match="per_example_loss=True needs packing=False"):
        sft.train_lm(sft.SFTConfig(per_example_loss=True), tiny_model(tok), tok, examples(4), [])
    with pytest.raises(ValueError, match="warmup_ratio"):
        sft.train_lm(sft.SFTConfig(warmup_ratio=1.5), tiny_model(tok), tok, examples(4), [])


def test_resume_after_a_kill_is_bit_identical(tmp_path, tok, monkeypatch):
    """6 steps with a resumable checkpoint every 2: killed during step 5, resumed from step 4 into a
    model with other initial weights, gives bit for bit the weights of one uninterrupted run."""
    exs = examples(40, seed=7)
    cfg = sft.SFTConfig(max_steps=6, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=2,
                        save_every=2, packing=False)
    whole, cut = str(tmp_path / "whole"), tmp_path / "cut"
    a = tiny_model(tok)
    sft.train_lm(cfg, a, tok, exs, exs[:4], out_dir=whole)
    real_step, calls = sft.optimizer_step, []

    def killed_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt                                        # "kill -9" mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "optimizer_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.train_lm(cfg, tiny_model(tok), tok, exs, exs[:4], out_dir=str(cut))
    monkeypatch.setattr(sft, "optimizer_step", real_step)
    assert json.loads((cut / "sft_config.json").read_text())["step"] == 4
    assert (cut / "training_state.safetensors").exists()
    with pytest.raises(ValueError, match="cannot resume: .*config"):
        sft.train_lm(replace(cfg, lr=2e-2), tiny_model(tok), tok, exs, exs[:4], out_dir=str(cut),
                     resume=True)
    c = tiny_model(tok, seed=1)
    sft.train_lm(cfg, c, tok, exs, exs[:4], out_dir=str(cut), resume=True)
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name
    # the result is the model alone: no training state left behind
    assert not any(n.startswith("training_state") for n in os.listdir(cut))
    assert {"model.safetensors", "tokenizer.model", "sft_config.json"} <= set(os.listdir(cut))
