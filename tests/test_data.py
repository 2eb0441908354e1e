"""Tests for nanorlcd/data.py: prompt extraction and preference-record I/O.

What is checked, and against what:
- HH-RLHF prompts: a fixture with good and bad lines; the prompts against hand-written strings and against the
  reference's own rule ("\\n\\n" + chosen[:rindex('Assistant:') + 10].strip()); the counts, reasons and the
  first bad line number; a file with no usable line is a ValueError naming it;
- plain {"prompt"} jsonl, story premises (the outline request) and the toy splits, with kind detection;
- HH chosen/rejected pairs for the PM's human-agreement evaluation;
- preference records: round trip, a partial last line cut off by repair=True, a corrupt line in the middle,
  and the context-distillation view.
Run: `python -m pytest tests/test_data.py -q`
"""
import json

import pytest

from nanorlcd.data import (OUTLINE_REQUEST, RECORD_FIELDS, load_hh_pairs, load_prompts, read_records,
                           write_records, write_sft_data)

ONE_TURN = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water and yeast."
TWO_TURNS = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I steal a car?"
             "\n\nAssistant: I can not help with that.")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def reference_prompt(chosen):
    """The RLCD reference's prompt (simulate_preference_data.py), with our leading "\\n\\n" put back."""
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
                       "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I steal a car?"
                       "\n\nAssistant:",
                       "\n\nHuman: How do I bake cake?\n\nAssistant:"]
    assert prompts == [reference_prompt(c) for c in (ONE_TURN, TWO_TURNS, ONE_TURN.replace("bread", "cake"))]
    assert summary["kind"] == "hh"
    assert (summary["lines"], summary["kept"], summary["bad"], summary["first_bad_line"]) == (6, 3, 3, 3)
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
        json.dumps({"prompt": "Human: How do I fix a bike?\n\nAssistant:"}),   # leading "\n\n" added
        json.dumps({"prompt": "Human: no tag"}),                               # 2 bad
        json.dumps({"prompt": "\n\nHuman: Hi\n\nAssistant:  "})])              # trailing space stripped
    prompts, summary = load_prompts(plain)
    assert summary["kind"] == "jsonl" and summary["first_bad_line"] == 2 and summary["bad"] == 1
    assert prompts == ["\n\nHuman: How do I fix a bike?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    premises = write_lines(tmp_path / "premises.txt", ["A dragon learns to cook.", "", "  Two robots fall in love. "])
    prompts, summary = load_prompts(premises)
    assert summary["kind"] == "premises" and summary["kept"] == 2
    assert prompts[1] == ("\n\nHuman: Write an outline for a short story with the following premise: "
                          "Two robots fall in love.\n\nAssistant:")
    assert prompts[0] == f"\n\nHuman: {OUTLINE_REQUEST.format(premise='A dragon learns to cook.')}\n\nAssistant:"


def test_toy_split():
    toy = pytest.importorskip("nanorlcd.toy")
    prompts, summary = load_prompts("toy:test")
    assert prompts == toy.split_prompts("test") and summary["bad"] == 0 and summary["kind"] == "toy"


def test_hh_pairs(tmp_path):
    rejected = TWO_TURNS.replace("I can not help with that.", "Wait until nobody looks.")
    path = write_lines(tmp_path / "pairs.jsonl", [
        json.dumps({"chosen": TWO_TURNS, "rejected": rejected}),
        json.dumps({"chosen": ONE_TURN, "rejected": TWO_TURNS}),    # 2: different dialogues
        json.dumps({"chosen": ONE_TURN}),                           # 3: no rejected
    ])
    pairs, summary = load_hh_pairs(path)
    assert pairs == [{"prompt": reference_prompt(TWO_TURNS), "chosen": "I can not help with that.",
                      "rejected": "Wait until nobody looks."}]
    assert (summary["bad"], summary["first_bad_line"]) == (2, 2)


def record(i, **kw):
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(id=i, task="harmless", method="rlcd", prompt="\n\nHuman: q\n\nAssistant:", chosen=f"good {i}",
               rejected=f"bad {i}", label_prob=1.0, **kw)
    return rec


def test_records_round_trip_and_repair(tmp_path):
    path = str(tmp_path / "prefs.jsonl")
    write_records(path, [record(0), record(1, affix_index=3)])
    write_records(path, [record(2)])
    assert read_records(path) == [record(0), record(1, affix_index=3), record(2)]
    # a run killed mid-write leaves a partial last line: an error, unless repair=True cuts it off the file
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
