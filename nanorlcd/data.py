"""Prompt and preference-data I/O: where RLCD's dialogue prompts come from and where its pairs go.

What: `load_prompts` reads prompts ending in "\\n\\nAssistant:" from HH-RLHF jsonl (each `chosen`
dialogue cut after its last "Assistant:", paper Sec. 4), a {"prompt"} jsonl, a story-premise file
(outline task) or a toy split; `load_hh_pairs` reads HH-RLHF's human-labelled pairs (Table 5);
`read_prefs` is the one reader of a preference file (simulator resume, shard merge, PM training);
`write_sft_data` / `read_sft_data` hold the context-distillation view. Simulation bookkeeping: an
output is written aside (`*.partial.jsonl`), renamed into place only when every prompt id is done
and marked by `<out>.done` (`is_complete`); a resume must continue the same inputs and settings; a
lock file refuses a second writer; `merge_shards` joins the rank shards.
Bad input: one line naming the file and line (not UTF-8, not JSON, missing field); prompt loaders
skip and count bad lines, the preference reader stops at the first unless skip_bad; a BOM is fine.
Run: `python -c "from nanorlcd.data import load_prompts; print(load_prompts('toy:test')[1])"`.
"""
import hashlib
import json
import os
import re
import socket
import time

from nanorlcd.dialogue import ASSISTANT, HUMAN

# Kept for older imports: the assistant tag every prompt ends with (RLCD puts its affix into it).
ASSISTANT_TAG = ASSISTANT

# Outline task: premise -> request (our own wording: the paper's outline prompts were not released).
OUTLINE_REQUEST = "Write an outline for a short story with the following premise: {premise}"

# One record as the simulator writes it; label_prob = the probability that `chosen` is better.
RECORD_FIELDS = ("id", "task", "method", "prompt", "chosen", "rejected", "pos_prompt", "neg_prompt",
                 "affix_index", "label_prob")


# ----------------------------------------------------------------------------- reading text files

def _text_lines(path, what="file", repair=False, complete_only=False):
    """A UTF-8 (optionally BOM-prefixed) text file -> [(line number, line)], blank lines included.

    Decoding is per line, so a byte that is not UTF-8 gives a one-line error with its file and line.
    A last line without its newline (a writer killed mid-line) is left out with complete_only=True,
    and with repair=True also cut off the file itself, so that appending continues on a new line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        data = f.read()
    if (repair or complete_only) and data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    # utf-8-sig: a BOM at the start is an encoding mark, not part of the first record
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()                                  # the empty piece after the final newline
    out = []
    for lineno, raw in enumerate(lines, start=1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                             f"column {e.start + 1}); expected a UTF-8 {what}") from None
    return out


def _parse_lines(path, parse, what="prompt file", limit=None, empty_ok=False, repair=False):
    """Apply parse(line) -> (item, None) | (None, reason) to each non-blank line; count and locate
    bad lines; limit: read only the first `limit` non-blank lines. Returns (items, summary)."""
    items, reasons, first_bad, n_lines = [], {}, None, 0
    for lineno, line in _text_lines(path, what, repair):
        # 1. blank lines separate nothing and are not data
        if not line.strip():
            continue
        if limit is not None and n_lines >= limit:
            break
        # 2. parse; (None, None) is a line that is not data (a comment); a bad line is counted
        #    by reason, and the first one is remembered for the message
        item, reason = parse(line)
        if item is None and reason is None:
            continue
        n_lines += 1
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
            first_bad = first_bad or lineno
            continue
        items.append(item)
    summary = {"path": str(path), "lines": n_lines, "kept": len(items),
               "bad": sum(reasons.values()), "first_bad_line": first_bad, "reasons": reasons}
    if not items and not empty_ok:
        raise ValueError(f"{path}: no usable line ({summary['bad']} bad, first bad line "
                         f"{first_bad}, reasons {reasons})")
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


# ----------------------------------------------------------------------------- prompts

def normalize_prompt(text):
    """Text -> prompt in our format ("\\n\\nHuman: ...\\n\\nAssistant:"), or None without one.

    The reference keeps `chosen[:rindex('Assistant:') + 10].strip()`, which drops HH's leading
    "\\n\\n"; our format keeps it (every turn, the first too, opens with its tag), so each source
    becomes "\\n\\n" + strip: for HH-RLHF that is exactly the raw prefix. The RLAIF scoring prompt
    strips again, as the reference does."""
    prompt = "\n\n" + text.strip()
    return prompt if prompt.endswith(ASSISTANT) else None


def cut_dialogue(dialogue):
    """HH dialogue -> (prompt, response), cut after the last "Assistant:" as the reference does;
    None if there is none."""
    cut = dialogue.rfind("Assistant:")
    if cut < 0:
        return None
    cut += len("Assistant:")
    prompt = normalize_prompt(dialogue[:cut])
    return None if prompt is None else (prompt, dialogue[cut:].strip())


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
    # premise file: one premise per line; a line starting with '#' is a comment
    premise = line.strip()
    if premise.startswith("#"):
        return None, None
    if "Human:" in premise or "Assistant:" in premise:
        return None, "premise holds a turn tag"
    return f"{HUMAN} {OUTLINE_REQUEST.format(premise=premise)}{ASSISTANT}", None


def _guess_kind(path):
    """toy:<split> -> toy, *.txt -> premises, jsonl -> hh if its first JSON object has `chosen`,
    else jsonl."""
    if str(path).startswith("toy:"):
        return "toy"
    if str(path).endswith(".txt"):
        return "premises"
    for _, line in _text_lines(path, "prompt file"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        return "hh" if isinstance(obj, dict) and "chosen" in obj else "jsonl"
    return "jsonl"


def load_prompts(path, kind=None):
    """Prompts from `path` (kind hh | jsonl | premises | toy; None: guess) -> (prompts, summary)."""
    kind = kind or _guess_kind(path)
    if kind == "toy":
        # the toy world's split, e.g. "toy:test": already in our format, validated anyway
        from nanorlcd import toy
        split = str(path).split(":", 1)[1] if str(path).startswith("toy:") else str(path)
        raw = toy.split_prompts(split)
        prompts = [p for p in (normalize_prompt(t) for t in raw) if p]
        if not prompts:
            raise ValueError(f"toy:{split}: no usable prompt in the toy split")
        bad = len(raw) - len(prompts)
        return prompts, {"path": f"toy:{split}", "kind": kind, "lines": len(raw),
                         "kept": len(prompts), "bad": bad, "first_bad_line": None,
                         "reasons": {"no final Assistant:": bad} if bad else {}}
    parsers = {"hh": _parse_hh, "jsonl": _parse_plain, "premises": _parse_premise}
    if kind not in parsers:
        raise ValueError(f"{path}: unknown prompt kind '{kind}' "
                         "(expected hh, jsonl, premises or toy)")
    prompts, summary = _parse_lines(path, parsers[kind])
    return prompts, {**summary, "kind": kind}


def _parse_hh_pair(line):
    """One HH-RLHF line -> ({prompt, chosen, rejected[, rejected_prompt]}, None) or (None, reason).
    Each dialogue is cut after its own last "Assistant:"; when the two differ before that (a few
    HH-RLHF lines do) the rejected reply keeps its own prompt, and each side is scored whole, as the
    reference scores chosen.strip() + "\\n\\nHuman:" and rejected.strip() + "\\n\\nHuman:"."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str)
                                            for k in ("chosen", "rejected")):
        return None, "no 'chosen'/'rejected' strings"
    chosen, rejected = cut_dialogue(obj["chosen"]), cut_dialogue(obj["rejected"])
    if chosen is None or rejected is None:
        return None, "no 'Assistant:' turn"
    pair = {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}
    if rejected[0] != chosen[0]:
        pair["rejected_prompt"] = rejected[0]
    return pair, None


def load_hh_pairs(path, limit=None):
    """HH-RLHF jsonl -> ([{"prompt", "chosen", "rejected"}], summary); responses are stripped text.

    For the PM's agreement with human labels (paper Table 5) the RLCD reference
    (`evaluate_reward_model_human_agreement.py` in its AlpacaFarm patch) reads the first 2000 lines
    of the task's HH-RLHF *train* file (harmless-base or helpful-base `train.jsonl`): pass
    limit=2000 for that."""
    pairs, summary = _parse_lines(path, _parse_hh_pair, "HH-RLHF file", limit=limit)
    return pairs, {**summary, "kind": "hh_pairs"}


# ----------------------------------------------------------------------------- preference records

def parse_pref(line, require=()):
    """One preference JSONL line -> (record, None) or (None, reason).

    A record needs `prompt`, `chosen`, `rejected` strings and `label_prob` (the probability that
    `chosen` is better) in [0, 1], null or absent (a hard label: 1.0); `require` names further
    fields that must be there (the simulator's own files carry all of RECORD_FIELDS)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str)
                                            for k in ("prompt", "chosen", "rejected")):
        return None, "no 'prompt'/'chosen'/'rejected' strings"
    missing = [k for k in require if k not in rec]
    if missing:
        return None, f"no {'/'.join(missing)}"
    p = rec.get("label_prob")
    p = 1.0 if p is None else p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        return None, "label_prob is not a number in [0, 1]"
    return {**rec, "label_prob": float(p)}, None


def read_prefs(path, skip_bad=False, repair=False, require=(), empty_ok=False):
    """The one reader of a preference file -> (records, summary).

    A bad line (not UTF-8, not JSON, a missing field, label_prob outside [0, 1]) is a ValueError
    naming the file and its first bad line, unless skip_bad=True, which skips and counts them in the
    summary. repair=True first cuts a partial last line off the file (a run killed mid-write; used
    when appending resumes). A file with no record at all is an error unless empty_ok."""
    records, summary = _parse_lines(path, lambda line: parse_pref(line, require),
                                    "preference file", empty_ok=True, repair=repair)
    if summary["bad"] and not skip_bad:
        raise ValueError(f"{path}:{summary['first_bad_line']}: bad preference record "
                         f"({summary['bad']} bad lines: {summary['reasons']}); expected JSON with "
                         "'prompt', 'chosen', 'rejected' strings and 'label_prob' in [0, 1] or "
                         "null (train.py --pm.skip_bad=true skips and counts such lines)")
    if not records and not empty_ok:
        raise ValueError(f"{path}: no usable line ({summary['bad']} bad, first bad line "
                         f"{summary['first_bad_line']}, reasons {summary['reasons']})")
    return records, summary


def read_records(path, repair=False):
    """The simulator's own records (all of RECORD_FIELDS) as a list: `read_prefs`, strict."""
    return read_prefs(path, repair=repair, require=RECORD_FIELDS, empty_ok=True)[0]


def write_records(path, records):
    """Append preference records as JSON lines and flush: a crash loses at most one line."""
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            missing = [k for k in RECORD_FIELDS if k not in rec]
            if missing:
                raise ValueError(f"{path}: record {rec.get('id')} lacks fields {missing}")
            f.write(json.dumps({k: rec[k] for k in RECORD_FIELDS}, ensure_ascii=False) + "\n")
        f.flush()


def write_sft_data(records, path):
    """Context-distillation view (paper Sec. 4 baselines): one {"id", "prompt", "response"} line per
    RLCD record, response = o+ (the `chosen` output of p+), prompt = the plain, affix-free one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            row = {"id": rec["id"], "prompt": rec["prompt"], "response": rec["chosen"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_sft_data(path):
    """(prompt, response) pairs of a context-distillation file (`write_sft_data`'s layout), as
    written: the response carries no leading space, since sft.tokenize_example puts the single " "
    between prompt and reply."""
    pairs = []
    for lineno, line in _text_lines(path, "context-distillation file"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((row["prompt"], row["response"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with \"prompt\" and "
                             f"\"response\" ({type(e).__name__}: {e})") from None
    return pairs


# ----------------------------------------------------------------------------- simulation files
# The files of one simulation output prefs.jsonl (rank shards only with several ranks):
#   prefs.partial.jsonl          records of the run in progress (one process, or the merged shards)
#   prefs.partial.rank{r}.jsonl  rank r's records; a *.dropped.jsonl beside each: dropped ids, why
#   prefs.jsonl.partial.json     the settings of the run in progress (checked by a resume)
#   prefs.jsonl.lock             {"pid", "host"} of the live writer (rank r > 0: .rank{r}.lock)
#   prefs.jsonl, prefs.dropped.jsonl, prefs.jsonl.done: the finished output, renamed into place
#       only when every prompt id is a record or a dropped id; .done holds the settings, the
#       counts and the sha256 of prefs.jsonl.
# Until that rename an earlier finished output stays untouched; a killed run leaves .partial files.

def _sibling(path, tag):
    """prefs-rlcd.jsonl + "rank1" -> prefs-rlcd.rank1.jsonl."""
    root, ext = os.path.splitext(str(path))
    return f"{root}.{tag}{ext or '.jsonl'}"


def partial_path(out_path):
    """Where the records of a run in progress go: prefs.jsonl -> prefs.partial.jsonl."""
    return _sibling(out_path, "partial")


def dropped_path(path):
    """The dropped-id log beside a records file: x.partial.jsonl -> x.partial.dropped.jsonl."""
    return _sibling(path, "dropped")


def shard_path(out_path, rank, world_size):
    """The file rank `rank` appends to: the partial file with one process, else the rank's shard."""
    part = partial_path(out_path)
    return part if world_size == 1 else _sibling(part, f"rank{rank}")


def _read_dropped(path, repair=False):
    """The dropped-id log -> {id: reason}. A partial last line is ignored (its batch is simply
    redone), and with repair=True also cut off the file, so that appending continues on a fresh
    line."""
    if not os.path.isfile(path):
        return {}
    rows = {}
    for lineno, line in _text_lines(path, "dropped-id log", repair, complete_only=True):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["id"]] = row["reason"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: expected {{'id': int, 'reason': str}}") from None
    return rows


def write_dropped(path, dropped):
    """Append {id: reason} to a dropped-id log (created even when empty)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "reason": r}) + "\n" for i, r in sorted(dropped.items()))


def _write_atomic(path, text):
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_ranks(out_path):
    """Ranks with a shard (records or dropped ids) of this output on disk, any world size."""
    part = partial_path(out_path)
    folder, name = os.path.split(part)
    root, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(root) + r"\.rank(\d+)(\.dropped)?" + re.escape(ext) + "$")
    found = (pattern.match(f) for f in os.listdir(folder or "."))
    return sorted({int(m.group(1)) for m in found if m})


def merge_shards(out_path, world_size=None):
    """Rank 0, after every rank finished: rank shards (+ an earlier merge) -> the partial file
    ordered by id, one record per id, and the dropped-id logs likewise; shards are removed. Then
    `finish` renames the output into place if every prompt id is accounted for. world_size is
    unused (every shard on disk is merged: a resume may run on another number of ranks). Returns
    the merged records."""
    part = partial_path(out_path)
    records, dropped = {}, _read_dropped(_sibling(part, "dropped"))
    if os.path.isfile(part):
        records.update({r["id"]: r for r in read_records(part, repair=True)})
    ranks = _shard_ranks(out_path)
    for r in ranks:
        shard = _sibling(part, f"rank{r}")
        if os.path.isfile(shard):
            records.update({rec["id"]: rec for rec in read_records(shard, repair=True)})
        dropped.update(_read_dropped(_sibling(shard, "dropped")))
    # write both files atomically, then remove the shards
    rows = [records[i] for i in sorted(records)]
    _write_atomic(part, "".join(json.dumps({k: r[k] for k in RECORD_FIELDS}, ensure_ascii=False)
                                + "\n" for r in rows))
    _write_atomic(_sibling(part, "dropped"), "".join(json.dumps({"id": i, "reason": dropped[i]})
                                                     + "\n" for i in sorted(dropped)))
    for r in ranks:
        for p in (_sibling(part, f"rank{r}"), _sibling(_sibling(part, f"rank{r}"), "dropped")):
            if os.path.isfile(p):
                os.remove(p)
    finish(out_path)
    return rows


def start_run(out_path, settings, rank, world_size, resume):
    """Prepare this rank's files; returns {id: "record" | reason} of the ids already done (resume).

    A fresh run removes the leftovers of an earlier interrupted run (rank 0: the merged partial
    files, its settings and shards of ranks beyond world_size; each rank: its own shard) and rank 0
    records `settings`. resume=True checks that `settings` equal those of the interrupted run (or of
    the finished output if there is no partial run) and refuses with a one-line error naming the
    first difference."""
    part, shard = partial_path(out_path), shard_path(out_path, rank, world_size)
    settings_path = f"{out_path}.partial.json"
    if not resume:
        stale = [shard]
        if rank == 0:
            stale += [part, settings_path]
            stale += [_sibling(part, f"rank{r}") for r in _shard_ranks(out_path) if r >= world_size]
        for path in stale + [_sibling(p, "dropped") for p in stale if p != settings_path]:
            if os.path.isfile(path):
                os.remove(path)
        if rank == 0:
            _write_atomic(settings_path, json.dumps(settings, sort_keys=True, indent=1) + "\n")
        open(shard, "a").close()                     # exists even if every example is dropped
        return {}
    # resume: the run to continue is the partial one if any, else the finished output
    partial_files = [part, shard, _sibling(part, "dropped"), _sibling(shard, "dropped")]
    if any(os.path.isfile(p) for p in partial_files) or os.path.isfile(settings_path):
        if not os.path.isfile(settings_path):
            raise ValueError(f"{settings_path}: missing, so the interrupted run's settings are "
                             "unknown; start afresh without --resume")
        _check_settings(settings_path, _load_json(settings_path), settings)
        # path -> repair?: only this rank's own file is appended to, so only it is repaired
        sources = {part: False, shard: True}
        open(shard, "a").close()
    elif completion(out_path) is not None:
        _check_settings(f"{out_path}.done", completion(out_path)["settings"], settings)
        sources = {out_path: False}
    else:
        # nothing to resume: a fresh run
        return start_run(out_path, settings, rank, world_size, resume=False)
    done = {}
    for path, repair in sources.items():
        if os.path.isfile(path):
            done.update({r["id"]: "record" for r in read_records(path, repair=repair)})
        done.update(_read_dropped(_sibling(path, "dropped"), repair=repair))
    return done


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON settings file ({type(e).__name__})") from None


def _check_settings(path, old, new):
    """Refuse to continue a run made with other inputs or settings (names the first difference)."""
    def short(value):                                # a sha256 reads fine as its first 12 digits
        return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else value

    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ValueError(f"{path}: the run to resume has {key}={short(old.get(key))!r}, "
                             f"this one {short(new.get(key))!r}; resume with the same prompts and "
                             "settings, or start afresh without --resume")


def finish(out_path):
    """Rank 0: if every prompt id of the partial run is a record or a dropped id, write `<out>.done`
    and rename the partial files into place (the previous output, if any, is replaced only now).
    Returns whether the output is complete."""
    part, settings_path = partial_path(out_path), f"{out_path}.partial.json"
    if not os.path.isfile(part) or not os.path.isfile(settings_path):
        return completion(out_path) is not None
    settings = _load_json(settings_path)
    ids = [r["id"] for r in read_records(part)]
    dropped = _read_dropped(_sibling(part, "dropped"))
    if set(ids) | set(dropped) != set(range(settings["n_prompts"])):
        return False
    if not os.path.isfile(_sibling(part, "dropped")):
        write_dropped(_sibling(part, "dropped"), {})
    # the marker first, then the renames: a kill in between leaves the partial files to resume
    marker = {"settings": settings, "records": len(ids), "dropped": len(dropped),
              "sha256": _sha256(part)}
    _write_atomic(f"{out_path}.done", json.dumps(marker, sort_keys=True, indent=1) + "\n")
    os.replace(_sibling(part, "dropped"), _sibling(out_path, "dropped"))
    os.replace(part, out_path)
    os.remove(settings_path)
    return True


def completion(out_path):
    """The `<out>.done` marker of a finished simulation output (dict: settings, records, dropped,
    sha256), or None if the output is missing, unfinished, or changed since (its sha256 differs)."""
    marker_path = f"{out_path}.done"
    if not (os.path.isfile(out_path) and os.path.isfile(marker_path)):
        return None
    try:
        marker = _load_json(marker_path)
    except ValueError:
        return None
    ok = isinstance(marker, dict) and marker.get("sha256") == _sha256(out_path)
    return marker if ok else None


def is_complete(out_path):
    """Whether `out_path` is a finished simulation output (not a killed run's, not edited since)."""
    return completion(out_path) is not None


# ----------------------------------------------------------------------------- one writer

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                  # someone else's live process
    return True


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def lock_path(out_path, rank=0):
    """The lock of rank `rank` writing out_path: out.lock (rank 0), else out.rank{r}.lock."""
    return f"{out_path}.lock" if rank == 0 else f"{out_path}.rank{rank}.lock"


def acquire_lock(path):
    """Create the lock file `path` holding our pid and host; a live holder is refused with a
    one-line error, a stale one (its process is gone, on this host) is replaced."""
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = None
            if holder is None and time.time() - _mtime(path) < 5:
                holder = {"pid": "?", "host": "?"}   # just created, its content is on the way
            stale = holder is None or (holder.get("host") == me["host"]
                                       and isinstance(holder.get("pid"), int)
                                       and not _pid_alive(holder["pid"]))
            if not stale:
                raise ValueError(f"{path}: another writer (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}) is producing this output; wait for it, or "
                                 "delete the lock file if that process is gone")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return path
    raise ValueError(f"{path}: could not take the lock (another writer keeps taking it)")


def release_lock(path):
    """Remove our lock file (only if it is still ours)."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid():
        os.remove(path)
