"""prompts.py against the reference's own strings, kept in tests/reference/rlcd_prompts.json
(inside the repository, so this always runs).

The JSON was transcribed from facebookresearch/RLCD (commit and paths in its "_source"): the
affixes and RLAIF instructions of simulate_preference_data.py, its RLAIF label prompt, and the
pairwise judge of gpt4_compare.py (system message, framing, reply prefixes, per-task questions)
with the output of its `format_prompt` on a few inputs.
"""
import json
import os

import pytest

from nanorlcd import prompts

REFERENCE = os.path.join(os.path.dirname(__file__), "reference", "rlcd_prompts.json")


@pytest.fixture(scope="module")
def ref():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def test_reference_file_names_its_source(ref):
    src = ref["_source"]
    assert src["repo"] == "facebookresearch/RLCD" and len(src["commit"]) == 40
    assert src["paths"] == ["scripts/gpt4_compare.py", "scripts/simulate_preference_data.py"]


def test_affixes_and_rlaif_instructions_match_the_reference(ref):
    for task in ("harmless", "helpful"):
        upper = task.upper()
        assert getattr(prompts, f"{upper}_POSITIVE_AFFIXES") == ref[task]["positive_affixes"]
        assert getattr(prompts, f"{upper}_NEGATIVE_AFFIXES") == ref[task]["negative_affixes"]
        assert getattr(prompts, f"{upper}_RLAIF_INSTRUCTIONS") == ref[task]["rlaif_instructions"]
    assert len(prompts.HARMLESS_POSITIVE_AFFIXES) == len(prompts.HARMLESS_RLAIF_INSTRUCTIONS) == 16


def test_rlaif_scoring_template_matches_the_reference(ref):
    assert prompts.RLAIF_SCORING_TEMPLATE == ref["rlaif_scoring_template"]


def test_judge_strings_match_the_reference(ref):
    judge = ref["judge"]
    assert prompts.JUDGE_SYSTEM_MESSAGE == judge["system_message"]
    assert prompts.JUDGE_REPLY_PREFIXES == judge["reply_prefix"]
    # the reference writes each question after a "\n\n\n\n" separator; our template holds it
    questions = {t: "\n\n\n\n" + q for t, q in prompts.JUDGE_QUESTIONS.items()}
    assert questions == judge["questions"]
    # the template = the reference's pieces around the four fields, in order
    assert prompts.JUDGE_TEMPLATE == (
        judge["conversation_header"] + "{conversation}" + judge["responses_header"] + "{reply_a}"
        + judge["option_b"] + "{reply_b}" + "\n\n\n\n{question}")


def test_judge_prompt_reproduces_reference_format_prompt(ref):
    """Outputs of the reference's format_prompt (blank lines collapsed, turn tags repaired, cut at
    the last Assistant:)."""
    assert len(ref["judge_examples"]) == 3
    for ex in ref["judge_examples"]:
        got = prompts.judge_prompt(ex["instruction"], ex["output1"], ex["output2"], ex["task"])
        assert got == ex["prompt"], ex["task"]


def test_judge_prompt_outline_and_bad_input():
    text = prompts.judge_prompt("\n\nHuman: Write an outline.\n\nAssistant:", "Intro.\n\n\n2. End.",
                                "x", "outline")
    assert text.startswith("Consider a conversation between a human and an assistant, beginning as "
                           "follows:\n\n\n\nHuman: Write an outline.\n\n\n\n")
    assert ("(A) Assistant: Here is a possible outline:\n1. Intro.\n2. End.\n\n"
            "(B) Assistant: Here is") in text
    assert text.endswith("more interesting. Please answer (A) or (B).")
    with pytest.raises(ValueError, match="expected one of"):
        prompts.judge_prompt("\n\nHuman: a\n\nAssistant:", "x", "y", "harmlessness")
    with pytest.raises(ValueError, match="no 'Assistant:' turn"):
        prompts.judge_prompt("\n\nHuman: a", "x", "y", "harmless")
