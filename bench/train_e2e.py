"""The trainer end to end on the bundled demo model: wall time of a whole run, as a user waits for it.

    python -m bench.train_e2e                         # 400 Res-Tuning steps on this machine's device
    python -m bench.train_e2e --source ../old-checkout --label before   # the same run from another checkout

A Res-Tuning run of `python -m trainers.dreambooth` with the quality benchmark's recipe (batch 4 +
4 prior-preservation images at 64 px, lr 1e-2, min-SNR 5, 32 class images made by the base model
first and cached across runs, validation samples at the end). Reported: wall time, when each
phase began, and the median seconds per step the trainer measured. `--source` runs another
checkout's trainer on the same settings, for before/after figures from one machine and one sitting.
Appends a row to bench/results/train_e2e_<device>.json and rewrites the .md beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "assets" / "demo-model"


def trainer_run(work: Path, steps: int, device: str, timeout: float, source: Path = ROOT, class_images: int = 32,
                validation_images: int = 4) -> dict:
    """One run in a fresh process from checkout `source`; its figures, or {"error": ...}."""
    from trainers.events import read_events

    run = work / "demo-res-tuning"
    config = {
        "pretrained_model_name_or_path": str(DEMO),
        "instance_data_dir": str(ROOT / "assets" / "concepts" / "star"),
        "instance_prompt": "a sks shape",
        "class_prompt": "a shape",
        "with_prior_preservation": True,
        "num_class_images": class_images,
        "class_data_dir": str(work / "class-images"),
        "resolution": 64,
        "train_batch_size": 4,
        "max_train_steps": steps,
        "learning_rate": 1e-2,
        "snr_gamma": 5.0,
        "validation_prompt": ["a sks shape", "a red sks shape on a blue background"],
        "num_validation_images": validation_images,
        "validation_steps": steps,
        "checkpointing_steps": max(steps // 2, 1),
        "mixed_precision": "fp16" if device == "cuda" else "no",
        "method": "res-tuning",
        "output_dir": str(run),
        "seed": 0,
    }
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config, indent=2))
    env = dict(os.environ, **({} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}))
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "trainers.dreambooth", "--config", str(run / "config.json")],
                              cwd=source, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.monotonic() - started, 1)}
    wall = time.monotonic() - started
    events = read_events(run)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}", "wall_s": round(wall, 1)}
    phases: dict[str, float] = {}
    for e in events:
        if e.get("event") == "phase" and e.get("phase") not in phases:
            phases[e["phase"]] = e["t"]
    start_t = events[0]["t"] if events else 0
    steps_ev = [e for e in events if e.get("event") == "step"]
    info = next((e for e in events if e.get("event") == "info" and "trainable_params" in e), {})
    return {
        "steps": steps,
        "wall_s": round(wall, 1),
        "phase_start_s": {k: round(v - start_t, 2) for k, v in phases.items()},
        "training_s": round(phases["saving"] - phases["training"], 2) if {"saving", "training"} <= set(phases) else None,
        "sec_per_step_median": statistics.median([e["sec_per_step"] for e in steps_ev]) if steps_ev else None,
        "first_loss": steps_ev[0]["loss"] if steps_ev else None,
        "last_loss": steps_ev[-1]["loss"] if steps_ev else None,
        "attention": info.get("attention"),
        "mixed_precision": info.get("mixed_precision"),
        "device": info.get("device"),
        "tuner": str(run / "tuner.safetensors"),
    }


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"### The trainer end to end on the demo model ({device})", "",
             "Res-Tuning, batch 4 + 4 prior images at 64 px, 32 class images generated first, validation samples at the end "
             "(`python -m bench.train_e2e`). Training = from the training phase to saving, so the checkpoint and the "
             "validation samples are in it.", "",
             "| label | date | machine | steps | wall (s) | class images (s) | training (s) | median s/step | loss first -> last |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['date']} | {r['machine']} | | failed: {r['error']} | | | | |")
            continue
        ph = r["phase_start_s"]
        class_s = round(ph["training"] - ph["class-images"], 1) if {"training", "class-images"} <= set(ph) else None
        lines.append(f"| {r['label']} | {r['date']} | {r['machine']} | {r['steps']} | {r['wall_s']:.1f} | {class_s} | {r['training_s']} "
                     f"| {r['sec_per_step_median']:.4f} | {r['first_loss']:.4f} -> {r['last_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.train_e2e", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--source", type=Path, default=ROOT, help="the checkout whose trainer runs (default this one)")
    p.add_argument("--label", default="current", help="the row's name in the table, e.g. before / after")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    with tempfile.TemporaryDirectory(prefix="train-e2e-") as work:
        row = trainer_run(Path(work), args.steps, device, args.timeout, source=args.source.resolve())
    row.pop("tuner", None)
    row.update(label=args.label, machine=machine, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               load_before=round(os.getloadavg()[0], 2))
    path = args.out_dir / f"train_e2e_{device}.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows.append(row)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, device)
    path.with_suffix(".md").write_text(table)
    print(table)
    return row


if __name__ == "__main__":
    main()
