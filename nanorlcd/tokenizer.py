"""LLaMA's tokenizers: sentencepiece tokenizer.model (LLaMA-1/2), byte-level BPE tokenizer.json (3).

What: one `Tokenizer(path)` for every LLaMA-architecture Hugging Face directory. A directory with
`tokenizer.model` uses sentencepiece; otherwise `tokenizer.json` (model type BPE with a ByteLevel
pre-tokenizer and decoder: LLaMA-3/3.1/3.2, GPT-2-style models such as SmolLM2) is read here from
scratch in pure Python, with the same ids as Hugging Face `tokenizers`. Both give BOS/EOS handling,
batch encoding to a LEFT-padded tensor + attention mask, and decoding that skips special ids.
Pad strategy: LLaMA checkpoints ship no pad token. Which id fills a pad slot never matters, because
every consumer also receives the attention mask; what matters is that the pad is *not* EOS (Huang et
al., "N implementation details of RLHF": a pad equal to EOS makes real EOS tokens look like
padding). sentencepiece pads with unk (0).
Simplified: of tokenizer.json only the byte-level BPE family is read (no normalizer, the LLaMA-3 and
GPT-2 split regexes, Digits); anything else is refused at load time with the file and field named.
Run: `python -c "import nanorlcd.tokenizer as t; print(t.Tokenizer('out/toy/base').encode('hi'))"`
(any HF LLaMA directory works in place of out/toy/base)
"""
import functools
import heapq
import itertools
import json
import os
import re
import shutil
import sys
import unicodedata

import sentencepiece as spm
import torch

# the files save() copies next to tokenizer.json when the source directory has them
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    def __init__(self, path):
        path = os.fspath(path)
        model_file = _find_tokenizer_file(path)
        self.model_file = model_file
        if model_file.endswith(".json"):
            self.bpe = ByteLevelBPE(model_file)
            self.vocab_size = self.bpe.vocab_size
            ids = _hf_special_ids(os.path.dirname(model_file), self.bpe)
            self.bos_id, self.eos_id, self.pad_id = ids
            # decode skips what HF's skip_special_tokens=True skips: special added tokens, BOS, EOS
            self.special_ids = self.bpe.special_ids | {self.bos_id, self.eos_id}
        else:
            self.bpe = None
            self.sp = _load_sentencepiece(model_file)
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
            self.special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}

    def encode(self, text, bos=True, eos=False):
        """Text -> ids. Neither backend emits BOS itself (HF's post-processor is not applied), so
        adding it here once means never a double BOS from us; a BPE text that spells out a special
        token (e.g. "<|begin_of_text|>") gets that token's id, as in HF."""
        ids = self.bpe.encode(text) if self.bpe else self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """Ids -> text, dropping special ids (accepts a list or a 1-D tensor)."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        ids = [i for i in ids if i not in self.special_ids]
        return self.bpe.decode(ids) if self.bpe else self.sp.decode(ids)

    def encode_batch(self, texts, bos=True, eos=False):
        """Texts -> (ids, mask), both (B, T) LongTensors, LEFT-padded so every row ends at the last
        column (generation then appends to all rows at the same index)."""
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        return left_pad(rows, self.pad_id)

    def save(self, path):
        """Copies the tokenizer files into an (HF) model directory: tokenizer.model, or
        tokenizer.json with the tokenizer_config.json / special_tokens_map.json that sat beside it
        (they fix BOS/EOS/pad)."""
        os.makedirs(path, exist_ok=True)
        if self.bpe is None:
            copies = [(self.model_file, "tokenizer.model")]
        else:
            src_dir = os.path.dirname(self.model_file)
            copies = [(self.model_file, "tokenizer.json")] + [
                (os.path.join(src_dir, name), name) for name in HF_TOKENIZER_FILES[1:]
                if os.path.isfile(os.path.join(src_dir, name))]
        for src, name in copies:
            dst = os.path.join(path, name)
            if os.path.abspath(dst) != os.path.abspath(src):
                shutil.copyfile(src, dst)


def left_pad(rows, pad_id):
    """list of id lists -> (ids, mask): (B, T) LongTensors, pads on the left with mask 0."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r):] = 1
    return ids, mask


def _find_tokenizer_file(path):
    """A file is used as given; a directory gives tokenizer.model (LLaMA-1/2) or tokenizer.json."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path}: neither tokenizer.model (sentencepiece) nor "
                                f"tokenizer.json (Hugging Face byte-level BPE) found")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tokenizer.model not found (expected a sentencepiece "
                                f"model or a tokenizer.json)")
    return path


def _load_sentencepiece(model_file):
    """sentencepiece's own parse error is a multi-line C++ message without a hint: give one line."""
    try:
        return spm.SentencePieceProcessor(model_file=model_file)
    except (RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{model_file}: not a sentencepiece model ({reason}); expected "
                         f"LLaMA-1/2's tokenizer.model (LLaMA-3's tiktoken file is not read: use "
                         f"tokenizer.json)") from None


# --------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2, LLaMA-3): text -> split into pre-tokens by a regex -> UTF-8 bytes -> one
# printable character per byte -> rank-ordered merges -> ids. Decoding maps characters back to
# bytes.

def bytes_to_unicode():
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the other 68
    bytes (controls, space, ...) to U+0100 onwards, so every token is a printable string and a space
    shows as 'Ġ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# The split regexes of the two families, exactly as tokenizer.json spells them (Rust `onig` syntax).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# onig's \s is Unicode White_Space; Python's \s is str.isspace(), which also takes U+001C..U+001F
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")


@functools.lru_cache(maxsize=None)
def unicode_classes():
    """Bodies of regex character classes for \\p{L} (general categories Lu Ll Lt Lm Lo) and \\p{N}
    (Nd Nl No). Python's `re` has no \\p{..}, so we scan all 0x110000 code points once with
    unicodedata.category, group equal first letters into runs and write the L and N runs as ranges
    of \\U escapes. Exact for Python's Unicode database (14.0 in Python 3.11); characters assigned
    only in later Unicode versions may differ from the onig tables inside `tokenizers`."""
    runs, start = {"L": [], "N": []}, 0
    firsts = (unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1))
    for first, group in itertools.groupby(firsts):
        end = start + sum(1 for _ in group)                    # this run is [start, end)
        if first in runs:
            last = f"-\\U{end - 1:08x}" if end - 1 > start else ""
            runs[first].append(f"\\U{start:08x}{last}")
        start = end
    return {k: "".join(v) for k, v in runs.items()}


@functools.lru_cache(maxsize=None)
def compile_onig(pattern):
    """Compile an onig pattern with Python's `re`: \\p{L}, \\p{N}, \\s, \\S become explicit classes
    (inside [...] only their bodies)."""
    out, i, in_class = [], 0, False
    classes = unicode_classes()
    bodies = {r"\p{L}": classes["L"], r"\p{N}": classes["N"], r"\s": WHITE_SPACE}
    while i < len(pattern):
        two, five = pattern[i:i + 2], pattern[i:i + 5]
        if five in bodies or two in bodies:
            key = five if five in bodies else two
            out.append(bodies[key] if in_class else f"[{bodies[key]}]")
            i += len(key)
        elif two == r"\S" and not in_class:
            out.append(f"[^{WHITE_SPACE}]")
            i += 2
        elif two[0] == "\\":
            out.append(two)
            i += 2
        else:
            in_class = (in_class or two[0] == "[") and not (in_class and two[0] == "]")
            out.append(two[0])
            i += 1
    return re.compile("".join(out))


def split_isolated(regex, pieces):
    """HF's Split(behavior="Isolated"): every match is a piece, and so is any text between two."""
    out = []
    for piece in pieces:
        pos = 0
        for m in regex.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


class ByteLevelBPE:
    """A Hugging Face tokenizer.json with a BPE model and byte-level pre-tokenizer/decoder, encoded
    exactly as `tokenizers` does: added tokens are cut out first, the rest goes through the
    pre-tokenizer chain, and each pre-token through BPE (the lowest-ranked adjacent pair merges
    first, leftmost on ties)."""

    def __init__(self, file):
        self.file = file
        data = _read_json(file, "a Hugging Face tokenizer.json")
        model = self._field(data, "model", dict)
        if model.get("type", "BPE") != "BPE":
            self._fail("model.type", f"is {model.get('type')!r}; only BPE is read")
        for key, ok in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                        ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False))):
            if model.get(key) not in ok:
                self._fail(f"model.{key}", f"is {model.get(key)!r}; expected {ok[0]!r}")
        if data.get("normalizer") is not None:
            self._fail("normalizer", f"is {data['normalizer']!r:.60}; byte-level BPE expects null")
        # 1. vocabulary and added tokens (LLaMA-3's specials sit above the BPE vocab, GPT-2's in it)
        self.vocab = self._field(model, "vocab", dict, "model.vocab")
        if not all(isinstance(i, int) and i >= 0 for i in self.vocab.values()):
            self._fail("model.vocab", "must map token strings to non-negative ints")
        missing = [c for c in BYTE_TO_CHAR.values() if c not in self.vocab]
        if missing:
            self._fail("model.vocab", f"lacks {len(missing)} of the 256 byte symbols "
                                      f"(e.g. {missing[0]!r})")
        added = self._field(data, "added_tokens", list, default=[])
        for k, t in enumerate(added):
            if not (isinstance(t, dict) and isinstance(t.get("id"), int)
                    and isinstance(t.get("content"), str) and t["content"]):
                self._fail(f"added_tokens[{k}]", "must be an object with an int id and a content")
            if t.get("single_word"):
                self._fail(f"added_tokens[{k}].single_word", "is true; not supported")
        self.added = {t["content"]: t["id"] for t in added}
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self.vocab_size = max(list(self.vocab.values()) + [t["id"] for t in added]) + 1
        # 2. merges, in rank order: "a b" strings (older files) or [a, b] lists (newer files)
        self.ranks = {}
        for rank, m in enumerate(self._field(model, "merges", list, "model.merges")):
            pair = tuple(m.split(" ") if isinstance(m, str) else m if isinstance(m, list) else ())
            if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                self._fail(f"model.merges[{rank}]", f"is {m!r}; expected 'a b' or ['a', 'b']")
            if any(s not in self.vocab for s in pair + (pair[0] + pair[1],)):
                self._fail(f"model.merges[{rank}]", f"{m!r}: a part or the result is not a token")
            self.ranks[pair] = rank         # a repeated pair keeps its last rank, as in HF's map
        # LLaMA-3 sets ignore_merges: a pre-token that is itself in the vocab is one token, whatever
        # the merges say
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.pre_steps = self._pre_tokenizer(data.get("pre_tokenizer"))
        decoder = data.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            self._fail("decoder.type", f"is {decoder.get('type')!r}; expected ByteLevel")
        # 3. added tokens are matched first, longest first at a position (leftmost-longest, as HF
        #    does). A plain alternation of literals: `re` then skips ahead on their first
        #    characters (wrapping each in a group makes it ~10^4 times slower on LLaMA-3's 256)
        contents = sorted(self.added, key=len, reverse=True)
        self.added_regex = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.strip = {t["content"]: (bool(t.get("lstrip")), bool(t.get("rstrip"))) for t in added}
        # 4. id -> bytes for decoding: a token whose characters are all byte symbols is those bytes;
        #    an added token with other characters (e.g. a real space) is its own UTF-8, as HF's
        #    ByteLevel decoder does
        id_to_token = {i: s for s, i in self.vocab.items()}
        id_to_token.update({t["id"]: t["content"] for t in added})
        self.id_bytes = {}
        for i, s in id_to_token.items():
            byte_symbols = all(c in CHAR_TO_BYTE for c in s)
            self.id_bytes[i] = bytes(CHAR_TO_BYTE[c] for c in s) if byte_symbols else s.encode()
        self.cache = {}

    def _fail(self, field, what):
        raise ValueError(f"{self.file}: {field} {what}")

    def _field(self, obj, key, kind, name=None, default=None):
        value = obj.get(key, default)
        if not isinstance(value, kind):
            self._fail(name or key, f"is {type(value).__name__}; expected {kind.__name__}")
        return value

    def _pre_tokenizer(self, pre):
        """The pre-tokenizer chain as a list of functions list-of-pieces -> list-of-pieces. Known:
        Split with the LLaMA-3 or GPT-2 regex, Digits, and a final ByteLevel (whose use_regex means
        the GPT-2 regex)."""
        known = (LLAMA3_PATTERN, GPT2_PATTERN)
        sequence = isinstance(pre, dict) and pre.get("type") == "Sequence"
        steps = pre.get("pretokenizers") if sequence else [pre]
        funcs = []
        for k, step in enumerate(steps or []):
            name = f"pre_tokenizer.pretokenizers[{k}]" if sequence else "pre_tokenizer"
            kind = step.get("type") if isinstance(step, dict) else None
            if funcs and funcs[-1] is None:
                self._fail(name, "comes after ByteLevel; ByteLevel must be the last step")
            if kind == "Split":
                pattern = (step.get("pattern") or {}).get("Regex")
                if pattern not in known:
                    self._fail(f"{name}.pattern.Regex",
                               f"is {pattern!r}; known: the LLaMA-3 and GPT-2 regexes")
                if step.get("behavior") != "Isolated" or step.get("invert"):
                    self._fail(f"{name}.behavior", "must be Isolated with invert false")
                funcs.append(functools.partial(split_isolated, compile_onig(pattern)))
            elif kind == "Digits":
                digits = compile_onig(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
                funcs.append(functools.partial(split_isolated, digits))
            elif kind == "ByteLevel":
                if step.get("add_prefix_space"):
                    self._fail(f"{name}.add_prefix_space", "is true; LLaMA-style files have false")
                if step.get("use_regex", True):
                    funcs.append(functools.partial(split_isolated, compile_onig(GPT2_PATTERN)))
                funcs.append(None)  # marks the byte mapping, done in encode
            else:
                self._fail(f"{name}.type", f"is {kind!r}; expected Split, Digits or ByteLevel")
        if not funcs or funcs[-1] is not None:
            self._fail("pre_tokenizer", "has no final ByteLevel step; expected byte-level BPE")
        return funcs[:-1]

    def encode(self, text):
        """Text -> ids (no BOS/EOS): added tokens cut out first, the rest through the cached BPE."""
        ids, pos = [], 0
        for m in (self.added_regex.finditer(text) if self.added_regex else ()):
            start, end = m.span()
            if start < pos:                 # inside the whitespace an rstrip token swallowed
                continue
            # lstrip/rstrip tokens also swallow the whitespace on that side (HF's AddedToken)
            lstrip, rstrip = self.strip[m.group()]
            before = text[pos:start].rstrip(WHITE_SPACE) if lstrip else text[pos:start]
            ids += self._encode_plain(before)
            ids.append(self.added[m.group()])
            pos = len(text) - len(text[end:].lstrip(WHITE_SPACE)) if rstrip else end
        return ids + self._encode_plain(text[pos:])

    def _encode_plain(self, text):
        pieces = [text] if text else []
        for step in self.pre_steps:
            pieces = step(pieces)
        ids = []
        for piece in pieces:
            cached = self.cache.get(piece)
            if cached is None:
                symbols = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
                cached = self.cache[piece] = self._bpe(symbols)
                if len(self.cache) > 100_000:   # bound memory on endless streams of new text
                    self.cache = {piece: cached}
            ids += cached
        return ids

    def _bpe(self, word):
        """One pre-token (byte symbols) -> ids: repeatedly merge the adjacent pair of lowest rank
        (leftmost on ties), as HF's merge queue does. A heap of candidate pairs over a linked list
        of symbols keeps this O(n log n): a 1 MB run of letters is one pre-token."""
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        n = len(word)
        symbols = list(word)                           # symbols[i] = "" once merged into its left
        nxt = list(range(1, n + 1))                    # linked list over the live symbols
        prv = list(range(-1, n - 1))
        heap = [(self.ranks[pair], i, *pair) for i, pair in enumerate(zip(word, word[1:]))
                if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] != a or j >= n or symbols[j] != b:
                continue                               # stale: one side was merged meanwhile
            symbols[i], symbols[j] = a + b, ""
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            # the merged symbol forms new pairs with its neighbours
            for left, right in ((prv[i], i), (i, nxt[i])):
                pair = (symbols[left], symbols[right]) if left >= 0 and right < n else None
                if pair in self.ranks:
                    heapq.heappush(heap, (self.ranks[pair], left, *pair))
        return [self.vocab[s] for s in symbols if s]

    def decode(self, ids):
        """Ids -> text. Bytes that are not valid UTF-8 (e.g. half of a 4-byte emoji) become U+FFFD,
        as HF's from_utf8_lossy does; ids outside the vocabulary are skipped, as HF does."""
        data = b"".join(self.id_bytes.get(i, b"") for i in ids)
        return data.decode("utf-8", errors="replace")


def _read_json(file, what):
    """A JSON file -> dict, or a one-line error naming the file (a truncated file fails here)."""
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not UTF-8 text; expected {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"expected {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: is a JSON {type(data).__name__}; expected {what} (an object)")
    return data


def _hf_special_ids(directory, bpe):
    """(bos, eos, pad) ids the way Hugging Face resolves them: the tokenizer's
    bos_token/eos_token/pad_token from special_tokens_map.json (which transformers lets override) or
    tokenizer_config.json; failing those, the model's *_token_id from generation_config.json, then
    config.json (a list of EOS ids, as in LLaMA-3.1 instruct, gives its first). A missing pad, or
    one equal to EOS, becomes the first special added token that is neither BOS nor EOS (it never
    occurs in text), else id 0: never EOS (see the module docstring)."""
    names = ("special_tokens_map.json", "tokenizer_config.json", "generation_config.json",
             "config.json")
    files = [os.path.join(directory, n) for n in names]
    found = [(f, _read_json(f, "a JSON object")) if os.path.isfile(f) else (f, {}) for f in files]

    def resolve(kind):
        for f, data in found[:2]:
            token = data.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                if not isinstance(token, str) or not (token in bpe.added or token in bpe.vocab):
                    raise ValueError(f"{f}: {kind}_token {token!r} is not a token of {bpe.file}")
                return bpe.added.get(token, bpe.vocab.get(token))
        for f, data in found[2:]:
            value = data.get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if value is not None:
                if type(value) is not int or not 0 <= value < bpe.vocab_size:
                    raise ValueError(f"{f}: {kind}_token_id is {value!r}; expected an id in "
                                     f"[0, {bpe.vocab_size})")
                return value
        return None

    bos, eos, pad = resolve("bos"), resolve("eos"), resolve("pad")
    for kind, value in (("bos", bos), ("eos", eos)):
        if value is None:
            raise ValueError(f"{directory}: no {kind}_token in special_tokens_map.json or "
                             f"tokenizer_config.json, and no {kind}_token_id in "
                             f"generation_config.json or config.json")
    if pad is None or pad == eos:
        spare = sorted(bpe.special_ids - {bos, eos})
        pad = spare[0] if spare else 0 if eos != 0 else 1
    return bos, eos, pad
