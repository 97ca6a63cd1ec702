"""bench.bypass_ablation's join: quality rows found under the names they were run with, each with
what it rests on, and each design's cost read from the case measured for its cost."""

import json

from bench import BYPASS_DEFAULT, bypass_ablation


def quality_file(path, label, train_seeds, seeds, rate):
    fidelity = {"k": 1, "rate": rate, "ci95": [0.0, 1.0], "per_seed": [rate] * train_seeds}
    rows = [{"label": "SD (base)", "method": None, "concept_fidelity": {"rate": 0.0}, "prompt_fidelity": 1.0, "preservation": 1.0},
            {"label": label, "method": "bypass", "runs": [{"final_loss": 0.1}] * train_seeds, "n": train_seeds * 4 * seeds,
             "concept_fidelity": fidelity, "prompt_fidelity": 1.0, "preservation": 0.9}]
    path.write_text(json.dumps({"concept": "star", "steps": 600, "seeds": seeds, "train_seeds": train_seeds, "snr_gamma": 5.0,
                                "batch_size": 4, "rows": rows}))
    return path


def cost_file(path, cases):
    rows = [{"case": case, "peak_bytes": peak, "median_s": 1.0, "trainable": 10} for case, peak in cases.items()]
    path.write_text(json.dumps({"settings": {"resolution": 512, "batch": 2, "device": "cpu"}, "rows": rows}))
    return path


def test_renamed_rows_keep_their_evidence_and_designs_share_the_cost_of_their_case(tmp_path):
    skip_path = next(label for case, label, _ in bypass_ablation.designs() if case == "bypass-skip-path")
    files = [quality_file(tmp_path / "a.json", "d2 skip", 2, 8, 0.25), quality_file(tmp_path / "b.json", BYPASS_DEFAULT[1], 1, 16, 0.5)]
    cost = cost_file(tmp_path / "c.json", {"inference": 4.0, "lora": 8.0, "bypass": 6.0, "bypass-skip-path": 5.0})
    rows = {r["case"]: r for r in bypass_ablation.join(files, [cost], {"d2 skip": skip_path})["rows"]}
    assert (rows["bypass-skip-path"]["trainings"], rows["bypass-skip-path"]["samples"]) == (2, 64)
    assert rows["bypass-skip-path"]["concept_fidelity"]["rate"] == 0.25
    assert (rows["bypass"]["trainings"], rows["bypass"]["samples"]) == (1, 64)
    assert rows["bypass"]["memory_vs_inference_512_b2"] == 1.5
    # a prior weight changes nothing the cost depends on: that row is costed as the default
    assert rows["bypass-prior2"]["memory_vs_inference_512_b2"] == 1.5 and rows["bypass-prior2"]["concept_fidelity"] is None
    assert rows["bypass-skip-path"]["memory_vs_inference_512_b2"] == 1.25
    assert "| 2 x 32 |" in bypass_ablation.markdown(bypass_ablation.join(files, [cost], {"d2 skip": skip_path}))
