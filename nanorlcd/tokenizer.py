"""A sentencepiece tokenizer with LLaMA's conventions.

What: encode/decode text with the `tokenizer.model` shipped in every LLaMA-1/2 HF directory (and the one the toy
world trains), with BOS/EOS handling, batch encoding to a LEFT-padded tensor + attention mask, and decoding that
skips special ids.
Pad strategy: LLaMA's tokenizer.model has no pad piece (pad_id() == -1). We then pad with the unk id (0). Which id
fills a pad slot never matters, because every consumer also receives the attention mask; what matters is that the
pad is *not* EOS (Huang et al., "N implementation details of RLHF": a pad equal to EOS makes real EOS tokens look
like padding).
Simplified: sentencepiece only (LLaMA-3's tiktoken BPE files are not read here).
Run: `python -c "from nanorlcd.tokenizer import Tokenizer; print(Tokenizer('out/toy/base').encode('hi'))"`.
"""
import os
import shutil

import sentencepiece as spm
import torch


class Tokenizer:
    def __init__(self, path):
        model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{model_file}: tokenizer.model not found (expected a sentencepiece model)")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}

    def encode(self, text, bos=True, eos=False):
        """Text -> ids. sentencepiece never emits BOS itself, so adding it here once means never a double BOS."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Ids -> text, dropping BOS/EOS/pad ids (accepts a list or a 1-D tensor)."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.sp.decode([i for i in ids if i not in self.special_ids])

    def encode_batch(self, texts, bos=True, eos=False):
        """Texts -> (ids, mask), both (B, T) LongTensors, LEFT-padded so every row ends at the last column
        (generation then appends to all rows at the same index)."""
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        return left_pad(rows, self.pad_id)

    def save(self, path):
        """Copies tokenizer.model into an (HF) model directory."""
        os.makedirs(path, exist_ok=True)
        dst = os.path.join(path, "tokenizer.model")
        if os.path.abspath(dst) != os.path.abspath(self.model_file):
            shutil.copyfile(self.model_file, dst)


def left_pad(rows, pad_id):
    """list of id lists -> (ids, mask): (B, T) LongTensors with pads on the left and mask 0 on them."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r):] = 1
    return ids, mask
