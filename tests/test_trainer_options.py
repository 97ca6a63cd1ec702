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
                                         "blocks": ["up"], "dim": 6, "resnet_dim": 16, "heads": 8, "identifier": "",
                                         "off_concept_loss": 0.1}  # no class prompt: no word tells the concept's apart
    assert o.args.output_dir == "res-tuning-dreambooth-model"
    assert not hasattr(o.args, "dim")
    lora = options.parse(BASE + ["--method", "lora", "--rank", "8"]).method_config
    assert (lora.rank, lora.alpha) == (8, 8)  # alpha = rank, as diffusers' train_dreambooth_lora.py sets it
    # every method parses with its defaults, the U-Net blocks and Bypass depth of the model's recipe where it has them
    recipes = options.model_recipes(options.build_parser().get_default("pretrained_model_name_or_path"))
    for name, method in METHODS.items():
        own = recipes.get(name, {})
        fields = {f.name for f in dataclasses.fields(method.config)}
        from_model = {k: tuple(own[k]) if k == "blocks" else own[k] for k in ("blocks", "depth") if k in own and k in fields}
        if name == "res-tuning":
            from_model["identifier"] = ""  # 'auto' without a class prompt: none
        assert options.parse(BASE + ["--method", name]).method_config == dataclasses.replace(method.config(), **from_model)


@pytest.mark.parametrize("instance, klass, word", [
    ("a sks dog", "a dog", "sks"),
    ("a photo of sks dog", "a photo of dog", "sks"),
    ("a sks ohwx dog", "a dog", "sks ohwx"),  # every word the class prompt lacks
    ("A SKS Dog", "a dog", "SKS"),  # the class prompt's words in any case
    ("a dog", "a dog", ""),  # nothing names the concept apart
    ("a sks dog", None, ""),  # no class prompt: no word can be told apart
])
def test_auto_identifier_is_the_instance_prompt_s_words_the_class_prompt_lacks(instance, klass, word):
    argv = ["--instance_data_dir", "x", "--instance_prompt", instance, "--method", "res-tuning"]
    parsed = options.parse(argv + (["--class_prompt", klass] if klass else []))
    assert parsed.method_config.identifier == word
    assert parsed.recipe["identifier"].startswith("auto: ")
    given = options.parse(argv + ["--identifier", "ohwx"] + (["--class_prompt", klass] if klass else []))
    assert given.method_config.identifier == "ohwx" and "identifier" not in given.recipe


def test_the_identifier_s_rate_and_the_schedule_come_from_the_model_s_recipe_unless_given():
    argv = ["--instance_data_dir", "x", "--instance_prompt", "a sks shape", "--class_prompt", "a shape", "--method", "res-tuning"]
    demo = options.parse(argv).args
    assert (demo.learning_rate, demo.text_encoder_lr, demo.lr_scheduler, demo.lr_warmup_steps) == (0.01, 0.005, "cosine", 30)
    given = options.parse(argv + ["--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--text_encoder_lr", "0.001"]).args
    assert (given.text_encoder_lr, given.lr_scheduler, given.lr_warmup_steps) == (0.001, "constant", 0)
    plain = options.parse(argv + ["--identifier", ""]).args  # nothing trains in the text encoder: no rate for it
    assert plain.text_encoder_lr is None
    other = options.parse(["--instance_data_dir", "x", "--instance_prompt", "a sks shape", "--method", "adapter"]).args
    assert (other.lr_scheduler, other.lr_warmup_steps) == ("constant", 0)  # no recipe sets them: diffusers' defaults


def test_the_demo_models_bypass_joins_where_its_recipe_says(tmp_path):
    """The demo model's last up block has no attention, so its recipe sets the Bypass's depth (3);
    an option given wins, and a recipe value of the wrong form is not used."""
    demo = options.parse(BASE + ["--method", "bypass"])
    assert demo.method_config.depth == 3 and "depth" in demo.recipe and "demo_settings.json" in demo.recipe["depth"]
    assert options.parse(BASE + ["--method", "bypass", "--depth", "2"]).method_config.depth == 2
    model = tmp_path / "model"
    model.mkdir()
    for value in ("3", True, 2.5, [3]):
        (model / "demo_settings.json").write_text(json.dumps({"recipes": {"bypass": {"depth": value}}}))
        assert options.method_recipe(str(model), "bypass") == {}
    (model / "demo_settings.json").write_text(json.dumps({"recipes": {"bypass": {"depth": 1}, "lora": {"depth": 1}}}))
    assert options.method_recipe(str(model), "bypass") == {"depth": "1"}
    assert options.method_recipe(str(model), "lora") == {}  # not an option of LoRA


@pytest.mark.parametrize("argv,message", [
    (["--method", "dora"], "--method 'dora' is not a method; choose from res-tuning"),
    (["--method", "res-tuning", "--rank", "4"], "--rank not an option of res-tuning (its options: --blocks, --dim, --heads, --identifier, --off_concept_loss, "
                                         "--resnet_dim, --tuners)"),
    (["--tuners", "attn1=sideways"], "unknown tuner kind 'sideways'"),
    (["--tuners", "attn1"], "--tuners 'attn1': expected KEY=VALUE"),
    (["--dim", "ten"], "--dim 'ten'"),
    (["--dim", "0"], "dim must be positive"),
    (["--blocks", "left"], "blocks has ['left']"),
    (["--learning_rate", "0"], "--learning_rate must be a number above 0; got 0.0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be a number above 0"),
    (["--max_train_steps", "0"], "--max_train_steps must be a whole number above 0; got 0"),
    (["--resolution", "100"], "--resolution must be a multiple of 8 and at least 64"),
    (["--resolution", "32"], "--resolution must be a multiple of 8 and at least 64"),
    (["--train_batch_size", "0"], "--train_batch_size must be a whole number above 0"),
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


@pytest.mark.parametrize("flag,why", [(["--train_text_encoder"], "tunes the U-Net.s blocks, not the text encoder.s layers"),
                                      (["--tokenizer_name", "x"], "the base model's own"),
                                      (["--validation_images", "a.png"], "text-to-image"),
                                      (["--class_labels_conditioning", "timesteps"], "SD U-Nets have none")])
def test_options_that_would_train_something_else_are_refused(flag, why):
    with pytest.raises(OptionError, match=f"--{flag[0][2:]} is refused: .*{why}"):
        options.parse(BASE + flag)


def test_epochs_become_steps_the_way_diffusers_counts_them(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"")  # counted by name: image_files lists, the trainer checks later
    monkeypatch.setenv("WORLD_SIZE", "1")
    base = ["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks dog"]
    o = options.parse(base + ["--num_train_epochs", "3", "--train_batch_size", "2", "--validation_epochs", "2"])
    assert (o.args.max_train_steps, o.args.validation_steps) == (3 * 3, 2 * 3)  # ceil(5 / 2) = 3 steps an epoch
    o = options.parse(base + ["--num_train_epochs", "2", "--with_prior_preservation", "--class_prompt", "a dog",
                              "--num_class_images", "8", "--train_batch_size", "2"])
    assert o.args.max_train_steps == 2 * 4  # the larger set, as diffusers' dataset length is
    assert options.parse(base + ["--num_train_epochs", "3", "--max_train_steps", "7"]).args.max_train_steps == 7
    assert options.parse(base).args.max_train_steps == 400
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert options.parse(base + ["--num_train_epochs", "1"]).args.max_train_steps == 3  # 5 batches shared by 2 processes


def test_scale_lr_and_offset_noise(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    o = options.parse(BASE + ["--learning_rate", "1e-4", "--scale_lr", "--train_batch_size", "3", "--gradient_accumulation_steps", "2"])
    assert o.args.learning_rate == pytest.approx(1e-4 * 3 * 2 * 2) and o.args.scale_lr is False
    assert options.parse(BASE + ["--offset_noise"]).args.noise_offset == 0.1
    assert options.parse(BASE + ["--offset_noise", "--noise_offset", "0.05"]).args.noise_offset == 0.05


def test_ignored_options_say_why():
    o = options.parse(BASE + ["--push_to_hub", "--hub_model_id", "me/dog", "--dataloader_num_workers", "4", "--local_rank", "0"])
    notes = options.compat_notes(o.args)
    assert len(notes) == 4 and notes[0].startswith("--push_to_hub is not used: nothing is uploaded")
    assert options.compat_notes(options.parse(BASE).args) == []


def test_the_papers_recipe_is_one_option_and_options_given_win(tmp_path):
    """--recipe paper: Table 11's batch 8, centre crop and flip, 1e-4 constant, 512 px and guidance
    3.0 where the defaults are diffusers'; each option given, on the command line or in a config
    file, keeps its value, a default value given explicitly included."""
    default = options.parse(BASE)
    assert (default.args.train_batch_size, default.args.center_crop, default.args.random_flip, default.args.guidance_scale) == (
        1, False, False, None)
    paper = options.parse(BASE + ["--recipe", "paper"])
    values = {k: getattr(paper.args, k) for k in options.NAMED_RECIPES["paper"]}
    assert values == {"train_batch_size": 8, "center_crop": True, "random_flip": True, "learning_rate": 1e-4,
                      "lr_scheduler": "constant", "resolution": 512, "guidance_scale": 3.0}
    assert {k: paper.recipe[k] for k in values} == dict.fromkeys(values, "--recipe paper")

    given = options.parse(BASE + ["--recipe", "paper", "--train_batch_size", "1", "--no-random_flip", "--learning_rate", "3e-4"])
    assert (given.args.train_batch_size, given.args.random_flip, given.args.learning_rate) == (1, False, 3e-4)
    assert given.args.center_crop is True and given.args.guidance_scale == 3.0
    assert "train_batch_size" not in given.recipe and "random_flip" not in given.recipe

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"instance_data_dir": "imgs", "instance_prompt": "a sks dog", "recipe": "paper", "resolution": 256}))
    from_file = options.parse(["--config", str(config)])
    assert (from_file.args.resolution, from_file.args.train_batch_size) == (256, 8)
    assert options.from_dict({**from_file.to_dict()}).args.resolution == 256  # what the studio writes reads back the same
    with pytest.raises(OptionError, match="invalid choice"):
        options.parse(BASE + ["--recipe", "sdxl"])
