"""Tests for nanorlcd/data.py: prompt extraction and preference-record I/O.

What is checked, and against what:
- HH-RLHF prompts: a fixture with good and bad lines; the prompts against hand-written strings and
  against the reference's own rule ("\\n\\n" + chosen[:rindex('Assistant:') + 10].strip()); the
  counts, reasons and the first bad line number; a file with no usable line is a ValueError naming
  it;
- plain {"prompt"} jsonl, story premises (the outline request) and the toy splits, with kind
  detection;
- HH chosen/rejected pairs for the PM's human-agreement evaluation;
- preference records: round trip, a partial last line cut off by repair=True, a corrupt line in the
  middle, the one reader `read_prefs` (skip_bad counting, the file:line error, required fields;
  pm.read_prefs is the same reader), and the context-distillation view;
- encodings (faults reproduced): a non-UTF-8 byte is a one-line error naming file and line in every
  reader; a UTF-8 BOM does not cost the first record (HH prompts, kind guess, preferences, SFT
  view);
- the shipped premise file nanorlcd/premises.txt (outline task) and its format rules.
Run: `python -m pytest tests/test_data.py -q`
"""
import json
import os

import pytest

from nanorlcd.data import (OUTLINE_REQUEST, RECORD_FIELDS, cut_dialogue, load_hh_pairs,
                           load_prompts, read_prefs, read_records, read_sft_data, write_records,
                           write_sft_data)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_TURN = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water and yeast."
TWO_TURNS = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
             "\n\nHuman: How do I steal a car?\n\nAssistant: I can not help with that.")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def reference_prompt(chosen):
    """The RLCD reference's prompt (simulate_preference_data.py), with our leading "\\n\\n" put
    back."""
    return "\n\n" + chosen[:chosen.rindex("Assistant:") + len("Assistant:")].strip()


def test_hh_prompts_good_and_bad_lines(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [
        json.dumps({"chosen": ONE_TURN, "rejected": "x"}),            # 1 good
        json.dumps({"chosen": TWO_TURNS, "rejected": "x"}),           # 2 good, multi-turn
        '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"',            # 3 not JSON (truncated)
        json.dumps({"rejected": ONE_TURN}),                           # 4 no 'chosen'
        "",                                                           # blank: ignored, not counted
        json.dumps({"chosen": "\n\nHuman: no reply tag here"}),       # 6 no 'Assistant:'
        json.dumps({"chosen": ONE_TURN.replace("bread", "cake")}),    # 7 good
    ])
    prompts, summary = load_prompts(path)
    assert prompts == ["\n\nHuman: How do I bake bread?\n\nAssistant:",
                       "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
                       "\n\nHuman: How do I steal a car?\n\nAssistant:",
                       "\n\nHuman: How do I bake cake?\n\nAssistant:"]
    assert prompts == [reference_prompt(c)
                       for c in (ONE_TURN, TWO_TURNS, ONE_TURN.replace("bread", "cake"))]
    assert summary["kind"] == "hh"
    assert ((summary["lines"], summary["kept"], summary["bad"], summary["first_bad_line"])
            == (6, 3, 3, 3))
    assert summary["reasons"] == {"not JSON": 1, "no 'chosen' string": 1, "no 'Assistant:' turn": 1}


def test_no_usable_prompt_is_an_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["not json", json.dumps({"chosen": "no tag"})])
    with pytest.raises(ValueError, match="bad.jsonl"):
        load_prompts(path, kind="hh")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"), kind="hh")
    with pytest.raises(ValueError, match="unknown prompt kind"):
        load_prompts(path, kind="csv")


def test_plain_jsonl_and_premises(tmp_path):
    plain = write_lines(tmp_path / "p.jsonl", [
        # leading "\n\n" added
        json.dumps({"prompt": "Human: How do I fix a bike?\n\nAssistant:"}),
        json.dumps({"prompt": "Human: no tag"}),                               # 2 bad
        # trailing space stripped
        json.dumps({"prompt": "\n\nHuman: Hi\n\nAssistant:  "})])
    prompts, summary = load_prompts(plain)
    assert summary["kind"] == "jsonl" and summary["first_bad_line"] == 2 and summary["bad"] == 1
    assert prompts == ["\n\nHuman: How do I fix a bike?\n\nAssistant:",
                       "\n\nHuman: Hi\n\nAssistant:"]
    premises = write_lines(tmp_path / "premises.txt",
                           ["A dragon learns to cook.", "", "  Two robots fall in love. "])
    prompts, summary = load_prompts(premises)
    assert summary["kind"] == "premises" and summary["kept"] == 2
    assert prompts[1] == ("\n\nHuman: Write an outline for a short story with the following "
                          "premise: Two robots fall in love.\n\nAssistant:")
    request = OUTLINE_REQUEST.format(premise='A dragon learns to cook.')
    assert prompts[0] == f"\n\nHuman: {request}\n\nAssistant:"


def test_toy_split():
    toy = pytest.importorskip("nanorlcd.toy")
    prompts, summary = load_prompts("toy:test")
    assert prompts == toy.split_prompts("test") and summary["bad"] == 0 and summary["kind"] == "toy"


def test_hh_pairs(tmp_path):
    rejected = TWO_TURNS.replace("I can not help with that.", "Wait until nobody looks.")
    path = write_lines(tmp_path / "pairs.jsonl", [
        json.dumps({"chosen": TWO_TURNS, "rejected": rejected}),
        json.dumps({"chosen": ONE_TURN, "rejected": TWO_TURNS}),    # 2: different dialogues, kept
        json.dumps({"chosen": ONE_TURN}),                           # 3: no rejected
    ])
    pairs, summary = load_hh_pairs(path)
    assert pairs[0] == {"prompt": reference_prompt(TWO_TURNS),
                        "chosen": "I can not help with that.",
                        "rejected": "Wait until nobody looks."}
    # as the reference, a pair whose dialogues differ earlier is scored whole: each side its own
    # prompt
    assert pairs[1]["prompt"] == cut_dialogue(ONE_TURN)[0]
    assert pairs[1]["rejected_prompt"] == cut_dialogue(TWO_TURNS)[0] != pairs[1]["prompt"]
    assert len(pairs) == 2 and (summary["bad"], summary["first_bad_line"]) == (1, 3)


def record(i, **kw):
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(id=i, task="harmless", method="rlcd", prompt="\n\nHuman: q\n\nAssistant:",
               chosen=f"good {i}", rejected=f"bad {i}", label_prob=1.0, **kw)
    return rec


def test_records_round_trip_and_repair(tmp_path):
    path = str(tmp_path / "prefs.jsonl")
    write_records(path, [record(0), record(1, affix_index=3)])
    write_records(path, [record(2)])
    assert read_records(path) == [record(0), record(1, affix_index=3), record(2)]
    # a run killed mid-write leaves a partial last line: an error, unless repair=True cuts it off
    # the file
    complete = open(path).read()
    with open(path, "a") as f:
        f.write('{"id": 3, "task": "harm')
    with pytest.raises(ValueError, match="prefs.jsonl:4"):
        read_records(path)
    assert [r["id"] for r in read_records(path, repair=True)] == [0, 1, 2]
    assert open(path).read() == complete
    # a bad line in the middle is corruption, never repaired
    with open(path, "w") as f:
        f.write(complete.replace('"good 1"', '"good 1"}}'))
    with pytest.raises(ValueError, match="prefs.jsonl:2"):
        read_records(path, repair=True)
    with pytest.raises(ValueError, match="lacks fields"):
        write_records(path, [{"id": 5}])


def test_sft_view(tmp_path):
    path = str(tmp_path / "sft-data.jsonl")
    write_sft_data([record(4), record(7)], path)
    rows = [json.loads(x) for x in open(path)]
    assert rows == [{"id": 4, "prompt": "\n\nHuman: q\n\nAssistant:", "response": "good 4"},
                    {"id": 7, "prompt": "\n\nHuman: q\n\nAssistant:", "response": "good 7"}]


def test_hh_pairs_limit_reads_the_first_lines(tmp_path):
    # the reference's agreement script reads the first N lines of the HH-RLHF train file
    chosen = [ONE_TURN.replace("bread", f"bread {i}") for i in range(5)]
    rows = [json.dumps({"chosen": c, "rejected": c.replace("Mix", "Burn")}) for c in chosen]
    path = write_lines(tmp_path / "train.jsonl", rows[:2] + ["not json"] + rows[2:])
    pairs, summary = load_hh_pairs(path, limit=3)
    assert [p["prompt"] for p in pairs] == [reference_prompt(c) for c in chosen[:2]]
    assert (summary["lines"], summary["bad"]) == (3, 1)


def test_read_prefs_is_the_one_reader(tmp_path):
    pm = pytest.importorskip("nanorlcd.pm")
    good = {"id": 0, "prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps({**good, "label_prob": 0.25}), "", "{broken",
        json.dumps({**good, "label_prob": 2}), json.dumps({**good, "label_prob": None})])
    with pytest.raises(ValueError, match=r"prefs\.jsonl:3: bad preference record \(2 bad lines"):
        read_prefs(path)
    records, summary = read_prefs(path, skip_bad=True)
    assert [r["label_prob"] for r in records] == [0.25, 1.0]               # null = a hard label
    assert (summary["bad"], summary["first_bad_line"]) == (2, 3)
    assert pm.read_prefs(path, skip_bad=True) == (records, summary)       # the PM reads through it
    # the simulator's own files must carry every record field
    with pytest.raises(ValueError, match=r"prefs\.jsonl:1: .*no id/task/method"):
        no_id = {k: v for k, v in good.items() if k != "id"}
        read_records(write_lines(tmp_path / "prefs.jsonl", [json.dumps(no_id)]))
    assert read_records(write_lines(tmp_path / "empty.jsonl", [""])) == []


def test_non_utf8_is_a_one_line_error_with_file_and_line(tmp_path):
    # line 2 holds "café" written in Latin-1 (0xe9), as a file saved in the wrong encoding does
    latin1 = json.dumps({"chosen": "\n\nHuman: cafX\n\nAssistant: ok"}).encode()
    latin1 = latin1.replace(b"X", b"\xe9")
    hh = tmp_path / "hh.jsonl"
    hh.write_bytes(json.dumps({"chosen": ONE_TURN}).encode() + b"\n" + latin1 + b"\n")
    for call in (lambda: load_prompts(str(hh)), lambda: load_prompts(str(hh), kind="hh"),
                 lambda: load_hh_pairs(str(hh)), lambda: read_prefs(str(hh)),
                 lambda: read_sft_data(str(hh))):
        with pytest.raises(ValueError, match=r"hh\.jsonl:2: not UTF-8 text \(byte 0xe9 at column "):
            call()


def test_utf8_bom_keeps_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    hh = tmp_path / "hh.jsonl"
    lines = [json.dumps({"chosen": ONE_TURN}), json.dumps({"chosen": TWO_TURNS})]
    hh.write_bytes(bom + "".join(x + "\n" for x in lines).encode())
    prompts, summary = load_prompts(str(hh))                               # the kind is guessed too
    assert summary["kind"] == "hh" and summary["bad"] == 0
    assert prompts == [reference_prompt(ONE_TURN), reference_prompt(TWO_TURNS)]
    prefs = tmp_path / "prefs.jsonl"
    write_records(str(prefs), [record(0), record(1)])
    prefs.write_bytes(bom + prefs.read_bytes())
    assert read_records(str(prefs)) == [record(0), record(1)]
    sft = tmp_path / "sft-data.jsonl"
    write_sft_data([record(3)], str(sft))
    sft.write_bytes(bom + sft.read_bytes())
    assert read_sft_data(str(sft)) == [("\n\nHuman: q\n\nAssistant:", "good 3")]


def test_shipped_premise_file(tmp_path):
    path = os.path.join(REPO, "nanorlcd", "premises.txt")
    prompts, summary = load_prompts(path)
    raw = [x.strip() for x in open(path, encoding="utf-8") if x.strip() and not x.startswith("#")]
    assert summary["kind"] == "premises" and summary["bad"] == 0 and len(prompts) == len(raw) == 12
    assert prompts == [f"\n\nHuman: {OUTLINE_REQUEST.format(premise=p)}\n\nAssistant:" for p in raw]
    # format: '#' comments and blank lines are not data; a turn tag inside a premise is a bad line
    mine = write_lines(tmp_path / "mine.txt",
                       ["# header", "A cat sails.", "", "Human: hi", "  A dog flies. "])
    prompts, summary = load_prompts(mine)
    assert [p.split("premise: ")[1] for p in prompts] == ["A cat sails.\n\nAssistant:",
                                                          "A dog flies.\n\nAssistant:"]
    assert (summary["lines"], summary["bad"], summary["first_bad_line"]) == (3, 1, 4)
