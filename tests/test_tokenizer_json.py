"""Tests for the byte-level BPE path of nanorlcd/tokenizer.py (Hugging Face tokenizer.json, as
LLaMA-3 ships).

What is checked:
- a hand-written tiny tokenizer.json, ids worked out by hand (no library needed): merge order by
  rank and leftmost on ties, the LLaMA-3 vs GPT-2 split regexes (digit runs of 3, case-insensitive
  contractions), ignore_merges, added tokens cut out before BPE, both merge spellings, decoding with
  U+FFFD for broken UTF-8, BOS/EOS/pad from tokenizer_config.json / special_tokens_map.json /
  generation_config.json / config.json;
- exact ids against Hugging Face `tokenizers` (skipped if absent) for LLaMA-3-, GPT-2- and
  SmolLM2-style tokenizers trained here on a corpus of the hard cases, the \\p{L}/\\p{N}/\\s classes
  on every assigned code point, per-token decoding, and round trips;
- garbage or truncated files give a one-line ValueError naming the file and field;
- the pipeline through the interface: the RLAIF "(A)"/"(B)" ids, the "\\n\\nHuman:" stop string in
  `generate`, and a saved tiny LLaMA + tokenizer.json directory loaded back, sampled from and
  re-saved.
Run: `python -m pytest tests/test_tokenizer_json.py -q`
"""

import json
import os
import unicodedata

import pytest
import torch

from nanorlcd.dialogue import ASSISTANT, HUMAN, cut_reply
from nanorlcd.rlcd import ab_token_ids
from nanorlcd.tokenizer import (BYTE_TO_CHAR, GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer, compile_onig,
                                split_isolated)

# hand-written merges, in rank order, with the id each result gets (ids 0..255 are the bytes
# themselves)
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("t", "he"), ("a", "a"), ("b", "c"), ("a", "b"),
          ("3", "4"), ("'", "M"), ("Ċ", "Ċ"), ("Ã", "©")]
HE, G_T, G_THE, THE, AA, BC, AB, N34, Q_M, NL2, E_ACUTE = range(256, 256 + len(MERGES))
XYZ, END, BEGIN = 256 + len(MERGES), 256 + len(MERGES) + 1, 256 + len(MERGES) + 2


def split_step(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def write_tiny(directory, style="llama3", merges_as_lists=False, ignore_merges=False, config=None):
    """A tokenizer.json + tokenizer_config.json written by hand; style picks the LLaMA-3 or the
    GPT-2 layout."""
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    for k, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + k
    vocab["xyz"] = XYZ                                  # in the vocab, but no merge builds it
    pre = ({"type": "Sequence", "pretokenizers": [split_step(LLAMA3_PATTERN), byte_level(False)]}
           if style == "llama3" else byte_level(True))
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, c in ((END, "<|end|>"), (BEGIN, "<|begin|>"))]
    data = {"version": "1.0", "added_tokens": added, "normalizer": None, "pre_tokenizer": pre,
            "post_processor": None, "decoder": byte_level(True),
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab,
                      "merges": [list(m) if merges_as_lists else " ".join(m) for m in MERGES]}}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    config = {"bos_token": "<|begin|>", "eos_token": "<|end|>"} if config is None else config
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def test_byte_table():
    """GPT-2's table: 256 distinct printable characters, printable ASCII kept, space -> Ġ, newline
    -> Ċ."""
    chars = list(BYTE_TO_CHAR.values())
    assert len(set(chars)) == 256 and all(c.isprintable() for c in chars)
    assert BYTE_TO_CHAR[ord("a")] == "a" and BYTE_TO_CHAR[32] == "Ġ" and BYTE_TO_CHAR[10] == "Ċ"


@pytest.mark.parametrize("merges_as_lists", [False, True])
def test_hand_written_ids(tmp_path, merges_as_lists):
    tok = Tokenizer(write_tiny(tmp_path, "llama3", merges_as_lists))
    enc = tok.bpe.encode
    # "the": h+e (rank 0), then t+he (3); " the": h+e (0), Ġ+t (1), Ġt+he (2)
    assert enc("the the") == [THE, G_THE]
    assert enc("aaa") == [AA, ord("a")]            # equal ranks: the leftmost pair merges first
    assert enc("abc") == [ord("a"), BC]            # b+c (rank 5) beats a+b (6), though to the right
    assert enc("12345") == [49, 50, 51, 52, 53]    # LLaMA-3: digit runs of 3, "123" "45": no 3+4
    assert enc("I'M") == [ord("I"), Q_M]           # (?i:'m) takes "'M" as one pre-token
    assert enc("é\n\n") == [E_ACUTE, NL2]          # UTF-8 c3 a9 -> "Ã©"; "\n\n" is one pre-token
    assert enc("xyz") == [ord("x"), ord("y"), ord("z")]           # no merge makes "xyz"
    # one pre-token of 200001 letters: merged in O(n log n) (a quadratic loop would take hours)
    assert enc("a" * 200_001) == [AA] * 100_000 + [ord("a")]
    # added tokens are cut out before BPE
    assert enc("a<|end|>b<|begin|>") == [ord("a"), END, ord("b"), BEGIN]
    assert (tok.bos_id, tok.eos_id) == (BEGIN, END)
    assert tok.encode("the", bos=True, eos=True) == [BEGIN, THE, END]


def test_hand_written_gpt2_style_and_ignore_merges(tmp_path):
    gpt2 = Tokenizer(write_tiny(tmp_path / "gpt2", "gpt2")).bpe.encode
    assert gpt2("12345") == [49, 50, N34, 53]      # GPT-2 keeps the whole digit run: 3+4 merges
    assert gpt2("I'M") == [ord("I"), ord("'"), ord("M")]    # GPT-2's contractions: lower case only
    assert gpt2("\n\nx") == [10, 10, ord("x")]    # GPT-2: "\n" "\n" "x" (\s+(?!\S) backs off)
    ignore = Tokenizer(write_tiny(tmp_path / "ignore", "llama3", ignore_merges=True)).bpe.encode
    assert ignore("xyz") == [XYZ]                  # a pre-token that is in the vocab is one token
    assert ignore("abc") == [ord("a"), BC]
    # a merge listed twice keeps its last rank (HF builds a map): "a b" first *and* at rank 7
    d = write_tiny(tmp_path / "dup")
    data = json.loads(open(os.path.join(d, "tokenizer.json"), encoding="utf-8").read())
    data["model"]["merges"].insert(0, "a b")
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    assert Tokenizer(d).bpe.encode("abc") == [ord("a"), BC]


def test_hand_written_decode(tmp_path):
    tok = Tokenizer(write_tiny(tmp_path))
    assert tok.decode([BEGIN, THE, G_THE, Q_M, END]) == "the the'M"               # specials skipped
    assert tok.bpe.decode([BEGIN, 10]) == "<|begin|>\n"            # ... unless asked for
    assert tok.decode([0xC3]) == "\ufffd"             # half of "é": one replacement character
    assert tok.decode([0xF0, 0x9F, ord("a")]) == "\ufffda"      # a cut 4-byte char: one U+FFFD
    for text in ["the the", "Ünïcödé 日本 😀", "a\n\n  b<|end|>", ""]:
        assert tok.bpe.decode(tok.bpe.encode(text)) == text


def test_special_ids_resolution(tmp_path):
    """HF's order: special_tokens_map.json over tokenizer_config.json, then generation_config.json
    and config.json ids; a pad that is missing or equal to EOS is replaced, never EOS."""
    d = write_tiny(tmp_path / "a", config={"bos_token": {"content": "<|begin|>", "lstrip": False},
                                           "eos_token": "<|begin|>"})
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": {"content": "<|end|>"}}, f)
    tok = Tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BEGIN, END, 0)  # no spare special: 0, not EOS
    assert tok.decode([0, 1]) == "\x00\x01"                          # that pad is an ordinary token
    d = write_tiny(tmp_path / "b", config={})
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BEGIN, "eos_token_id": [END, BEGIN], "pad_token_id": END}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    tok = Tokenizer(d)
    assert (tok.bos_id, tok.eos_id) == (BEGIN, END) and tok.pad_id != tok.eos_id
    d = write_tiny(tmp_path / "c", config={"bos_token": "<|nope|>", "eos_token": "<|end|>"})
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token '<\|nope\|>' is not a"):
        Tokenizer(d)
    with pytest.raises(ValueError, match="no bos_token"):
        Tokenizer(write_tiny(tmp_path / "d", config={"eos_token": "<|end|>"}))


def one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as e:
        Tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    d = write_tiny(tmp_path / "ok")
    text = open(os.path.join(d, "tokenizer.json"), encoding="utf-8").read()
    data = json.loads(text)
    cases = {"truncated": (text[: len(text) // 2], "not valid JSON"),
             "garbage": (b"\x89PNG\x00\xff" * 50, "not UTF-8"),
             "list": ("[1, 2]", "expected a Hugging Face tokenizer.json"),
             "wordpiece": ({**data, "model": {**data["model"], "type": "WordPiece"}}, "model.type"),
             "regex": ({**data, "pre_tokenizer": split_step(r"\w+")}, "pre_tokenizer.pattern"),
             "merge": ({**data, "model": {**data["model"], "merges": ["h e", "q"]}},
                       r"model.merges\[1\]"),
             "decoder": ({**data, "decoder": {"type": "Metaspace"}}, "decoder.type"),
             "bytes": ({**data, "model": {**data["model"], "vocab": {"a": 0}}}, "256 byte symbols")}
    for name, (content, match) in cases.items():
        path = tmp_path / name / "tokenizer.json"
        path.parent.mkdir()
        if isinstance(content, dict):
            content = json.dumps(content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        one_line_error(path, match)


# --------------------------------------------------------------------------------------------------
# Against Hugging Face `tokenizers`

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"]
CORPUS = [
    "I'M here, you'Ll see; THEY'RE sure it's 'S fine. We'VE, he'D, she'll, don't 'ſ",
    "Digits 1234567 and 3.14159, 1,000,000 and 00042 and 12 345 6789012",
    " leading space", "  two leading", "\n\nHuman: hi there\n\nAssistant: ok\n", "trailing   ",
    "tabs\t\tand  multiple   spaces \n  \n\n   x", "\r\n\r\nwindows\r\n",
    "\x1c\x1f\x85\xa0\u2009\u3000 odd spaces",
    "!!! ??? ... --- (parens) [brackets] {braces} <tags> @#$%^&* ',.;:\"",
    "Café naïve résumé Ångström ÉCOLE", "Γειά σου κόσμε ΑΒΓ", "日本語のテキスト、中文。한국어",
    "مرحبا بالعالم ١٢٣٤",
    "नमस्ते दुनिया १२३४५", "Emoji 😀👍🏽🇺🇸 ❤️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋 ½ Ⅻ",
    "special <|begin_of_text|>inside<|eot_id|> text <|end_of_text|>",
    "<|reserved_special_token_0|>x",
    "", "'", "\n", " ", "a"]


def train_hf(style):
    """A `tokenizers` byte-level BPE in the given style, trained on CORPUS (vocab 700: merges in
    every script)."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    pt = pre_tokenizers
    tok = tk.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    byte_level_regex = pt.ByteLevel(add_prefix_space=False)                 # GPT-2 regex inside
    tok.pre_tokenizer = {
        "llama3": pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), "isolated"),
                               pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "gpt2": byte_level_regex,
        "smollm2": pt.Sequence([pt.Digits(individual_digits=True), byte_level_regex])}[style]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens([tk.AddedToken("<tool>", special=False)])        # an ordinary added token
    tok.add_special_tokens([tk.AddedToken("<|l|>", lstrip=True),
                            tk.AddedToken("<|r|>", rstrip=True)])
    return tok


@pytest.fixture(scope="module", params=["llama3", "gpt2", "smollm2"])
def pair(request, tmp_path_factory):
    """(HF tokenizer, our Tokenizer) on the same tokenizer.json, in each style."""
    hf = train_hf(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save(str(d / "tokenizer.json"))
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, f)
    return hf, Tokenizer(str(d))


def test_ids_equal_hf(pair):
    hf, tok = pair
    long = "I'm" * 50 + " " * 40 + "9" * 31
    texts = CORPUS + ["".join(CORPUS), " ".join(CORPUS), "x<tool>y", long]
    for text in texts:
        want = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=False) == want, repr(text)
        assert tok.bpe.decode(tok.bpe.encode(text)) == text
        # our decode skips specials as HF's skip_special_tokens does
        ids = tok.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # lstrip/rstrip added tokens swallow the whitespace on their side (so no round trip here)
    strip = "a  <|l|>  b \n<|r|>\t c<|r|>  <|l|>d <|r|><|r|> <|l|> <|l|>"
    assert tok.encode(strip, bos=False) == hf.encode(strip, add_special_tokens=False).ids


def test_decode_every_token_as_hf(pair):
    """Every single id (partial UTF-8 included: U+FFFD as HF's from_utf8_lossy) and a few broken
    pairs."""
    hf, tok = pair
    ids = list(range(tok.vocab_size))
    want = [hf.decode([i], skip_special_tokens=False) for i in ids]
    assert [tok.bpe.decode([i]) for i in ids] == want
    emoji = tok.bpe.encode("😀👍🏽é")
    for k in range(len(emoji)):
        assert tok.bpe.decode(emoji[k:]) == hf.decode(emoji[k:], skip_special_tokens=False)


def test_pattern_classes_against_onig():
    """Our translated \\p{L}, \\p{N}, \\s against onig's, on the assigned code points of Python's
    Unicode database (those added in later Unicode versions are the known gap): every first and last
    code point of a run of one general category (where a wrong range would show) and every 16th code
    point inside runs."""
    tk = pytest.importorskip("tokenizers")
    cat = [unicodedata.category(chr(c)) for c in range(0x110000)] + ["Cn"]
    chars = [chr(c) for c in range(0x110000) if cat[c] not in ("Cn", "Co", "Cs")
             and (c % 16 == 0 or cat[c - 1] != cat[c] or cat[c + 1] != cat[c])]
    for pattern in (LLAMA3_PATTERN, GPT2_PATTERN):
        ref = tk.pre_tokenizers.Split(tk.Regex(pattern), "isolated")
        ours = compile_onig(pattern)
        for k in range(0, len(chars), 8192):
            # each character alone, after a letter, before a digit and doubled, to meet every branch
            text = "".join(c + "a" + c + " 1" + c + c + "1 '" + c for c in chars[k:k + 8192])
            assert split_isolated(ours, [text]) == [p for p, _ in ref.pre_tokenize_str(text)]


def test_string_merges_equal_list_merges(pair, tmp_path):
    """Older tokenizer.json files spell merges "a b"; the same merges must give the same ids."""
    hf, tok = pair
    data = json.loads(hf.to_str())
    assert all(isinstance(m, list) for m in data["model"]["merges"])   # what tokenizers writes now
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    old = Tokenizer(str(tmp_path))
    assert all(old.bpe.encode(t) == tok.bpe.encode(t) for t in CORPUS)


def test_rlaif_ab_ids(pair, tmp_path):
    """RLAIF scores the next token after "... The answer is: (": with byte-level BPE "(" stays in "
    (" and the letter is a token of its own, the one HF gives for "A" / "B"."""
    hf, tok = pair
    assert ab_token_ids(tok) == (hf.token_to_id("A"), hf.token_to_id("B"))
    hand = Tokenizer(write_tiny(tmp_path))
    assert ab_token_ids(hand) == (ord("A"), ord("B"))


# --------------------------------------------------------------------------------------------------
# The pipeline: a LLaMA directory with tokenizer.json, sampled from with the HH stop string

def chain_model(tok, prompt_last, chain, hidden=128):
    """A 1-layer LLaMA whose greedy next token after `prompt_last` and after chain[k] is chain[k+1]
    (cyclic): attention and MLP outputs are zeroed, so the last hidden state is RMSNorm(embedding),
    and the lm_head row of each successor is its predecessor's normalised embedding (score D versus
    ~sqrt(D) for other rows)."""
    from nanorlcd.model import LLaMA, LLaMAConfig
    cfg = LLaMAConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = LLaMA(cfg).eval()
    with torch.no_grad():
        emb = torch.randn(cfg.vocab_size, hidden, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight.copy_(emb)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()       # (V, D) RMSNorm, gain 1
        for src, dst in zip([prompt_last] + chain, chain + chain[:1]):
            model.lm_head.weight[dst] = normed[src]
    return model


def test_stop_string_end_to_end(tmp_path):
    """Save a LLaMA + tokenizer.json directory, load both back, sample: generation must stop once
    the new tokens decode to a text containing "\\n\\nHuman:" (sample.py's decode window), not run
    on; the tokenizer re-saved elsewhere must encode identically."""
    from nanorlcd.model import LLaMA
    from nanorlcd.sample import generate
    src = Tokenizer(write_tiny(tmp_path / "tok"))
    prompt = src.encode(HUMAN + " hi" + ASSISTANT, bos=True)
    chain = src.encode(" Ok." + HUMAN, bos=False)     # " Ok" "." "\n\n" "Human" ":", mostly bytes
    assert len(set(chain)) == len(chain) and NL2 in chain     # distinct ids; "\n\n" is one token
    model_dir = str(tmp_path / "model")
    chain_model(src, prompt[-1], chain).save_pretrained(model_dir)
    src.save(model_dir)
    model, tok = LLaMA.from_pretrained(model_dir), Tokenizer(model_dir)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(model_dir))
    free = generate(model, [prompt], 2 * len(chain), temperature=0, eos_id=[])
    assert free.tokens[0] == chain + chain and not free.finished[0]  # no stop string: it runs on
    out = generate(model, [prompt], 2 * len(chain), temperature=0, eos_id=[], stop_strings=[HUMAN],
                   tokenizer=tok)
    assert out.tokens[0] == chain and bool(out.finished[0])      # stopped at the ":" of "Human:"
    text = tok.decode(out.tokens[0])
    assert text == " Ok." + HUMAN and cut_reply(text) == "Ok."
    # save to another directory and reload: same files, same ids
    tok.save(tmp_path / "copy")
    again = Tokenizer(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["tokenizer.json", "tokenizer_config.json"]
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode(" Ok." + HUMAN, eos=True) == tok.encode(" Ok." + HUMAN, eos=True)
