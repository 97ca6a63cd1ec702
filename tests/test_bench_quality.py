"""The quality benchmark's whole path in quick mode (two training steps, one seed): it trains,
samples through the shared Sampler, scores with the shipped evaluator and writes its report.
Quality is not asserted here; bench/results/quality.md holds the real run."""

import json

import pytest
from PIL import Image

from bench import quality


@pytest.mark.slow
def test_quick_mode_trains_samples_scores_and_reports(tmp_path):
    out = tmp_path / "out"
    quality.main(["--quick", "--methods", "res-tuning,full", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads((out / "quality_quick.json").read_text())
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["SD (base)", "Res-Tuning", "Full fine-tuning"]
    for row in report["rows"]:
        for key in ("concept_fidelity", "prompt_fidelity", "preservation"):
            assert 0.0 <= row[key] <= 1.0
    for row in report["rows"][1:]:
        assert row["trainable_params"] > 0 and row["peak_rss_gib"] > 0 and row["sec_per_step"] > 0
    full = report["rows"][-1]
    assert full["trainable_params"] > 10 * report["rows"][1]["trainable_params"]
    grid = Image.open(out / "quality_quick_grid.png")
    assert grid.width >= 3 * 128  # one column per method plus the base, upscaled 2x
    assert "| Full fine-tuning |" in (out / "quality_quick.md").read_text()


def test_unknown_concept_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--quick", "--concept", "dragon", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert "no example images for concept 'dragon'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
