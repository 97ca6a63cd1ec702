"""trainers/options.py: diffusers' option names, method options generated from the registry, and
refusals with messages that name the option. No model is loaded here."""

import dataclasses
import json

import pytest

from restuning.methods import METHODS
from trainers import options
from trainers.options import OptionError

BASE = ["--instance_data_dir", "imgs", "--instance_prompt", "a photo of sks dog"]
DIFFUSERS_NAMES = ["instance_data_dir", "instance_prompt", "class_prompt", "with_prior_preservation", "num_class_images",
                   "prior_loss_weight", "resolution", "center_crop", "random_flip", "train_batch_size",
                   "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps",
                   "mixed_precision", "gradient_checkpointing", "use_8bit_adam", "enable_xformers_memory_efficient_attention",
                   "validation_prompt", "num_validation_images", "validation_steps", "checkpointing_steps",
                   "checkpoints_total_limit", "resume_from_checkpoint", "seed", "output_dir", "pretrained_model_name_or_path",
                   "snr_gamma", "noise_offset"]


def test_diffusers_names_and_every_method_field_are_options():
    dests = {a.dest for a in options.build_parser()._actions}
    assert set(DIFFUSERS_NAMES) <= dests
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            assert f.name in dests, (method.name, f.name)
    helps = {a.dest: a.help for a in options.build_parser()._actions}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            assert f"[{method.name}] {f.metadata['help']}" in helps[f.name], (method.name, f.name)


def test_method_options_parse_into_the_method_config():
    o = options.parse(BASE + ["--method", "res-tuning", "--tuners", "attn1=adapter,ff=prompt", "--dim", "6", "--blocks", "up"])
    assert o.method_config.to_dict() == {"method": "res-tuning", "tuners": {"attn1": "adapter", "ff": "prompt"},
                                         "blocks": ["up"], "dim": 6, "heads": 8}
    assert o.args.output_dir == "res-tuning-dreambooth-model"
    assert not hasattr(o.args, "dim")
    lora = options.parse(BASE + ["--method", "lora", "--rank", "8"]).method_config
    assert (lora.rank, lora.alpha) == (8, 4)
    # every method parses with its defaults
    for name, method in METHODS.items():
        assert options.parse(BASE + ["--method", name]).method_config == method.config()


@pytest.mark.parametrize("argv,message", [
    (["--method", "dora"], "--method 'dora' is not a method; choose from res-tuning"),
    (["--method", "res-tuning", "--rank", "4"], "--rank not an option of res-tuning (its options: --blocks, --dim, --heads, --tuners)"),
    (["--tuners", "attn1=sideways"], "unknown tuner kind 'sideways'"),
    (["--tuners", "attn1"], "--tuners 'attn1': expected KEY=VALUE"),
    (["--dim", "ten"], "--dim 'ten'"),
    (["--dim", "0"], "dim must be positive"),
    (["--blocks", "left"], "blocks has ['left']"),
    (["--learning_rate", "0"], "--learning_rate must be a positive number, got 0.0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be a positive number"),
    (["--max_train_steps", "0"], "--max_train_steps must be a positive whole number, got 0"),
    (["--resolution", "100"], "--resolution must be a multiple of 8 and at least 64"),
    (["--resolution", "32"], "--resolution must be a multiple of 8 and at least 64"),
    (["--train_batch_size", "0"], "--train_batch_size must be a positive"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
    (["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
    (["--max_train_steps", "many"], "invalid int value: 'many'"),
    (["--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
])
def test_bad_values_are_refused_with_the_option_named(argv, message):
    with pytest.raises(OptionError) as err:
        options.parse(BASE + argv)
    assert message in str(err.value)


def test_required_options():
    with pytest.raises(OptionError, match="--instance_data_dir is required"):
        options.parse(["--instance_prompt", "x"])
    with pytest.raises(OptionError, match="--instance_prompt is required"):
        options.parse(["--instance_data_dir", "x"])


def test_config_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"instance_data_dir": "imgs", "instance_prompt": "a sks star", "method": "bypass", "dim": 16,
              "taps": ["up"], "max_train_steps": 40, "validation_prompt": "a sks star", "with_prior_preservation": False}
    (run / "config.json").write_text(json.dumps(config))
    o = options.parse(["--config", str(run / "config.json")])
    assert o.args.output_dir == str(run)  # the studio's run folder
    assert o.args.max_train_steps == 40 and o.args.validation_prompt == ["a sks star"]
    assert (o.method_config.dim, o.method_config.taps) == (16, ("up",))
    # flags override the file
    o = options.parse(["--config", str(run / "config.json"), "--max_train_steps", "5", "--dim", "8"])
    assert (o.args.max_train_steps, o.method_config.dim) == (5, 8)
    # a round trip through to_dict / from_dict keeps everything
    again = options.from_dict(o.to_dict())
    assert again.to_dict() == o.to_dict() and again.method_config == o.method_config


@pytest.mark.parametrize("patch,message", [
    ({"max_train_steps": 1.5}, "max_train_steps in the config: expected int"),
    ({"max_train_steps": True}, "max_train_steps in the config: expected int"),
    ({"learning_rate": "fast"}, "invalid float value: 'fast'"),
    ({"center_crop": "yes"}, "center_crop in the config: expected bool"),
    ({"mixed_precision": "fp8"}, "mixed_precision in the config: 'fp8' is not one of no, fp16, bf16"),
    ({"rank": 4}, "--rank not an option of res-tuning"),
    ({"learningrate": 1e-4}, "unknown option(s) in the config: learningrate"),
])
def test_bad_config_values(tmp_path, patch, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"instance_data_dir": "imgs", "instance_prompt": "x", **patch}))
    with pytest.raises(OptionError) as err:
        options.parse(["--config", str(path)])
    assert message in str(err.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(OptionError, match="no such file"):
        options.parse(["--config", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OptionError, match="not a readable JSON file"):
        options.parse(["--config", str(tmp_path / "bad.json")])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(OptionError, match="expected one JSON object"):
        options.parse(["--config", str(tmp_path / "list.json")])


def test_docs_table_is_the_registry():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text()
    start = doc.index("-->", doc.index("<!-- method-options:start")) + 3
    table = doc[start:doc.index("<!-- method-options:end")].strip()
    assert table == options.method_options_markdown(), "regenerate the table in docs/trainer.md"


def test_each_method_gets_its_own_learning_rate_unless_one_is_given(tmp_path):
    from restuning.methods import METHODS

    def lr(model, method, *extra):
        opts = options.parse(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", "x",
                              "--instance_prompt", "a sks dog", "--method", method, *extra])
        return opts.args.learning_rate, opts.recipe.get("learning_rate")

    plain = tmp_path / "plain-model"
    plain.mkdir()
    assert lr(plain, "res-tuning") == (1e-4, "the res-tuning recipe (restuning.methods)")
    assert lr(plain, "full") == (5e-6, "the full recipe (restuning.methods)")
    assert all(lr(plain, m)[0] == METHODS[m].recipe["learning_rate"] for m in METHODS)
    assert lr(plain, "full", "--learning_rate", "3e-5") == (3e-5, None)
    # A model folder's recipes come first: the method's own, then its default.
    (plain / "demo_settings.json").write_text(json.dumps({"recipes": {"default": {"learning_rate": 0.02}, "full": {"learning_rate": 0.002}}}))
    assert lr(plain, "lora") == (0.02, "demo_settings.json of the base model")
    assert lr(plain, "full") == (0.002, "demo_settings.json of the base model, for full")
    (plain / "demo_settings.json").write_text("{not json")
    assert lr(plain, "lora")[0] == 1e-4


def test_the_default_checkpoint_interval_fits_the_run():
    def every(*extra):
        return options.parse(["--instance_data_dir", "x", "--instance_prompt", "a sks dog", *extra]).args.checkpointing_steps

    assert every() == 100  # the default 400 steps: a crash loses at most a quarter
    assert every("--max_train_steps", "3") == 1
    assert every("--max_train_steps", "10000") == 500
    assert every("--max_train_steps", "10000", "--checkpointing_steps", "7") == 7
