"""The memory estimate (trainers/memory.py) against every measurement of a training step's peak:
the bench results of the SD v1.5 U-Net (bench.train_cost, bench.gpu_check, the Bypass's designs
of bench.bypass_ablation), SD 2.x and SDXL results where measured, and the demo model's own CLI
runs. tests/test_memory.py holds every row within 0.90-1.20x.

    python -m bench.memory_estimate            # the table
    python -m bench.memory_estimate --write    # and bench/results/memory_estimate.md
"""

from __future__ import annotations

import functools
import json

from bench import BYPASS_ABLATION, bypass_config_options
from trainers.memory import GIB, REPO_ROOT, trainable_weights, estimate_config, estimate_parts, model_facts
from trainers.models import CONFIGS

SD1_CONFIGS = CONFIGS["sd1"]

# The bench results the estimate is checked against: (file, device). The SD v1.5 U-Net's training
# step alone (bench.train_cost and bench.gpu_check; the Bypass's designs from bench.bypass_ablation).
CALIBRATION_FILES = (
    ("train_cost_sd15_cpu_256px_b1_fp32.json", "cpu"), ("train_cost_sd15_cpu_512px_b2_fp32.json", "cpu"),
    ("gpu_check_h200.json", "cuda"), ("train_cost_sd15_cuda_256px_b1_fp32.json", "cuda"),
    ("train_cost_sd15_cuda_512px_b2_fp32.json", "cuda"),
    ("bypass_ablation_cost_cpu_256px_b1.json", "cpu"), ("bypass_ablation_cost_cpu_512px_b2.json", "cpu"),
)


# Res-Tuning's defaults when the bench results without a recorded config and DEMO_RUNS were measured:
# the paper's Dual layout on the mid and up blocks.
MEASURED_RES_TUNING = {"tuners": {"attn1": "adapter", "ff": "adapter"}, "blocks": ["mid", "up"], "dim": 10, "identifier": "",
                       "off_concept_loss": 0.0}


def _design(row: dict) -> tuple[str, str]:
    """(method, config JSON) a bench row was measured with: its recorded config; else an ablation
    case's; else, for a Bypass row written before configs were recorded, the design (default or
    ablation) with its trainable count on SD v1.5; else the method's defaults."""
    if isinstance(row.get("config"), dict):
        config = dict(row["config"])
        return config.pop("method"), json.dumps(config, sort_keys=True)
    designs = {case: bypass_config_options(options) for case, _, options in BYPASS_ABLATION}
    if row["case"] in designs:
        return "bypass", json.dumps(designs[row["case"]], sort_keys=True)
    if row["case"] == "bypass" and row.get("trainable"):
        for options in [{}, *designs.values()]:
            text = json.dumps(options, sort_keys=True)
            if trainable_weights(str(SD1_CONFIGS), "bypass", text)[0] == row["trainable"]:
                return "bypass", text
    if row["case"] == "res-tuning":
        return "res-tuning", json.dumps(MEASURED_RES_TUNING, sort_keys=True)
    return row["case"], "{}"


@functools.lru_cache(maxsize=64)
def calibration_table() -> list[dict]:
    """Estimate against measurement for the settings of the bench results (U-Net training step
    alone) and of the demo model's CLI runs (whole process): what tests/test_memory.py checks.
    SD 2.x and SDXL rows join from any bench.train_cost results of those U-Nets in bench/results."""
    rows = []
    root = REPO_ROOT / "bench" / "results"
    files = [(name, device, "sd1") for name, device in CALIBRATION_FILES]
    files += [(p.name, None, family) for arch, family in (("sd2", "sd2"), ("sdxl", "sdxl"))
              for p in sorted(root.glob(f"train_cost_{arch}_*.json"))]
    for name, device, family in files:
        if (root / name).is_file():
            rows += _calibration_rows(name, json.loads((root / name).read_text()), str(CONFIGS[family]), device)
    return rows


def _calibration_rows(name: str, data: dict, configs: str, device: str | None) -> list[dict]:
    facts, s = model_facts(configs), data["settings"]
    device = device or ("cuda" if s.get("device") == "cuda" else "cpu")
    rows = []
    for row in (data.get("rows") or data.get("table6") or []) + data.get("variants", []):
        if row["case"] == "inference" or not row.get("peak_bytes"):
            continue
        method, config = _design(row) if configs == str(SD1_CONFIGS) else (
            row["case"], json.dumps(MEASURED_RES_TUNING, sort_keys=True) if row["case"] == "res-tuning" else "{}")
        trainable, kind, rendered = trainable_weights(configs, method, config)
        precision = row.get("precision") or s["precision"]
        est = estimate_parts(facts, trainable, kind, device=device, resolution=s["resolution"], batch=s["batch"],
                             precision=precision.replace("fp32", "no"), checkpointing=bool(row.get("gradient_checkpointing")),
                             adam8=row.get("optimizer") == "AdamW8bit", unet_only=True, rendered=rendered)
        # the bench's CUDA figure is torch's allocated memory: no context, no allocator slack
        value = est.total - (est.parts["overhead"] if device == "cuda" else 0)
        case = row["case"] + (f" ({row['key']})" if row in data.get("variants", []) else "")
        rows.append({"source": name, "case": case, "device": device, "resolution": s["resolution"], "batch": s["batch"],
                     "precision": precision, "estimate_gib": round(value / GIB, 2),
                     "measured_gib": round(row["peak_bytes"] / GIB, 2)})
    return rows


# The demo model's own runs: `python -m trainers.dreambooth` on assets/concepts/heart, 10 steps,
# validation at the end, peak RSS of the process (/usr/bin/time -v), this CPU, 2026-11-27.
# Res-Tuning then defaulted to the paper's Dual (MEASURED_RES_TUNING).
DEMO_RUNS = [
    ({"method": "res-tuning", **MEASURED_RES_TUNING, "resolution": 64, "train_batch_size": 1, "num_validation_images": 2}, 0.475),
    ({"method": "res-tuning", **MEASURED_RES_TUNING, "resolution": 64, "train_batch_size": 4, "num_validation_images": 4,
      "with_prior_preservation": True, "class_prompt": "a shape", "num_class_images": 8}, 0.519),
    ({"method": "full", "resolution": 64, "train_batch_size": 4, "num_validation_images": 2}, 0.540),
    ({"method": "lora", "resolution": 256, "train_batch_size": 16, "num_validation_images": 4}, 1.877),
]


def demo_rows() -> list[dict]:
    rows = []
    for config, measured in DEMO_RUNS:
        est = estimate_config({**config, "instance_prompt": "a sks shape", "validation_prompt": ["a sks shape"]}, "cpu")
        rows.append({"source": "demo model CLI run", "case": config["method"], "device": "cpu",
                     "resolution": config["resolution"], "batch": config["train_batch_size"], "precision": "fp32",
                     "estimate_gib": round(est.gib(), 2), "measured_gib": measured, "settings": config})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| measured in | case | device | px | batch | precision | estimate (GiB) | measured (GiB) | estimate / measured |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['case']} | {r['device']} | {r['resolution']} | {r['batch']} | {r['precision']} "
                     f"| {r['estimate_gib']:.2f} | {r['measured_gib']:.2f} | {r['estimate_gib'] / r['measured_gib']:.2f} |")
    return "\n".join(lines)


RESULT = REPO_ROOT / "bench" / "results" / "memory_estimate.md"


def main(argv=None) -> None:
    """`python -m bench.memory_estimate [--write]`: the table of estimate against measurement; --write
    also puts it in bench/results/memory_estimate.md."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(REPO_ROOT)}")
    args = parser.parse_args(argv)
    table = markdown(calibration_table() + demo_rows())
    print(table)
    if args.write:
        RESULT.write_text(
            "### Memory estimate (trainers/memory.py) against measured peaks\n\n"
            "SD v1.5 rows: the U-Net's training step alone, as bench/train_cost measured it (CPU: peak RSS of the process; "
            "CUDA: torch.cuda.max_memory_allocated, so the estimate's 1 GiB for the CUDA context is left out). Demo model rows: "
            "`python -m trainers.dreambooth` on assets/concepts/heart, 10 steps and validation samples, peak RSS of the whole "
            "process (/usr/bin/time), 2 CPU cores, 2026-11-27. The coefficients were fitted to these same measurements "
            "(the module's docstring), so the table shows the fit and the demo rows the transfer to another architecture; "
            "tests/test_memory.py holds every row within 0.90-1.20 x.\n\n" + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
