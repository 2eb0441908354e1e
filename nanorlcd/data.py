"""Prompt and preference-data I/O: where RLCD's dialogue prompts come from and where its pairs go.

What:
  - `load_prompts(path, kind)`: dialogue prompts ending in "\\n\\nAssistant:" from four sources:
      "hh"       HH-RLHF jsonl: each line's `chosen` dialogue cut after its last "Assistant:" (paper Sec. 4;
                 facebookresearch/RLCD@0a389fd `scripts/simulate_preference_data.py`);
      "jsonl"    a plain jsonl of {"prompt": "..."};
      "premises" a text file with one story premise per line (outline task): each premise becomes a one-turn
                 dialogue asking for an outline (OUTLINE_REQUEST, nanorlcd's own wording: the paper's outline
                 prompts were not released);
      "toy"      the spec "toy:train" / "toy:test": the toy world's splits (`nanorlcd.toy.split_prompts`).
  - `load_hh_pairs(path)`: HH-RLHF (prompt, chosen response, rejected response) triples, for the preference
    model's agreement with human labels (the paper's 2000 HH-RLHF test pairs).
  - `write_records` / `read_records`: the preference-record JSONL of DESIGN.md, and the context-distillation
    view (prompt, o+) that `sft` trains on (`write_sft_data`, read back by `read_sft_data`).
Prompt normalisation: the reference keeps `chosen[:chosen.rindex('Assistant:') + len('Assistant:')].strip()`,
which drops the leading "\\n\\n" of "\\n\\nHuman:". Our prompt format (DESIGN.md) keeps it, so every source is
normalised to "\\n\\n" + text.strip(): for HH-RLHF (whose dialogues start with "\\n\\nHuman:") that is exactly
the raw prefix `chosen[:cut]`. Where the reference strips again (the RLAIF scoring prompt), rlcd.py strips too.
Bad input: lines that are not JSON, lack the field, or hold no "\\n\\nAssistant:" turn to continue are skipped
and counted (the summary has the count, the reasons and the first bad line number); blank lines are ignored;
a file with no usable prompt is a ValueError naming the file.
Run: `python -c "from nanorlcd.data import load_prompts; print(load_prompts('toy:test')[1])"`.
"""
import json
import os

# The assistant tag a prompt must end with, so RLCD can put an affix into it.
ASSISTANT_TAG = "\n\nAssistant:"

# Outline task: premise -> request (nanorlcd's own wording; the paper's outline prompts were not released).
OUTLINE_REQUEST = "Write an outline for a short story with the following premise: {premise}"

# One preference record (DESIGN.md); label_prob = simulated probability that `chosen` is better.
RECORD_FIELDS = ("id", "task", "method", "prompt", "chosen", "rejected", "pos_prompt", "neg_prompt",
                 "affix_index", "label_prob")


def normalize_prompt(text):
    """Text -> prompt in our format ("\\n\\nHuman: ...\\n\\nAssistant:"), or None if it has no final assistant tag."""
    prompt = "\n\n" + text.strip()
    return prompt if prompt.endswith(ASSISTANT_TAG) else None


def cut_dialogue(dialogue):
    """HH dialogue -> (prompt, response): cut after the last "Assistant:" as the reference does; None if absent."""
    cut = dialogue.rfind("Assistant:")
    if cut < 0:
        return None
    cut += len("Assistant:")
    prompt = normalize_prompt(dialogue[:cut])
    return None if prompt is None else (prompt, dialogue[cut:].strip())


def _parse_lines(path, parse):
    """Apply parse(line) -> (item, None) | (None, reason) to each non-blank line; count and locate bad lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    items, reasons, first_bad, n_lines = [], {}, None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            # 1. blank lines separate nothing and are not data
            if not line.strip():
                continue
            n_lines += 1
            # 2. parse; a bad line is counted by reason, and the first one is remembered for the message
            item, reason = parse(line)
            if reason is not None:
                reasons[reason] = reasons.get(reason, 0) + 1
                first_bad = first_bad or lineno
                continue
            items.append(item)
    summary = {"path": str(path), "lines": n_lines, "kept": len(items), "bad": sum(reasons.values()),
               "first_bad_line": first_bad, "reasons": reasons}
    if not items:
        raise ValueError(f"{path}: no usable line ({summary['bad']} bad, first bad line {first_bad}, "
                         f"reasons {reasons})")
    return items, summary


def _json_field(line, field):
    """One jsonl line -> (the string field, None) or (None, reason)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        return None, f"no '{field}' string"
    return obj[field], None


def _parse_hh(line):
    # HH-RLHF: the `chosen` dialogue up to and including its last "Assistant:"
    chosen, reason = _json_field(line, "chosen")
    if reason:
        return None, reason
    cut = cut_dialogue(chosen)
    return (cut[0], None) if cut else (None, "no 'Assistant:' turn")


def _parse_plain(line):
    # plain jsonl: the prompt as given, normalised
    text, reason = _json_field(line, "prompt")
    if reason:
        return None, reason
    prompt = normalize_prompt(text)
    return (prompt, None) if prompt else (None, "prompt does not end with 'Assistant:'")


def _parse_premise(line):
    # one premise per line -> a one-turn dialogue requesting an outline
    request = OUTLINE_REQUEST.format(premise=line.strip())
    return f"\n\nHuman: {request}{ASSISTANT_TAG}", None


def _guess_kind(path):
    """toy:<split> -> toy, *.txt -> premises, jsonl -> hh if its first JSON object has `chosen`, else jsonl."""
    if str(path).startswith("toy:"):
        return "toy"
    if str(path).endswith(".txt"):
        return "premises"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            return "hh" if isinstance(obj, dict) and "chosen" in obj else "jsonl"
    return "jsonl"


def load_prompts(path, kind=None):
    """Prompts from `path` (kind hh | jsonl | premises | toy; None = guess) -> (prompts, summary dict)."""
    kind = kind or _guess_kind(path)
    if kind == "toy":
        # the toy world's split, e.g. "toy:test"; its prompts are already in our format, validate anyway
        from nanorlcd import toy
        split = str(path).split(":", 1)[1] if str(path).startswith("toy:") else str(path)
        raw = toy.split_prompts(split)
        prompts = [p for p in (normalize_prompt(t) for t in raw) if p]
        if not prompts:
            raise ValueError(f"toy:{split}: no usable prompt in the toy split")
        bad = len(raw) - len(prompts)
        return prompts, {"path": f"toy:{split}", "kind": kind, "lines": len(raw), "kept": len(prompts),
                         "bad": bad, "first_bad_line": None, "reasons": {"no final Assistant:": bad} if bad else {}}
    parsers = {"hh": _parse_hh, "jsonl": _parse_plain, "premises": _parse_premise}
    if kind not in parsers:
        raise ValueError(f"{path}: unknown prompt kind '{kind}' (expected hh, jsonl, premises or toy)")
    prompts, summary = _parse_lines(path, parsers[kind])
    return prompts, {**summary, "kind": kind}


def _parse_hh_pair(line):
    # both dialogues must continue the same prefix; the responses are what follows the last "Assistant:"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("chosen", "rejected")):
        return None, "no 'chosen'/'rejected' strings"
    chosen, rejected = cut_dialogue(obj["chosen"]), cut_dialogue(obj["rejected"])
    if chosen is None or rejected is None:
        return None, "no 'Assistant:' turn"
    if chosen[0] != rejected[0]:
        return None, "chosen and rejected continue different dialogues"
    return {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}, None


def load_hh_pairs(path):
    """HH-RLHF jsonl -> ([{"prompt", "chosen", "rejected"}], summary); responses are stripped text."""
    pairs, summary = _parse_lines(path, _parse_hh_pair)
    return pairs, {**summary, "kind": "hh_pairs"}


def write_records(path, records):
    """Append preference records as JSON lines and flush, so a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            missing = [k for k in RECORD_FIELDS if k not in rec]
            if missing:
                raise ValueError(f"{path}: record {rec.get('id')} lacks fields {missing}")
            f.write(json.dumps({k: rec[k] for k in RECORD_FIELDS}, ensure_ascii=False) + "\n")
        f.flush()


def read_records(path, repair=False):
    """Preference records from a JSONL file. With repair=True a last line without its newline (a run killed
    mid-write) is cut off the file so appending can resume cleanly; any other bad line is a ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: preference file not found")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # lines[-1] is what follows the last newline: b"" for a complete file, else a partial line
    records, offset = [], 0
    for lineno, raw in enumerate(lines, start=1):
        if lineno == len(lines) and raw and repair:
            # drop the partial tail: truncate the file to the end of the last complete line
            with open(path, "r+b") as f:
                f.truncate(offset)
            break
        offset += len(raw) + 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or any(k not in rec for k in RECORD_FIELDS):
            raise ValueError(f"{path}:{lineno}: not a complete preference record (expected JSON with fields "
                             f"{', '.join(RECORD_FIELDS)})")
        records.append(rec)
    return records


def write_sft_data(records, path):
    """Context-distillation view (paper Sec. 4 baselines): one {"id", "prompt", "response"} line per RLCD
    record, response = o+ (the `chosen` output of p+), prompt = the plain, affix-free prompt."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({"id": rec["id"], "prompt": rec["prompt"], "response": rec["chosen"]},
                               ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_sft_data(path):
    """(prompt, response) pairs of a context-distillation file (`write_sft_data`'s layout), as written: the
    response carries no leading space, since sft.tokenize_example puts the single " " between prompt and reply."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((row["prompt"], row["response"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with \"prompt\" and \"response\" "
                                 f"({type(e).__name__}: {e})") from None
    return pairs
