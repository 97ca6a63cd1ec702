"""bench.gpu_check: the CPU dry mode runs every code path, and the GPU results in the README render."""

import json
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check
from scripts import gpu_wheels

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_exercises_every_part(tmp_path):
    # The budget is the GPU call's; here every part must run, however loaded the machine (its
    # skipping is tested below with an empty budget).
    result = gpu_check.main(["--dry", "--methods", "inference,full,res-tuning", "--budget", "3600", "--out-dir", str(tmp_path)])

    rows = {r["key"]: r for r in result["table6"]}
    assert set(rows) == {"inference", "full", "res-tuning"}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["inference"]["losses"] == [] and rows["inference"]["trainable"] == 0
    for case in ("full", "res-tuning"):
        assert len(rows[case]["losses"]) == 2 and rows[case]["finite_loss"]
        assert rows[case]["peak_bytes"] > 0 and rows[case]["median_s"] > 0
    assert rows["full"]["trainable"] == rows["full"]["unet_params"]

    variants = {(r["key"], r["case"]): r for r in result["variants"]}
    assert variants[("bf16 autocast", "res-tuning")]["precision"] == "bf16"
    assert variants[("gradient checkpointing", "full")]["gradient_checkpointing"] is True
    assert variants[("8-bit AdamW (bitsandbytes)", "full")]["optimizer"] == "AdamW8bit"
    # xformers has no CPU kernel (or is not installed): the variant is skipped with its reason.
    assert variants[("xformers attention", "res-tuning")]["skipped"].startswith("xformers unusable here")
    assert ("xformers attention", "prefix") not in variants  # prefix was not among --methods

    trainer = result["trainer"]
    assert "error" not in trainer, trainer
    assert trainer["steps"] == 2 and trainer["device"] == "cpu" and trainer["tuner"] == "tuner.safetensors"
    render = result["render"]
    assert "error" not in render, render
    assert (tmp_path / render["grid"]).is_file() and render["rows"] == 4

    saved = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert saved["settings"]["arch"] == "tiny"
    table = (tmp_path / "gpu_check_dry.md").read_text()
    assert "dry run" in table and "| Res-Tuning |" in table and "skipped" not in table.split("#### Variants")[0]


def test_committed_gpu_results_name_the_device_and_render():
    found = sorted((ROOT / "bench" / "results").glob("gpu_check_*.json"))
    assert found, "the GPU check's results are committed under bench/results"
    for path in found:
        result = json.loads(path.read_text())
        assert result["versions"]["gpu"].startswith("NVIDIA")
        table = gpu_check.markdown(result)
        assert result["versions"]["gpu"] in table
        full = next(r for r in result["table6"] if r["key"] == "full")
        bypass = next(r for r in result["table6"] if r["key"] == "bypass")
        assert f"{bypass['peak_bytes'] / full['peak_bytes']:.2f} x here" in table
        assert path.with_suffix(".md").read_text() == table


def test_budget_spent_skips_with_a_reason(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check.train_cost, "run_case", lambda *a, **k: calls.append(a) or {})
    rows = gpu_check.cost_rows([("full", "full", {})], {"precision": "fp16"}, gpu_check.Budget(0), 60)
    assert rows == [{"key": "full", "case": "full", "skipped": "time budget spent"}] and calls == []


def test_thinned_bitsandbytes_wheel_keeps_only_the_target_cuda(tmp_path):
    wheel = tmp_path / "bitsandbytes-0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_cuda1302.so", "bitsandbytes-0.dist-info/RECORD"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, name)
    gpu_wheels.thin_bitsandbytes(wheel, "130")
    with zipfile.ZipFile(wheel) as z:
        kept = sorted(z.namelist())
        assert z.read("bitsandbytes/__init__.py") == b"bitsandbytes/__init__.py"
    assert kept == sorted(["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                           "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.dist-info/RECORD"])


def test_gpu_wheels_take_the_pinned_versions():
    pins = gpu_wheels.pins()
    assert {"diffusers", "xformers", "bitsandbytes", "torch"} <= set(pins)
    # xformers' wheel is built against one torch release: the GPU set pins that one.
    assert (pins["torch"], pins["xformers"]) == ("2.10.0", "0.0.35")
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
