"""train.py's settings layer: presets in one place, command-line overrides typed by the dataclass
fields, and the batch arithmetic of every preset at the world sizes the README uses (checked without
running anything)."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest

import train
from nanorlcd.ppo import PPOConfig


def test_override_reaches_a_stage_field_with_its_type():
    p = train.apply_overrides(train.TOY, [("ppo.kl_coef", "0.002"), ("ppo.steps", "8"),
                                          ("n_eval", "50"), ("pm.bf16", "true"),
                                          ("sample_top_p", "0.9"), ("rlcd.seed", "3")])
    assert ((p.ppo.kl_coef, p.ppo.steps, p.n_eval, p.pm.bf16, p.sample_top_p, p.rlcd.seed)
            == (0.002, 8, 50, True, 0.9, 3))
    assert isinstance(p.ppo.steps, int) and isinstance(p.ppo.kl_coef, float)
    # everything else is the preset's, and the preset itself is untouched (dataclasses are replaced,
    # not mutated)
    assert p.ppo.lr == train.TOY.ppo.lr and train.TOY.ppo.kl_coef == 0.2
    # dashes are accepted for underscores; "none" clears an optional field
    assert train.apply_overrides(train.TOY, [("ppo.kl-coef", "0.5")]).ppo.kl_coef == 0.5
    cleared = train.apply_overrides(replace(train.TOY, sample_top_p=0.9),
                                    [("sample_top_p", "none")])
    assert cleared.sample_top_p is None


@pytest.mark.parametrize("name, value, needle", [
    ("ppo.nope", "1", "--ppo.nope: no such setting"),
    ("nope.lr", "1", "--nope.lr: no such setting"),
    ("ppo.steps", "eight", "--ppo.steps=eight: expected a value of type int"),
    ("pm.bf16", "maybe", "--pm.bf16=maybe: expected a value of type bool"),
    ("ppo", "1", "--ppo: no such setting"),
])
def test_bad_override_is_a_one_line_error(name, value, needle):
    with pytest.raises(SystemExit) as e:
        train.apply_overrides(train.TOY, [(name, value)])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_command_line_forms():
    args = train.parse_args(["--stage", "ppo", "--ppo.kl_coef=0.01", "--ppo.steps", "3",
                             "--run-name", "x"])
    assert args.overrides == [("ppo.kl_coef", "0.01"), ("ppo.steps", "3")] and args.run_name == "x"
    # the command line end to end: an unknown field stops train.py before any work, naming the flag
    proc = subprocess.run([sys.executable, "train.py", "--stage", "ppo", "--ppo.beta=1"],
                          capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(train.__file__)))
    assert proc.returncode != 0 and "--ppo.beta: no such setting" in proc.stderr


def test_presets_are_derived_not_copied():
    assert train.FAST.ppo.lr == train.TOY.ppo.lr and train.FAST.ppo.steps < train.TOY.ppo.steps
    assert train.LLAMA7B_HELPFUL.pm == train.LLAMA7B_HARMLESS.pm
    assert (train.LLAMA7B_HARMLESS.ppo.kl_coef, train.LLAMA7B_HELPFUL.ppo.kl_coef) == (0.004, 0.002)
    assert set(train.PRESETS) == {"toy", "fast", "llama7b-harmless", "llama7b-helpful",
                                  "llama7b-outline", "llama30b-sim-harmless", "classroom-1b"}
    # the 7B presets shard every trained model over the GPUs (FSDP2)
    assert {train.LLAMA7B_HARMLESS.pm.strategy, train.LLAMA7B_HARMLESS.sft.strategy,
            train.LLAMA7B_HARMLESS.ppo.strategy} == {"fsdp"}


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("name", sorted(train.PRESETS))
def test_every_preset_divides_its_batches_at_world_sizes_1_2_8(name, world):
    """The README's 8-GPU PM command once failed: 16 pairs with micro-batch 4 cannot split over 8
    GPUs."""
    train.check_batches(train.PRESETS[name], world)


def test_check_batches_names_the_bad_field():
    bad = replace(train.TOY, pm=replace(train.TOY.pm, batch_size=16, micro_batch_size=4))
    with pytest.raises(ValueError, match="PMConfig.batch_size"):
        train.check_batches(bad, 8)
    with pytest.raises(ValueError, match="PPOConfig"):
        train.check_batches(replace(train.TOY, ppo=replace(PPOConfig(), minibatch_size=100)), 1)
