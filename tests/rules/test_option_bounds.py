"""The trainer's numeric options, option by option at their edges: one below, at and one above
the lowest and the highest value (the lowest itself allowed or not). One above is the next whole
number, the next float, or the next multiple of 8 for --resolution (its other rule). The table is
the contract, written here (docs/trainer.md's ranges), not read from trainers.options.BOUNDS."""

import argparse
import math

import pytest

from trainers import options
from trainers.options import BOUNDS, OptionError, parse

NUMERIC = {a.dest: a.type for a in options.build_parser()._actions if a.type in (int, float)}
# name -> (lowest, highest, whether the lowest itself is allowed)
CONTRACT = {
    "adam_beta1": (0, 0.999999, True), "adam_beta2": (0, 0.999999, True), "adam_epsilon": (0, 1, False),
    "adam_weight_decay": (0, 10, True), "adam_weight_decay_text_encoder": (0, 10, True),
    "checkpointing_steps": (1, 1_000_000, True), "checkpoints_total_limit": (1, 1000, True),
    "dataloader_num_workers": (0, 1024, True), "gradient_accumulation_steps": (1, 1024, True), "guidance_scale": (0, 100, True),
    "learning_rate": (0, 10, False), "local_rank": (-1, 1024, True), "lr_num_cycles": (1, 1000, True), "lr_power": (0, 100, False),
    "lr_warmup_steps": (0, 1_000_000, True), "max_grad_norm": (0, 1e6, False), "max_train_steps": (1, 1_000_000, True),
    "noise_offset": (0, 10, True), "num_class_images": (1, 10_000, True), "num_inference_steps": (1, 1000, True),
    "num_train_epochs": (1, 100_000, True), "num_validation_images": (1, 16, True), "prior_loss_weight": (0, 1000, False),
    "repeats": (1, 10_000, True), "resolution": (64, 2048, True), "sample_batch_size": (1, 64, True),
    "seed": (0, 2**32 - 1, True), "snr_gamma": (0, 1000, False), "text_encoder_lr": (0, 10, False),
    "tokenizer_max_length": (1, 1024, True), "train_batch_size": (1, 64, True), "validation_epochs": (1, 100_000, True),
    "validation_steps": (1, 1_000_000, True),
}
STEP = {"resolution": 8}


def args_for(name, value, out):
    extra = ["--method", "lora", "--train_text_encoder"] if name == "text_encoder_lr" else []
    return ["--instance_data_dir", "imgs", "--instance_prompt", "a sks star", "--output_dir", str(out), *extra,
            f"--{name}={value!r}" if isinstance(value, float) else f"--{name}={value}"] + (
               ["--resolution", "64"] if name != "resolution" else [])


def neighbours(name, value):
    if NUMERIC[name] is int:
        step = STEP.get(name, 1)
        return value - step, value + step
    return math.nextafter(value, -math.inf), math.nextafter(value, math.inf)


def cases():
    for name in sorted(CONTRACT):
        low, high, low_ok = CONTRACT[name]
        kind = NUMERIC[name]
        below_low, above_low = neighbours(name, kind(low))
        below_high, above_high = neighbours(name, kind(high))
        for label, value, ok in (("below the lowest", below_low, False), ("the lowest", kind(low), low_ok),
                                 ("above the lowest", above_low, True), ("below the highest", below_high, True),
                                 ("the highest", kind(high), True), ("above the highest", above_high, False)):
            yield pytest.param(name, value, ok, id=f"{name}-{label}")


def test_every_numeric_option_has_bounds_of_its_type():
    assert set(NUMERIC) == set(BOUNDS) == set(CONTRACT)
    for name, (low, high, _) in CONTRACT.items():
        assert low < high and (NUMERIC[name] is float or (float(low).is_integer() and float(high).is_integer())), name


@pytest.mark.parametrize("name, value, ok", list(cases()))
def test_each_option_at_its_edges(name, value, ok, tmp_path):
    argv = args_for(name, value, tmp_path / "run")
    if ok:
        assert getattr(parse(argv).args, name) == value
    else:
        with pytest.raises(OptionError, match=f"--{name} "):
            parse(argv)


@pytest.mark.parametrize("name", sorted(n for n in CONTRACT if NUMERIC[n] is float))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_option_is_finite(name, value, tmp_path):
    with pytest.raises(OptionError, match=f"--{name}"):
        parse(args_for(name, value, tmp_path / "run"))


@pytest.mark.parametrize("low_ok, value, ok", [(True, 0, True), (False, 0, False), (True, -1e-9, False), (False, 1e-9, True)])
def test_the_message_says_whether_the_lowest_is_allowed(low_ok, value, ok, monkeypatch):
    monkeypatch.setitem(BOUNDS, "noise_offset", (0, 10, low_ok))
    problems = []
    options._check_bounds(argparse.Namespace(noise_offset=value), lambda good, message: good or problems.append(message),
                          ["noise_offset"])
    assert (problems == []) == ok
    if not ok:
        assert problems == [f"--noise_offset must be {'from 0 to' if low_ok else 'above 0 and at most'} 10, got {value}"]
