"""The quality benchmark's whole path in quick mode (two training steps, one seed): it trains,
samples through the shared Sampler, scores with the shipped evaluator and writes its report.
Quality is not asserted here; bench/results/quality.md holds the real run. Its intervals are
checked against the published examples of Newcombe (1998)."""

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
        assert row["n"] == 4
        lo, hi = row["concept_fidelity"]["ci95"]
        assert lo <= row["concept_fidelity"]["rate"] <= hi
        for key in ("prompt_fidelity", "preservation"):
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


def test_intervals_match_newcombes_worked_examples():
    """Newcombe, Statistics in Medicine 17 (1998): Wilson 81/263 -> 0.2553-0.3662 (single
    proportion paper, example c); 56/70 - 48/80 -> 0.0524-0.3339 (method 10, difference paper)."""
    lo, hi = quality.wilson(81, 263)
    assert round(lo, 4) == 0.2553 and round(hi, 4) == 0.3662
    d, lo, hi = quality.newcombe(56, 70, 48, 80)
    assert round(d, 4) == 0.2 and round(lo, 4) == 0.0524 and round(hi, 4) == 0.3339
    assert quality.wilson(0, 128)[0] == 0.0 and quality.wilson(128, 128)[1] > 1 - 1e-9


def test_default_run_has_64_samples_per_cell_two_trainings_and_the_single_layouts():
    args = quality.parse_args([])
    assert len(quality.NEW_CONTEXTS) * args.seeds >= 64 and args.train_seeds == 2
    labels = [v.label for v in quality.default_variants()]
    for layout in ("attn1=adapter", "attn1=prefix", "ff=prompt"):
        assert f"Res-Tuning (Single: {layout})" in labels
