"""diffusers' DreamBooth command lines, taken to the letter: every option of its scripts as they
are today (tests/data/diffusers_dreambooth_options.json, extracted by `python -m scripts.diffusers_options`
with the diffusers commit it came from) is an option here, and the ones a diffusers user trips on
get diffusers' behaviour or a one-line refusal that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import restuning
from tests.test_trainer import REPO, argv, fresh_accelerate_state, instance_dir, subprocess_env, tiny_model  # noqa: F401
from trainers import data, dreambooth, options
from trainers.events import last_phase, read_events
from trainers.options import OptionError

SNAPSHOT = Path(__file__).resolve().parent / "data" / "diffusers_dreambooth_options.json"
BASE = ["--instance_data_dir", "imgs", "--instance_prompt", "a photo of sks dog"]


def test_every_option_of_diffusers_dreambooth_scripts_is_an_option():
    snapshot = json.loads(SNAPSHOT.read_text())
    assert len(snapshot["commit"]) == 40 and set(snapshot["scripts"]) == {"train_dreambooth.py", "train_dreambooth_lora.py"}
    dests = {a.dest for a in options.build_parser()._actions}
    for script, names in snapshot["scripts"].items():
        assert len(names) > 50
        assert sorted(set(names) - dests) == [], f"{script} (diffusers {snapshot['commit'][:12]}) has options the trainer lacks"


def test_the_snapshot_is_what_the_extractor_reads_from_the_scripts():
    from scripts.diffusers_options import option_names

    source = '''
parser.add_argument("--rank", type=int, default=4)
parser.add_argument(
    "--image_interpolation_mode", type=str, default="lanczos")
group.add_argument("-v", "--lora-dropout", type=float)
'''
    assert option_names(source) == ["rank", "image_interpolation_mode", "lora_dropout"]


def test_lora_dropout_is_peft_s_dropout_of_the_lora_input():
    parsed = options.parse(BASE + ["--method", "lora", "--lora_dropout", "0.1"])
    assert parsed.method_config.lora_dropout == 0.1
    from restuning.arch import build_unet

    unet = build_unet("tiny")
    restuning.attach(unet, parsed.method_config)
    dropouts = [m.lora_dropout["default"] for n, m in unet.named_modules() if n.endswith(".to_q") and hasattr(m, "lora_dropout")]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.1 for d in dropouts)
    with pytest.raises(OptionError, match="--lora_dropout not an option of res-tuning"):
        options.parse(BASE + ["--lora_dropout", "0.1"])
    with pytest.raises(OptionError, match="lora_dropout must be at least 0 and below 1"):
        options.parse(BASE + ["--method", "lora", "--lora_dropout", "1.5"])


def test_image_interpolation_mode_picks_the_resize_filter(tmp_path):
    assert options.parse(BASE).args.image_interpolation_mode == "lanczos"  # diffusers' default
    assert options.parse(BASE + ["--image_interpolation_mode", "bilinear"]).args.image_interpolation_mode == "bilinear"
    with pytest.raises(OptionError, match="invalid choice"):
        options.parse(BASE + ["--image_interpolation_mode", "sinc"])
    path = tmp_path / "stripes.png"
    Image.frombytes("L", (96, 96), bytes((x * 37) % 256 for x in range(96 * 96))).convert("RGB").save(path)
    pixels = {}
    for mode, pil in (("lanczos", Image.Resampling.LANCZOS), ("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST)):
        stream = data.DreamBoothData([path], None, 64, True, False, seed=0, interpolation=mode)
        pixels[mode] = stream.batch(0, 1)["pixel_values"][0]
        expected = torch.tensor(list(Image.open(path).resize((64, 64), pil).getdata()), dtype=torch.float32).T.reshape(3, 64, 64)
        assert torch.equal(pixels[mode], expected / 127.5 - 1.0), mode
    assert not torch.equal(pixels["lanczos"], pixels["bilinear"])


def test_rank_sets_alpha_as_diffusers_does():
    lora = BASE + ["--method", "lora"]
    assert (options.parse(lora).method_config.rank, options.parse(lora).method_config.alpha) == (4, 4)
    ranked = options.parse(lora + ["--rank", "16"])
    assert (ranked.method_config.rank, ranked.method_config.alpha) == (16, 16)  # train_dreambooth_lora.py: lora_alpha=args.rank
    assert "train_dreambooth_lora.py" in ranked.recipe["alpha"]
    assert options.parse(lora + ["--rank", "16", "--alpha", "4"]).method_config.alpha == 4
    assert options.from_dict({"instance_data_dir": "x", "instance_prompt": "a", "method": "lora", "rank": 8}).method_config.alpha == 8


def test_resume_takes_diffusers_checkpoint_names_and_says_where_checkpoints_are(tmp_path):
    out = tmp_path / "run"
    from safetensors.torch import save_file

    for name in ("checkpoint-2", "checkpoint-4"):  # whole enough for 'latest' (trainers.checkpoints.problem)
        (out / "checkpoints" / name).mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(out / "checkpoints" / name / "tuner_state.safetensors"))
    assert dreambooth.find_checkpoint(out, "checkpoint-2") == out / "checkpoints" / "checkpoint-2"
    assert dreambooth.find_checkpoint(out, str(out / "checkpoints" / "checkpoint-4")) == out / "checkpoints" / "checkpoint-4"
    assert dreambooth.find_checkpoint(out, "latest") == out / "checkpoints" / "checkpoint-4"
    message = f"--resume_from_checkpoint checkpoint-3: no such checkpoint; this run's are in {out / 'checkpoints'} " \
              "\\(checkpoint-2, checkpoint-4\\): give one of them, a checkpoint folder, or 'latest'"
    with pytest.raises(OptionError, match=message):
        dreambooth.find_checkpoint(out, "checkpoint-3")
    with pytest.raises(OptionError, match=r"no such checkpoint; this run's are in .* \(none yet\)"):
        dreambooth.find_checkpoint(tmp_path / "fresh", "checkpoint-2")


def test_accelerate_s_fp16_on_a_cpu_is_refused_before_loading(tiny_model, instance_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`accelerate launch --mixed_precision=fp16` passes fp16 in the environment, not as the
    trainer's flag: on a CPU full fine-tuning then failed ("Half and Float") and the others ran at a
    fraction of the speed."""
    if torch.cuda.is_available():
        pytest.skip("fp16 is refused only without a GPU")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    out = tmp_path / "run"
    assert dreambooth.main(argv(tiny_model, instance_dir, out, "--method", "full", "--max_train_steps", 1)) == 2
    err = capsys.readouterr().err
    assert "accelerate's mixed precision fp16 (accelerate launch / config) needs a CUDA GPU; on a CPU use --mixed_precision bf16 or no" in err
    assert [e["phase"] for e in read_events(out) if e["event"] == "phase"] == ["failed"]  # nothing was loaded


@pytest.mark.slow
def test_accelerate_launch_with_fp16_on_a_cpu_is_one_line(tiny_model, instance_dir, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("fp16 is refused only without a GPU")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision=fp16",
           "--dynamo_backend", "no", "-m", "trainers.dreambooth", *argv(tiny_model, instance_dir, out, "--max_train_steps", 1)]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    # the trainer's one line; accelerate's launcher then reports the exit status with its own traceback
    assert "error: accelerate's mixed precision fp16 (accelerate launch / config) needs a CUDA GPU" in done.stderr
    assert "trainers/" not in done.stderr.split("error: ", 1)[0] and last_phase(read_events(out)) == "failed"


def test_a_tokenizer_length_past_the_text_encoder_s_positions_is_refused(tiny_model, instance_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert dreambooth.main(argv(tiny_model, instance_dir, out, "--tokenizer_max_length", 32, "--max_train_steps", 1)) == 2
    assert ("--tokenizer_max_length 32 is longer than the text encoder's 16 positions: give at most 16, or leave it out"
            in capsys.readouterr().err)
    assert last_phase(read_events(out)) == "failed"
