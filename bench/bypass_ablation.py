"""The ablation of Res-Tuning-Bypass designs: what each one does to quality and cost.

    python -m bench.bypass_ablation --run            # everything, on CUDA (about 6 min on one H200)
    python -m bench.bypass_ablation --run --quick    # the same path with tiny budgets, on any device
    python -m bench.bypass_ablation --quality Q1.json Q2.json ... --cost C256.json C512.json   # join only
        [--rename "LABEL IN A FILE=DESIGN LABEL" ...] [--name bypass_ablation_cpu]

`--run`: first the step time at 512 px batch 2 on the SD v1.5 architecture (`bench.train_cost`,
alone on the device so the times compare), then at once the peak memory at 256 px batch 1 and
one `bench.quality` process per design (2 training seeds x 4 prompts x 16 sampling seeds on the
demo model), then the join. The join reads those results and writes, per design
(bench.BYPASS_ABLATION and the registry's default Bypass), bench/results/bypass_ablation.{json,md}:
concept fidelity with its 95% interval, prompt fidelity and preservation; trainable parameters,
peak memory over inference-only and step time over LoRA on SD v1.5. On a bare GPU machine with
PyTorch but no diffusers, install the wheels of `make gpu-check-wheels` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench import BYPASS_ABLATION, BYPASS_DEFAULT, bypass_config_options, write_results

ROOT = Path(__file__).resolve().parents[1]
# What the default design should reach (docs/benchmarks.md says which it does and why not all):
# the paper's memory and time for a bypass, and the quality a user sees.
TARGETS = {"concept": 0.6, "prompt": 0.9, "preservation": 0.9, "memory": 1.10, "time": 0.6}


def designs() -> list[tuple[str, str, dict]]:
    return [*BYPASS_ABLATION, BYPASS_DEFAULT]


def cost_key(options: dict) -> str:
    """What decides a design's cost: its BypassConfig fields and gradient checkpointing (the other
    trainer options, a learning rate or a number of steps, cost what the same design costs)."""
    from restuning.methods.bypass import BypassConfig

    fields = BypassConfig(**bypass_config_options(options)).to_dict()  # depth 2 given and depth 2 by default cost the same
    return json.dumps({**fields, "gradient_checkpointing": bool(options.get("gradient_checkpointing"))}, sort_keys=True)


def costed_as() -> dict:
    """cost key -> the case measured for it: the default for its own, else the first design with it
    (a learning rate, a prior weight or a number of steps costs what the same design costs)."""
    first = {cost_key(BYPASS_DEFAULT[2]): BYPASS_DEFAULT[0]}
    for case, _, options in designs():
        first.setdefault(cost_key(options), case)
    return first


def cost_cases() -> list[str]:
    """One case per distinct cost."""
    return ["inference", "lora", *costed_as().values()]


def run_all(args) -> tuple[list[Path], list[Path]]:
    """The measurements; returns the quality and cost result files."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    budget = ["--quick"] if args.quick else ["--steps", "6"]
    cost = [*py, "bench.train_cost", "--device", args.device, *budget, "--methods", ",".join(cost_cases()), "--reference", "lora",
            "--timeout", "300"]
    print(f"[{time.strftime('%H:%M:%S')}] step time at 512 px batch 2, alone", flush=True)
    subprocess.run([*cost, "--resolution", "512", "--batch-size", "2", "--out-dir", str(work / "cost512")], cwd=ROOT, check=False)
    print(f"[{time.strftime('%H:%M:%S')}] memory at 256 px batch 1 and {len(designs())} quality runs, {args.jobs} at a time", flush=True)
    jobs = [(cost + ["--resolution", "256", "--batch-size", "1", "--out-dir", str(work / "cost256")], work / "cost256.log")]
    for i, (_, label, _) in enumerate(designs()):
        jobs.append(([*py, "bench.quality", "--device", args.device, *(["--quick"] if args.quick else []), "--methods", label,
                      "--work", str(work / f"q{i}"), "--out", str(work / f"q{i}")], work / f"q{i}.log"))
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GOMP_SPINCOUNT="10000", PYTHONUNBUFFERED="1")
    running = []
    for command, log in jobs:
        while len(running) - sum(p.poll() is not None for p, _ in running) >= args.jobs:
            time.sleep(1)
        running.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
    for proc, log in running:
        try:
            proc.wait(timeout=max(1.0, args.deadline - (time.time() - args.started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"stopped at the deadline ({args.deadline:.0f} s): {log}", flush=True)
        if proc.returncode != 0:
            print(f"failed: {log}\n" + "\n".join(log.read_text().splitlines()[-8:]), flush=True)
    quality = sorted(work.glob("q*/quality*.json"))
    with tarfile.open(args.out_dir / "bypass_ablation_runs.tar.gz", "w:gz") as tar:
        for path in [*quality, *work.glob("q*/quality*.md"), *work.glob("q*/quality*_grid.png"), *work.glob("*.log")]:
            tar.add(path, arcname=str(path.relative_to(work)))
    return quality, sorted(work.glob("cost*/train_cost_*.json"))


def join(quality_files: list[Path], cost_files: list[Path], rename: dict | None = None) -> dict:
    """`rename`: a quality file's row label -> the design label it measured (runs made under
    other names); rows of other labels are left out."""
    quality = {}
    base = None
    meta = {}
    for path in quality_files:
        report = json.loads(Path(path).read_text())
        meta = {k: report[k] for k in ("steps", "seeds", "train_seeds", "learning_rate", "snr_gamma", "batch_size", "concept") if k in report}
        for row in report["rows"]:
            if row["method"] is None:
                base = base or row
            else:
                label = (rename or {}).get(row["label"], row["label"])
                # what this row's figures rest on: its trainings and samples, which differ between files
                quality[label] = {**row, "trainings": report["train_seeds"], "samples": row.get("n") or report["train_seeds"] * 4 * report["seeds"],
                                  "source": Path(path).name}
    costs = {}
    for path in cost_files:
        report = json.loads(Path(path).read_text())
        s = report["settings"]
        rows = {r["case"]: r for r in report["rows"] if "error" not in r}
        costs[(s["resolution"], s["batch"])] = {"settings": s, "rows": rows}

    def ratio(setting, case, key, ref):
        table = costs.get(setting, {}).get("rows", {})
        if case in table and ref in table:
            return table[case][key] / table[ref][key]
        return None

    same_config = costed_as()
    out = []
    for case, label, options in designs():
        q = quality.get(label)
        costed = same_config[cost_key(options)]
        sd15 = next((c["rows"][costed] for c in costs.values() if costed in c["rows"]), None)
        out.append({
            "case": case, "label": label, "options": options,
            "params_sd15": sd15["trainable"] if sd15 else None,
            "concept_fidelity": q["concept_fidelity"] if q else None,
            "prompt_fidelity": q["prompt_fidelity"] if q else None,
            "preservation": q["preservation"] if q else None,
            "final_loss": [r["final_loss"] for r in q["runs"]] if q else None,
            "trainings": q["trainings"] if q else None, "samples": q["samples"] if q else None,
            "memory_vs_inference_256_b1": ratio((256, 1), costed, "peak_bytes", "inference"),
            "memory_vs_inference_512_b2": ratio((512, 2), costed, "peak_bytes", "inference"),
            "step_vs_lora_512_b2": ratio((512, 2), costed, "median_s", "lora"),
            "step_s_512_b2": costs.get((512, 2), {}).get("rows", {}).get(costed, {}).get("median_s"),
        })
    return {"quality": meta, "base": base and {k: base[k] for k in ("concept_fidelity", "prompt_fidelity", "preservation")},
            "cost_settings": {f"{r}px_b{b}": c["settings"] for (r, b), c in costs.items()}, "rows": out}


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    q = result["quality"]
    devices = sorted({s.get("cpu", s.get("device", "?")) for s in result["cost_settings"].values()})
    lines = [
        f"Quality: the demo model learns `sks` = {q.get('concept', '?')} in {q.get('steps', '?')} steps (each design's recipe, "
        f"min-SNR {q.get('snr_gamma', '?')}, batch {q.get('batch_size', '?')} + prior), as many trainings and samples per training "
        "as the row says (`bench.quality`, 4 prompts x sampling seeds); concept fidelity with its 95% Wilson interval (and per "
        "training). "
        f"Cost: the SD v1.5 U-Net architecture with random weights, fp32, on {', '.join(devices) or '?'} (`bench.train_cost`): "
        "peak memory over an inference-only forward at 256 px batch 1 and 512 px batch 2, step time over LoRA's at 512 px batch 2. "
        f"Targets for the default: concept >= {TARGETS['concept']}, prompt >= {TARGETS['prompt']}, preservation >= "
        f"{TARGETS['preservation']}, memory <= {TARGETS['memory']}x, step <= {TARGETS['time']}x LoRA.",
        "",
        "| design | params (SD v1.5) | trainings x samples each | concept fidelity | prompt fidelity | preservation "
        "| memory / inference, 256 px b1 | memory / inference, 512 px b2 | step / LoRA, 512 px b2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if result.get("base"):
        b = result["base"]
        lines.append(f"| SD (base) | - | - | {b['concept_fidelity']['rate']:.2f} | {b['prompt_fidelity']:.2f} | {b['preservation']:.2f} | - | - | - |")
    for r in result["rows"]:
        c = r["concept_fidelity"]
        concept = f"{c['rate']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if c else "-"
        if c and len(c.get("per_seed") or []) > 1:
            concept += " (" + "/".join(f"{x:.2f}" for x in c["per_seed"]) + ")"
        params = f"{r['params_sd15'] / 1e6:.2f}M" if r["params_sd15"] else "-"
        label = f"**{r['label']}** (the default)" if r["case"] == BYPASS_DEFAULT[0] else r["label"]
        evidence = f"{r['trainings']} x {r['samples'] // r['trainings']}" if r.get("trainings") else "-"
        lines.append(f"| {label} | {params} | {evidence} | {concept} | {_f(r['prompt_fidelity'])} | {_f(r['preservation'])} | "
                     f"{_f(r['memory_vs_inference_256_b1'])} | {_f(r['memory_vs_inference_512_b2'])} | {_f(r['step_vs_lora_512_b2'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.bypass_ablation", description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="measure everything, then join")
    p.add_argument("--quick", action="store_true", help="with --run: tiny budgets; checks the path, claims nothing")
    p.add_argument("--device", default="auto", help="with --run: cpu, cuda or auto (default)")
    p.add_argument("--jobs", type=int, default=10, help="with --run: processes at once in the second phase (default 10)")
    p.add_argument("--deadline", type=float, default=3600, help="with --run: seconds after which unfinished runs are stopped and "
                   "what finished is joined (default 3600)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bypass-ablation"), help="with --run: where the runs go")
    p.add_argument("--quality", nargs="+", type=Path, default=[], help="bench.quality JSON files")
    p.add_argument("--cost", nargs="+", type=Path, default=[], help="bench.train_cost JSON files (256 px b1, 512 px b2)")
    p.add_argument("--rename", action="append", default=[], metavar="FILE_LABEL=DESIGN_LABEL",
                   help="a quality file's row label and the design it measured (repeatable)")
    p.add_argument("--note", default="", help="a line for the results' header (e.g. how loaded the machine was)")
    p.add_argument("--name", default=None, help="results file name (default bypass_ablation, or bypass_ablation_quick)")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.started = time.time()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.run:
        if args.device == "auto":
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.quality, args.cost = run_all(args)
    missing = [str(f) for f in [*args.quality, *args.cost] if not f.is_file()]
    if missing or not (args.quality or args.cost):
        p.error(f"no such result file(s): {', '.join(missing)}" if missing else "nothing to join: give --run, or --quality/--cost files")
    rename = dict(item.split("=", 1) for item in args.rename)
    result = join(args.quality, args.cost, rename)
    name = args.name or ("bypass_ablation_quick" if args.quick else "bypass_ablation")
    result["note"] = args.note
    write_results(args.out_dir, name, result, markdown(result) + (f"\n{args.note}\n" if args.note else ""))
    for path in args.cost:
        # under a name of their own: bench.train_cost's files of the same setting hold every method
        s = json.loads(path.read_text())["settings"]
        stem = f"bypass_ablation_cost_{s['device']}_{s['resolution']}px_b{s['batch']}"
        (args.out_dir / f"{stem}.json").write_text(path.read_text())
        (args.out_dir / f"{stem}.md").write_text(path.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
