"""Benchmark of nanorlcd/tokenizer.py's byte-level BPE (tokenizer.json): MB/s of our pure-Python
encoder vs. Hugging Face `tokenizers` (Rust), on the same file and the same ~1 MB of text.

What: a seeded generator writes ~1 MB of HH-style dialogue text (Zipf-distributed made-up words,
numbers, punctuation, a few Greek/CJK/Arabic/Devanagari words and emoji). The tokenizer is
--tokenizer (any HF directory with tokenizer.json, e.g. a LLaMA-3 checkpoint) or, by default, a
LLaMA-3-style BPE (its split regex and 253 special tokens, vocab <= 8000) trained with `tokenizers`;
without `tokenizers` and without --tokenizer we fall back to a merge-free byte-level file (every
byte one token). Our encoder starts cold (piece cache empty) and encodes the text as one string,
then again warm, then as its ~6k dialogue turns; `tokenizers` encodes the one string and the turns
(encode_batch, one thread). We print MB/s of wall-clock and process-CPU time (CPU time is the
fairer figure on a shared machine), the ratio, and whether the ids are equal.
Run (repo root): `python -m bench.bench_tokenizer [--tokenizer DIR] [--mb 1.0] [--threads 1]`
"""
import argparse
import json
import os
import random
import tempfile
import time

import torch

from nanorlcd.tokenizer import BYTE_TO_CHAR, LLAMA3_PATTERN, Tokenizer

# LLaMA-3's special tokens: every one is looked for in the text before BPE
SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
            + [f"<|reserved_special_token_{k}|>" for k in range(250)])
EXTRA_WORDS = ["καλημέρα", "κόσμε", "日本語", "中文的文本", "مرحبا", "बहुत", "नमस्ते", "😀", "👍🏽",
               "naïve", "café"]


def make_text(n_bytes, seed=0):
    """~n_bytes of "\\n\\nHuman: ...\\n\\nAssistant: ..." text: a seeded Zipf vocabulary of made-up
    words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tre", "pon", "su", "vel", "an", "dor", "is", "qu", "zh", "er"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    words += EXTRA_WORDS
    weights = [1 / (k + 1) for k in range(len(words))]
    rng.shuffle(weights)
    parts, size = [], 0
    while size < n_bytes:
        n = rng.randint(5, 40)
        sentence = rng.choices(words, weights, k=n)
        sentence[0] = sentence[0].capitalize()
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(n), str(rng.randint(0, 10 ** rng.randint(1, 7))))
        if rng.random() < 0.2:
            sentence.insert(rng.randrange(n), rng.choice(["I'm", "you'll", "DON'T", "it's"]))
        turn = "\n\nHuman: " if rng.random() < 0.5 else "\n\nAssistant: "
        piece = turn + " ".join(sentence) + rng.choice([".", "?", "!", "...", ",", " :)", "\n"])
        parts.append(piece)
        size += len(piece.encode())
    return "".join(parts)


def write_tokenizer(directory, text):
    """tokenizer.json + tokenizer_config.json in `directory`: a LLaMA-3-style BPE trained on `text`
    with `tokenizers` if it is installed, else a merge-free byte-level file."""
    try:
        import tokenizers as tk
    except ImportError:
        tk = None
    if tk is not None:
        pt = tk.pre_tokenizers
        hf = tk.Tokenizer(tk.models.BPE(ignore_merges=True))
        hf.pre_tokenizer = pt.Sequence([pt.Split(tk.Regex(LLAMA3_PATTERN), "isolated"),
                                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=8000, special_tokens=SPECIALS,
                                         show_progress=False,
                                         initial_alphabet=pt.ByteLevel.alphabet())
        hf.train_from_iterator(text.split("\n\n"), trainer)
        hf.save(os.path.join(directory, "tokenizer.json"))
    else:
        vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
        added = [{"id": 256 + k, "content": s, "special": True} for k, s in enumerate(SPECIALS)]
        data = {"added_tokens": added, "normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated"},
                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
                "decoder": {"type": "ByteLevel"},
                "model": {"type": "BPE", "vocab": vocab, "merges": []}}
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}, f)


def timed(fn):
    """(result, wall seconds, process-CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="HF directory with tokenizer.json")
    parser.add_argument("--mb", type=float, default=1.0, help="size of the generated text, MB")
    parser.add_argument("--threads", type=int, default=1, help="torch/rayon threads (1: fair)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))      # read when tokenizers loads
    text = make_text(int(args.mb * 1e6))
    mb = len(text.encode()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.tokenizer
        if directory is None:
            directory = tmp
            write_tokenizer(directory, text)
        (ours, t_load, _) = timed(lambda: Tokenizer(directory))
        print(f"text: {mb:.2f} MB, {len(text)} characters; tokenizer {ours.model_file} "
              f"(vocab {ours.vocab_size}), loaded in {t_load:.2f} s")
        ids, wall, cpu = timed(lambda: ours.encode(text, bos=False))
        _, wall_warm, cpu_warm = timed(lambda: ours.encode(text, bos=False))
        turns = ["\n\n" + t for t in text.split("\n\n")[1:]]          # the text = "".join(turns)
        _, wall_turns, cpu_turns = timed(lambda: [ours.encode(t, bos=False) for t in turns])
        print(f"nanorlcd, one string, cold: {mb / wall:6.2f} MB/s wall, {mb / cpu:6.2f} MB/s CPU "
              f"({len(ids)} tokens, {len(ours.bpe.cache)} cached pieces)")
        print(f"nanorlcd, one string, warm: {mb / wall_warm:6.2f} MB/s wall, "
              f"{mb / cpu_warm:6.2f} MB/s CPU")
        print(f"nanorlcd, {len(turns)} turns:  {mb / wall_turns:6.2f} MB/s wall, "
              f"{mb / cpu_turns:6.2f} MB/s CPU")
        assert ours.decode(ids) == text, "decode(encode(text)) != text"
        try:
            import tokenizers
        except ImportError:
            print("tokenizers not installed: no comparison")
            return
        hf = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        ref, hf_wall, hf_cpu = timed(lambda: hf.encode(text, add_special_tokens=False).ids)
        refs, hf_wall_turns, hf_cpu_turns = timed(
            lambda: [e.ids for e in hf.encode_batch(turns, add_special_tokens=False)])
        print(f"tokenizers, one string:     {mb / hf_wall:6.2f} MB/s wall, "
              f"{mb / hf_cpu:6.2f} MB/s CPU")
        print(f"tokenizers, {len(turns)} turns: {mb / hf_wall_turns:6.2f} MB/s wall, "
              f"{mb / hf_cpu_turns:6.2f} MB/s CPU")
        same = ids == ref and [ours.encode(t, bos=False) for t in turns] == refs
        print(f"nanorlcd CPU time / tokenizers CPU time: one string (cold) {cpu / hf_cpu:.2f}x, "
              f"turns {cpu_turns / hf_cpu_turns:.2f}x; ids equal: {same}")


if __name__ == "__main__":
    main()
