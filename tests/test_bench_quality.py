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
    for layout in ("attn1=adapter of length 80", "attn1=prefix of length 80", "ff=prompt"):
        assert f"Res-Tuning (Single: {layout})" in labels
    (wide,) = [v for v in quality.default_variants() if v.label == "Res-Tuning (Single: attn1=adapter of length 80)"]
    assert wide.options == {"tuners": {"attn1": "adapter"}, "dim": 80}
    # --methods is comma-separated, so no label may hold a comma
    assert not [v.label for v in quality.default_variants() + quality.extra_variants() if "," in v.label]
    # the paper's length 10 stays one --methods away
    assert "Res-Tuning (Single: attn1=adapter)" in [v.label for v in quality.extra_variants()]



def test_an_adhoc_variant_trains_with_its_own_options_and_bad_ones_are_refused(capsys):
    spec = 'attn1 mid={"method": "res-tuning", "tuners": {"attn1": "adapter"}, "blocks": ["mid"], "dim": 40}'
    args = quality.parse_args(["--variant", spec])
    (variant,) = quality.selected_variants(args)
    assert (variant.label, variant.method) == ("attn1 mid", "res-tuning")
    assert variant.options == {"tuners": {"attn1": "adapter"}, "blocks": ["mid"], "dim": 40}
    recipe, _ = quality.recipe_for(variant, args)
    cell = quality.Cell(variant, recipe, "test")
    config = quality.trainer_config(cell, args, quality.ROOT / "runs" / "unused")
    assert config["blocks"] == ["mid"] and config["dim"] == 40 and config["tuners"] == {"attn1": "adapter"}
    beside = quality.selected_variants(quality.parse_args(["--variant", spec, "--methods", "adapter"]))
    assert [v.label for v in beside] == ["Adapter", "attn1 mid"]
    (named,) = quality.selected_variants(quality.parse_args(["--variant", 'Single: attn1=adapter, d40={"method": "res-tuning", "dim": 40}']))
    assert (named.label, named.options) == ("Single: attn1=adapter, d40", {"dim": 40})
    for bad in ('x={"method": "nope"}', "x=not json", '={"method": "adapter"}', "no-equals-sign"):
        with pytest.raises(SystemExit):
            quality.selected_variants(quality.parse_args(["--variant", bad]))
        assert "--variant" in capsys.readouterr().err

# -- recipes and the sweep (issue #15) ------------------------------------------------------------

def _cell(concept, prompt, keep, n=64, lr=1e-2, label="Adapter"):
    return {"label": label, "method": "adapter", "options": {}, "recipe": {"learning_rate": lr}, "recipe_text": f"lr {lr:g}",
            "concept_fidelity": concept, "prompt_fidelity": prompt, "preservation": keep, "n": n}


def test_selection_rule_weighs_concept_within_the_prompt_and_preservation_floors():
    # The most concept fails a floor; of the two that pass, the higher concept wins.
    cells = [_cell(0.80, 0.85, 0.95, lr=3e-2), _cell(0.40, 0.95, 0.90, lr=1e-2), _cell(0.30, 1.00, 1.00, lr=3e-3),
             _cell(0.90, 1.00, 0.80, lr=1e-1)]
    best = quality.select(cells)
    assert best["recipe"]["learning_rate"] == 1e-2 and "2 of 4" in best["why"]
    # Within one sample (1/64) of the best concept: the better mean of the three wins.
    cells = [_cell(0.50, 0.92, 0.86, lr=3e-2), _cell(0.50 - 1 / 64, 1.00, 0.99, lr=1e-2), _cell(0.30, 1.0, 1.0, lr=3e-3)]
    best = quality.select(cells)
    assert best["recipe"]["learning_rate"] == 1e-2 and "within one sample" in best["why"]
    # No cell meets the floors: the best mean, flagged.
    cells = [_cell(0.9, 0.5, 0.5, lr=3e-2), _cell(0.2, 0.89, 0.84, lr=1e-2)]
    best = quality.select(cells)
    assert best["recipe"]["learning_rate"] == 1e-2 and best["why"].startswith("no cell met the floors")
    assert quality.select([]) is None
    assert "prompt fidelity >= 0.9" in quality.SELECTION_RULE and "preservation >= 0.85" in quality.SELECTION_RULE


def test_the_sweep_grid_and_its_order_when_time_is_short():
    variants = [v for v in quality.default_variants() if v.method in ("adapter", "full", "bypass")]
    cells = quality.sweep_cells(variants)
    adapter = [c for c in cells if c.variant.method == "adapter"]
    assert {(c.recipe["learning_rate"], c.recipe["blocks"]) for c in adapter} == {
        (lr, b) for lr in quality.SWEEP_LRS["tuner"] for b in quality.SWEEP_BLOCKS.values()}
    assert {c.recipe["learning_rate"] for c in cells if c.variant.method == "full"} == set(quality.SWEEP_LRS["full"])
    assert all("blocks" not in c.recipe for c in cells if c.variant.method in ("full", "bypass"))  # no blocks option
    # Every variant's middle rate at the paper's blocks comes first.
    assert [c.recipe["learning_rate"] for c in cells[:3]] == [1e-2, 1e-2, 1e-3]
    assert all(c.recipe.get("blocks", ("mid", "up")) == ("mid", "up") for c in cells[:3])
    args = quality.parse_args(["--sweep", "--jobs", "8", "--budget-min", "7"])
    whole = quality.estimate(cells, args, "cuda")["total_s"]
    keep, dropped = quality.fit_budget(cells, args, "cuda")
    assert keep == cells[: len(keep)] and dropped == cells[len(keep):]
    assert quality.estimate(keep, args, "cuda")["total_s"] <= 7 * 60 < whole or not dropped
    # More jobs on a GPU: less wall time.
    one = quality.estimate(cells, quality.parse_args(["--jobs", "1"]), "cuda")["total_s"]
    assert quality.estimate(cells, args, "cuda")["total_s"] < one



def test_the_sweep_takes_other_rates_when_asked_and_refuses_bad_ones(capsys):
    args = quality.parse_args(["--sweep", "--sweep-lrs", "0.01,0.001,0.003"])
    assert args.sweep_rates == (0.001, 0.003, 0.01)
    (variant,) = [v for v in quality.default_variants() if v.method == "adapter"]
    cells = quality.sweep_cells([variant], rates=args.sweep_rates)
    assert {(c.recipe["learning_rate"], c.recipe["blocks"]) for c in cells} == {
        (lr, b) for lr in (0.001, 0.003, 0.01) for b in quality.SWEEP_BLOCKS.values()}
    assert cells[0].recipe == {"learning_rate": 0.003, "blocks": ("mid", "up")}  # the middle rate first
    for bad in ("fast", "0.01,-1", ","):
        with pytest.raises(SystemExit):
            quality.parse_args(["--sweep", "--sweep-lrs", bad])
        assert "--sweep-lrs" in capsys.readouterr().err

def test_child_processes_share_the_cores_and_cpu_runs_hide_the_gpu(monkeypatch):
    monkeypatch.setattr(quality.os, "cpu_count", lambda: 16)
    args = quality.parse_args(["--jobs", "8", "--device", "cpu"])
    env = quality.child_env(args)
    assert env["OMP_NUM_THREADS"] == "2" and env["GOMP_SPINCOUNT"] == "0"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ACCELERATE_USE_CPU"] == "1"
    env = quality.child_env(quality.parse_args(["--jobs", "1", "--device", "cuda"]))
    assert env["OMP_NUM_THREADS"] == "16" and "ACCELERATE_USE_CPU" not in env


def _model_copy(tmp_path):
    """The demo model with its own demo_settings.json, the recipes reset to the hand-set ones
    (the weights linked, never written)."""
    real = quality.ROOT / "assets" / "demo-model"
    copy = tmp_path / "model"
    copy.mkdir()
    for item in real.iterdir():
        if item.name == "demo_settings.json":
            settings = json.loads(item.read_text())
            settings["recipes"] = {"default": {"learning_rate": 0.01}, "full": {"learning_rate": 0.001}}
            (copy / item.name).write_text(json.dumps(settings))
        else:
            (copy / item.name).symlink_to(item)
    return copy


def test_recipes_are_written_to_the_model_and_read_by_the_bench_and_the_trainer(tmp_path):
    from trainers import options

    real = (quality.ROOT / "assets" / "demo-model" / "demo_settings.json").read_text()
    model = _model_copy(tmp_path)
    settings = json.loads((model / "demo_settings.json").read_text())
    settings["recipes"]["bypass"] = {"learning_rate": 0.01, "depth": 3, "chosen_by": "by hand"}
    (model / "demo_settings.json").write_text(json.dumps(settings))
    winners = {
        "LoRA": {"method": "lora", "options": {}, "recipe": {"learning_rate": 0.03, "blocks": ["down", "mid", "up"]},
                 "concept_fidelity": 0.4, "prompt_fidelity": 0.95, "preservation": 0.9, "why": "test"},
        "Res-Tuning-Bypass": {"method": "bypass", "options": {}, "recipe": {"learning_rate": 3e-3},
                              "concept_fidelity": 0.6, "prompt_fidelity": 1.0, "preservation": 0.9, "why": "test"},
        "Full fine-tuning": {"method": "full", "options": {}, "recipe": {"learning_rate": 3e-4},
                             "concept_fidelity": 0.3, "prompt_fidelity": 0.95, "preservation": 0.9, "why": "test"},
        "Res-Tuning (Single: ff=prompt)": {"method": "res-tuning", "options": {"tuners": {"ff": "prompt"}}, "recipe": {"learning_rate": 3e-3},
                                           "concept_fidelity": 0.3, "prompt_fidelity": 0.95, "preservation": 0.9, "why": "test"},
    }
    sweep = tmp_path / "quality_sweep.json"
    sweep.write_text(json.dumps({"winners": winners}))
    quality.main(["--recipes-from", str(sweep), "--base", str(model)])
    recipes = json.loads((model / "demo_settings.json").read_text())["recipes"]
    assert recipes["lora"]["learning_rate"] == 0.03 and recipes["lora"]["blocks"] == ["down", "mid", "up"]
    assert recipes["full"]["learning_rate"] == 3e-4 and recipes["default"] == {"learning_rate": 0.01}  # kept
    assert "Res-Tuning (Single: ff=prompt)" in recipes and "res-tuning" not in recipes
    # the sweep chooses the rate; the depth the model folder sets for its Bypass stays
    assert {k: recipes["bypass"][k] for k in ("learning_rate", "depth")} == {"learning_rate": 3e-3, "depth": 3}
    assert "test" in recipes["bypass"]["chosen_by"]
    # The bench's default run: each variant's own recipe, and where it came from.
    args = quality.parse_args(["--base", str(model)])
    by_label = {v.label: v for v in quality.default_variants()}
    assert quality.recipe_for(by_label["LoRA"], args) == ({"learning_rate": 0.03, "blocks": ("down", "mid", "up")}, "model recipe 'lora'")
    assert quality.recipe_for(by_label["Res-Tuning (Single: ff=prompt)"], args)[0] == {"learning_rate": 3e-3}
    assert quality.recipe_for(by_label["Res-Tuning (Single: attn1=prefix of length 80)"], args) == ({"learning_rate": 0.01}, "model recipe 'default'")
    assert quality.recipe_for(by_label["Full fine-tuning"], args)[0] == {"learning_rate": 3e-4}
    # LoRA with the text encoder trains with LoRA's recipe unless it has one of its own.
    with_text = next(v for v in quality.extra_variants() if v.label == "LoRA + text encoder")
    assert quality.recipe_for(with_text, args) == ({"learning_rate": 0.03, "blocks": ("down", "mid", "up")}, "model recipe 'lora'")
    given = quality.parse_args(["--base", str(model), "--learning-rate", "0.005"])
    assert quality.recipe_for(by_label["LoRA"], given) == ({"learning_rate": 0.005}, "--learning-rate")
    # The trainer (and so the studio) takes the method's recorded rate and blocks where none are given.
    parsed = options.parse(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(quality.ROOT / "assets" / "concepts" / "star"),
                            "--instance_prompt", "a sks shape", "--method", "lora"])
    assert parsed.args.learning_rate == 0.03 and parsed.method_config.blocks == ("down", "mid", "up")
    assert "blocks" in parsed.recipe
    parsed = options.parse(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(quality.ROOT / "assets" / "concepts" / "star"),
                            "--instance_prompt", "a sks shape", "--method", "lora", "--blocks", "up"])
    assert parsed.method_config.blocks == ("up",)
    assert (quality.ROOT / "assets" / "demo-model" / "demo_settings.json").read_text() == real


@pytest.mark.slow
def test_quick_sweep_in_parallel_on_the_cpu_scores_every_cell_and_records_the_winner(tmp_path):
    real = (quality.ROOT / "assets" / "demo-model" / "demo_settings.json").read_text()
    model = _model_copy(tmp_path)
    out = tmp_path / "out"
    quality.main(["--quick", "--sweep", "--jobs", "2", "--device", "cpu", "--methods", "prefix", "--base", str(model),
                  "--write-recipes", "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads((out / "quality_sweep_quick.json").read_text())
    assert report["device"] == "cpu" and report["jobs"] == 2 and report["rule"] == quality.SELECTION_RULE
    assert len(report["cells"]) == 4 and all(c["n"] == 4 for c in report["cells"])
    assert {c["recipe_text"] for c in report["cells"]} == {"lr 0.003, blocks mid+up", "lr 0.03, blocks mid+up",
                                                           "lr 0.003, blocks all", "lr 0.03, blocks all"}
    winner = report["winners"]["Prefix"]
    assert winner["recipe"] in [c["recipe"] for c in report["cells"]] and winner["why"]
    recipes = json.loads((model / "demo_settings.json").read_text())["recipes"]
    assert recipes["prefix"]["learning_rate"] == winner["recipe"]["learning_rate"]
    assert recipes["prefix"]["blocks"] == winner["recipe"]["blocks"]
    md = (out / "quality_sweep_quick.md").read_text()
    assert "★" in md and "| Prefix | lr 0.03, blocks all |" in md
    assert (quality.ROOT / "assets" / "demo-model" / "demo_settings.json").read_text() == real


def test_a_sweeps_many_columns_render_in_groups_the_sampler_can_hold():
    from trainers.sampling import MAX_LOADED_TUNERS

    class FakeSampler:
        widest = 0

        def render(self, columns, rows):
            self.widest = max(self.widest, len(columns))
            return [[(c, r) for c in columns] for r in rows]

    sampler = FakeSampler()
    columns, rows = list(range(3 * MAX_LOADED_TUNERS + 2)), ["a", "b"]
    grid = quality.render_in_groups(sampler, columns, rows)
    assert grid == [[(c, r) for c in columns] for r in rows]
    assert sampler.widest < MAX_LOADED_TUNERS
