"""Tests for nanorlcd/tokenizer.py against sentencepiece used directly on the same tiny model.

What is checked: exact text round trip (HH "\\n\\n" separators, repeated spaces, Unicode through
byte fallback), BOS/EOS placement and never a double BOS, the special ids read from the model file
(and a pad that is not EOS), batch encoding to a left-padded tensor with its mask, decoding that
skips pad/BOS/EOS, loading from a directory, save(), and a missing or damaged file.
Run: `python -m pytest tests/test_tokenizer.py -q`
"""

import os

import pytest
import sentencepiece as spm
import torch

from nanorlcd.tokenizer import Tokenizer

TEXTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:",
         "  two  spaces, digits 12345,\ttab",
         "Sure, here is how to fix a bike.",
         "héllo ✓ 日本語 — unseen characters go through byte fallback",
         "a"]


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_path):
    return spm.SentencePieceProcessor(model_file=tiny_tokenizer_path)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


def test_special_ids(tok, sp):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, sp.get_piece_size())
    # the model file has no pad piece; whatever pad is chosen, it must not be EOS (a real EOS would
    # look like padding) and must be a valid embedding row
    assert tok.pad_id != tok.eos_id and 0 <= tok.pad_id < tok.vocab_size


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, sp, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text                  # exact, "\n\n" and Unicode included


def test_bos_eos(tok, sp):
    text = TEXTS[1]
    body = sp.encode(text)
    assert tok.encode(text) == [1] + body                             # default: BOS, no EOS
    assert tok.encode(text, bos=True, eos=True) == [1] + body + [2]
    assert tok.encode(text, bos=False, eos=True) == body + [2]
    assert tok.encode(text, bos=False, eos=False) == body
    assert tok.encode("", bos=True, eos=True) == [1, 2]


@pytest.mark.parametrize("text", TEXTS + ["<s>hello", "<s> <s>", ""])
def test_never_double_bos(tok, text):
    """Exactly one BOS id, at the front, whatever the text; the literal string "<s>" is text, not a
    control id."""
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.bos_id not in tok.encode(text, bos=False)


def test_encode_batch_left_pads(tok, sp):
    ids, mask = tok.encode_batch(TEXTS, bos=True, eos=True)
    rows = [[1] + sp.encode(t) + [2] for t in TEXTS]
    T = max(len(r) for r in rows)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(TEXTS), T)
    for b, r in enumerate(rows):
        n_pad = T - len(r)
        assert ids[b, n_pad:].tolist() == r                           # real tokens right-aligned
        assert ids[b, :n_pad].tolist() == [tok.pad_id] * n_pad        # pads on the left
        assert mask[b].tolist() == [0] * n_pad + [1] * len(r)


def test_decode_skips_pad_bos_eos(tok):
    ids, _ = tok.encode_batch(TEXTS[1:], bos=True, eos=True)
    for b, text in enumerate(TEXTS[1:]):
        assert tok.decode(ids[b]) == text                             # tensor row, pads included
        assert tok.decode(ids[b].tolist()) == text


def test_directory_and_save(tok, tiny_tokenizer_path, tmp_path):
    tok.save(tmp_path / "model_dir")
    assert os.path.isfile(tmp_path / "model_dir" / "tokenizer.model")
    for other in (Tokenizer(str(tmp_path / "model_dir")),
                  Tokenizer(os.path.dirname(tiny_tokenizer_path))):
        assert all(other.encode(t, eos=True) == tok.encode(t, eos=True) for t in TEXTS)
        assert (other.bos_id, other.eos_id, other.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as e:
        Tokenizer(str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "tiktoken"])
def test_damaged_model_file(tiny_tokenizer_path, tmp_path, damage):
    """A damaged tokenizer.model fails at construction with one line naming the file (not
    sentencepiece's multi-line C++ error); "tiktoken" is LLaMA-3's original/tokenizer.model."""
    good = open(tiny_tokenizer_path, "rb").read()
    content = {"garbage": b"\x89PNG\r\n" + bytes(range(256)) * 4,
               "truncated": good[:len(good) // 2], "empty": b"",
               "tiktoken": b"IQ== 0\nIg== 1\nIw== 2\n"}[damage]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a sentencepiece model") as e:
        Tokenizer(str(tmp_path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
