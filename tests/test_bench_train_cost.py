"""bench/train_cost.py: the quick mode runs every registry method in a fresh process end to end,
and the table's ratios and target checks are computed from the measurements."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import restuning
from bench import train_cost
from restuning.arch import build_unet
from restuning.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _trainable_on_tiny(name):
    unet = build_unet("tiny", device="meta")
    return sum(p.numel() for p in restuning.attach(unet, METHODS[name].config()).parameters())


@pytest.mark.slow
def test_quick_mode_measures_every_method_in_its_own_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.train_cost", "--quick", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "train_cost_tiny_cpu_64px_b1_fp32.json").read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["inference", *METHODS]
    assert not [r for r in rows.values() if "error" in r]
    for name in METHODS:
        assert rows[name]["trainable"] == _trainable_on_tiny(name), name
    assert rows["inference"]["trainable"] == 0 and rows["inference"]["fused_adamw"] is None
    assert rows["full"]["trainable"] == rows["full"]["unet_params"]
    for r in rows.values():
        assert len(r["step_s"]) == 2 and r["median_s"] == r["step_s"][1] > 0
        assert r["peak_bytes"] >= r["setup_peak_bytes"] > 100 * 2**20
    table = (tmp_path / "train_cost_tiny_cpu_64px_b1_fp32.md").read_text()
    for method in METHODS.values():
        assert f"| {method.label} |" in table


def _row(case, peak_gib, median_s, trainable=1):
    return {"case": case, "trainable": trainable, "unet_params": 100, "peak_bytes": peak_gib * train_cost.GIB,
            "median_s": median_s, "step_s": [9.0, median_s], "threads": 2}


def _result(rows, arch="sd15", reference="full"):
    settings = {"arch": arch, "resolution": 256, "batch": 1, "precision": "fp32", "steps": 2, "device": "cpu",
                "torch": "x", "note": "", "cpu": "2 CPU cores"}
    return {"settings": settings, "reference": reference, "rows": rows, "wall_s": 60, "date": "today"}


def test_table_ratios_and_targets_come_from_the_measurements():
    rows = [_row("inference", 4.0, 2.0, 0), _row("full", 14.0, 12.0, 100), _row("lora", 4.5, 5.0),
            _row("res-tuning", 4.6, 4.0), _row("bypass", 4.2, 2.5)]
    table = train_cost.markdown(_result(rows))
    bypass = next(line for line in table.splitlines() if line.startswith("| Res-Tuning-Bypass |"))
    cells = [c.strip() for c in bypass.strip("|").split("|")]
    assert cells[2:] == ["4.20", "1.05", "0.30", "0.29", "2.50", "0.21", "0.41"]
    assert "Bypass peak memory <= 1.10 x inference-only: 1.05 x, met" in table
    assert "Bypass step time <= 0.25 x full fine-tuning: 0.21 x, met" in table
    assert "Bypass step time <= 0.6 x LoRA: 0.50 x, met" in table
    assert "Res-Tuning peak memory <= LoRA's: 1.02 x, MISSED" in table


def test_against_inference_the_table_has_one_memory_ratio_column_and_every_row_its_width():
    rows = [_row("inference", 4.0, 2.0, 0), _row("bypass", 6.0, 3.0), {"case": "lora", "error": "killed"}]
    lines = [line for line in train_cost.markdown(_result(rows, reference="inference")).splitlines() if line.startswith("|")]
    assert lines[0].count("| memory / inference |") == 1
    assert len({line.count("|") for line in lines}) == 1
    bypass = [c.strip() for c in lines[3].strip("|").split("|")]
    assert bypass[2:5] == ["6.00", "1.50", "-"]


def test_failed_cases_and_missing_references_are_shown_not_hidden():
    rows = [_row("lora", 4.5, 5.0), {"case": "bypass", "error": "killed by signal 9 (out of memory?)"}]
    table = train_cost.markdown(_result(rows, reference="lora"))
    assert "| Res-Tuning-Bypass | failed: killed by signal 9 (out of memory?) |" in table
    assert "Targets" not in table  # nothing to check without inference, full or a bypass figure
    assert "Targets" not in train_cost.markdown(_result([_row("inference", 1, 1, 0), _row("bypass", 2, 1)], arch="tiny", reference="bypass"))


@pytest.mark.parametrize("argv,message", [
    (["--methods", "inference,dreambooth"], "unknown case"),
    (["--resolution", "100"], "multiple of 8"),
    (["--methods", "lora,bypass", "--reference", "full"], "not among the cases"),
    (["--paper-setting", "--device", "cpu"], "needs a CUDA GPU"),
])
def test_bad_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cost.parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("arch,tiny", [("sdxl", "tiny-sdxl"), ("sd2", "tiny-sd2")])
def test_each_family_measures_its_own_u_net_with_its_conditioning(arch, tiny):
    """--arch sdxl builds SDXL's U-Net (its tiny counterpart under --quick), whose step needs the
    pooled text and size ids; the published sizes are what --paper-setting trains at."""
    args = train_cost.parse(["--arch", arch, "--quick", "--methods", "bypass", "--reference", "bypass"])
    assert (args.arch, args.resolution) == (tiny, 64)
    row = train_cost.measure("bypass", tiny, 64, 1, "fp32", 2, "cpu")
    assert row["unet_params"] == sum(p.numel() for p in build_unet(tiny, device="meta").parameters())
    assert row["trainable"] > 0 and row["finite_loss"] and len(row["losses"]) == 2
    assert train_cost.NATIVE[arch] == {"sdxl": 1024, "sd2": 768}[arch]


@pytest.mark.slow
def test_quick_sdxl_mode_writes_the_sdxl_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.train_cost", "--arch", "sdxl", "--quick", "--methods", "inference,lora,bypass",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "train_cost_tiny-sdxl_cpu_64px_b1_fp32.json").read_text())
    assert [r["case"] for r in result["rows"]] == ["inference", "lora", "bypass"]
    assert not [r for r in result["rows"] if "error" in r]
    assert "`tiny-sdxl` U-Net" in (tmp_path / "train_cost_tiny-sdxl_cpu_64px_b1_fp32.md").read_text()
