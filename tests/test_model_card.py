"""The model card and what a run downloads as (trainers/artifacts.py), and the library installed
with pip outside the repository running the card's code on a downloaded tuner."""

import os
import re
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_trainer import fresh_accelerate_state  # noqa: F401 - in-process runs need accelerate's state reset
from trainers import artifacts
from trainers.events import read_events
from trainers.options import DEMO_MODEL

REPO = Path(__file__).resolve().parents[1]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000000000200015e2fe8e40000000049454e44ae426082")


def card_for(out: Path, base: str, source, kinds=("tuner",), samples=()):
    args = SimpleNamespace(pretrained_model_name_or_path=base, instance_prompt="a sks shape", with_prior_preservation=False,
                           validation_prompt=["a sks shape"], seed=0, resolution=64)
    options = SimpleNamespace(args=args, method_config=SimpleNamespace(to_json=lambda: "{}"))
    method = SimpleNamespace(name="res-tuning", label="Res-Tuning", summary="tuners beside the OPs.")
    written = [(kind, out / ("tuner.safetensors" if kind == "tuner" else f"{kind}.safetensors")) for kind in kinds]
    return artifacts.write_model_card(out, options, method, source, 10, list(samples), written).read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    return [code for _, code in re.findall(r"^(`{3,})python\n(.*?)^\1$", text, flags=re.S | re.M)]


def test_the_card_names_the_base_model_as_its_user_would(tmp_path, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    demo = card_for(tmp_path, str(DEMO_MODEL), SimpleNamespace(kind="folder", location=str(DEMO_MODEL), family="sd1"))
    assert str(DEMO_MODEL) not in demo and str(REPO) not in demo, "never the server's path of the bundled model"
    assert f"base_model = '{artifacts.DEMO_PLACEHOLDER}'" in python_blocks(demo)[0]
    assert "`assets/demo-model` in its repository" in demo  # the placeholder is explained
    hub = card_for(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", SimpleNamespace(kind="hub", family="sd1"))
    assert "base_model = 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in hub and "from_pretrained(base_model)" in hub
    own = tmp_path / "my-model"
    folder = card_for(tmp_path, str(own), SimpleNamespace(kind="folder", location=str(own), family="sd1"))
    assert f"base_model = {str(own)!r}" in folder and "stands for" not in folder
    single = card_for(tmp_path, str(own) + ".safetensors", SimpleNamespace(kind="single-file", location=str(own) + ".safetensors", family="sd1"))
    assert "StableDiffusionPipeline.from_single_file(base_model)" in single
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    shared = card_for(tmp_path, str(own), SimpleNamespace(kind="folder", location=str(own), family="sd1"))
    assert str(own) not in shared and f"base_model = '{artifacts.SHARED_PLACEHOLDER}'" in shared


def test_the_card_loads_the_tuner_by_its_download_name(tmp_path):
    run = tmp_path / "20261203-120501-res-tuning-ab12"
    run.mkdir()
    text = card_for(run, "owner/model", SimpleNamespace(kind="hub", family="sd1"))
    assert artifacts.download_name(run.name, "res-tuning") == "20261203-120501-res-tuning-ab12.safetensors"
    assert artifacts.download_name("dog", "res-tuning") == "dog-res-tuning.safetensors"
    assert artifacts.download_name("my dog/../x", "lora") == "my-dog-..-x-lora.safetensors"
    assert "restuning.load(pipe, '20261203-120501-res-tuning-ab12.safetensors'" in python_blocks(text)[0]
    assert "`tuner.safetensors` in the run folder" in text


def fake_run(runs: Path, name="20261203-120501-res-tuning-ab12") -> tuple[Path, dict]:
    run = runs / name
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step000010-p0-0.png").write_bytes(PNG)
    (run / "samples" / "step000005-p0-0.png").write_bytes(PNG)  # an earlier sample: not on the card
    (run / "tuner.safetensors").write_bytes(b"weights")
    card_for(run, "owner/model", SimpleNamespace(kind="hub", family="sd1"), samples=[run / "samples" / "step000010-p0-0.png"])
    return run, {"tuner": run / "tuner.safetensors", "model-card": run / "README.md"}


def test_downloads_carry_useful_names_and_the_card_travels_with_its_pictures(tmp_path):
    run, found = fake_run(tmp_path)
    files = artifacts.downloads(run, found, "res-tuning")
    assert files["tuner"].name == "20261203-120501-res-tuning-ab12.safetensors"
    assert files["tuner"].read_bytes() == b"weights" and files["tuner"].parent == run / "downloads"
    with zipfile.ZipFile(files["model-card"]) as zf:
        assert sorted(zf.namelist()) == ["20261203-120501-res-tuning-ab12.safetensors", "README.md",
                                         "samples/step000010-p0-0.png"]
        card = zf.read("README.md").decode()
    assert "![sample](samples/step000010-p0-0.png)" in card
    stamps = {k: p.stat().st_mtime_ns for k, p in files.items()}
    again = artifacts.downloads(run, found, "res-tuning")
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps, "nothing made again while nothing changed"
    time.sleep(0.01)
    tmp = run / ".tuner.tmp"
    tmp.write_bytes(b"resumed and saved again")
    os.replace(tmp, run / "tuner.safetensors")  # as restuning.save replaces it
    fresh = artifacts.downloads(run, found, "res-tuning")
    assert fresh["tuner"].read_bytes() == b"resumed and saved again"
    with zipfile.ZipFile(fresh["model-card"]) as zf:
        assert zf.read("20261203-120501-res-tuning-ab12.safetensors") == b"resumed and saved again"
    assert not [p for p in (run / "downloads").iterdir() if p.name.startswith(".")], "no temporary file left"


def test_a_card_links_only_its_own_samples(tmp_path):
    run, _ = fake_run(tmp_path)
    text = "![a](samples/step000010-p0-0.png)\n![b](../outside.png)\n![c](samples/../README.md)\n`![d](samples/x.png)`\n"
    (tmp_path / "outside.png").write_bytes(PNG)
    assert artifacts.card_images(text, run) == ["samples/step000010-p0-0.png"]


# -- pip install, then the card's code from a folder outside the repository ------------------------------


def isolated_venv(where: Path) -> Path:
    """A new virtual environment whose own site-packages is empty, that sees this interpreter's
    packages (torch, diffusers, ...; installing them again offline is not possible) through a .pth
    file: what pip installs into it is the only `restuning` it can import."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in {sysconfig.get_path("purelib"), *site.getsitepackages()} if Path(p).is_dir()]
    (Path(own) / "parent_packages.pth").write_text("\n".join(parents) + "\n")
    return python


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_pip_install_then_the_cards_code_runs_outside_the_repository(tmp_path):
    from tests.test_trainer import PROMPT, argv, build_tiny, make_images, run_train

    # the repository as a fresh clone has it (a copy: building writes build/ and *.egg-info beside the sources)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    source = tmp_path / "clone"
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes((REPO / rel).read_bytes())
    python = isolated_venv(tmp_path / "venv")
    user = tmp_path / "user"
    user.mkdir()
    probe = [str(python), "-c", "import importlib.util; print(importlib.util.find_spec('restuning'))"]
    assert subprocess.run(probe, cwd=user, env=clean_env(), capture_output=True, text=True).stdout.strip() == "None"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], cwd=user, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    found = subprocess.run(probe, cwd=user, env=clean_env(), capture_output=True, text=True).stdout
    assert str(tmp_path / "venv") in found, found

    # a run as the studio makes one: the trainer, in this process, on a tiny model
    model = build_tiny(tmp_path / "tiny")
    run = tmp_path / "runs" / "20261203-120501-res-tuning-ab12"
    run_train(argv(model, make_images(tmp_path / "instance"), run, "--max_train_steps", 2, "--validation_prompt", PROMPT,
                   "--num_validation_images", 1))

    # downloaded as the Runs tab hands it out, unpacked in the user's own folder
    found_files = {e["kind"]: run / e["path"] for e in read_events(run) if e["event"] == "artifact"}
    with zipfile.ZipFile(artifacts.downloads(run, found_files, "res-tuning")["model-card"]) as zf:
        zf.extractall(user)
    card = (user / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", card, flags=re.M)
    assert pictures and all((user / p).is_file() for p in pictures), "the card's pictures came with it"
    code = python_blocks(card)[0] + "\nimage.save('from-the-card.png')\nprint(restuning.__file__)\n"
    ran = subprocess.run([str(python), "-c", code], cwd=user, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert str(tmp_path / "venv") in ran.stdout, "the installed library ran, not the repository's"
    from PIL import Image

    assert Image.open(user / "from-the-card.png").size == (64, 64)
