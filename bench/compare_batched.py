"""K tuners in ONE batched pipeline call against K sequential generations (issue 6, item 2).

    python -m bench.compare_batched            # K = 2, 4, 8 on the demo model, 3 timed repeats
    python -m bench.compare_batched --quick    # K = 2, 2 steps, 1 repeat: the path, no claims

On the bundled demo model, K tuners of the routable registry methods (cycled: Res-Tuning,
Bypass, Adapter, Prefix, Prompt; random-perturbed so each changes the picture) render the same
prompt and seed two ways through trainers.sampling.Sampler: one call with K batch slices, each
routed to its own tuner (restuning.route), and K calls of batch one. The ratio is sequential /
batched wall time (above 1: batching wins). It also checks the two ways give the same pixels.
Writes bench/results/compare_batched.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "assets" / "demo-model"


def make_tuners(pipe, k: int, folder: Path) -> list[tuple[str, Path]]:
    """K tuner files cycling over the registry's routable methods: [(method, path)]."""
    import restuning
    from restuning.methods import METHODS

    from diffusers import UNet2DConditionModel

    routable = []
    for name, method in METHODS.items():
        with torch.device("meta"):  # a weightless twin: probing must not touch the real U-Net
            twin = UNet2DConditionModel.from_config(pipe.unet.config)
        if restuning.attach(twin, method.config(), name="probe").routable:
            routable.append(name)
    out = []
    for i in range(k):
        name = routable[i % len(routable)]
        handle = restuning.attach(pipe.unet, METHODS[name].config(), name=f"b{i}")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out.append((name, restuning.save(pipe.unet, folder / f"{i}-{name}.safetensors", name=f"b{i}")))
        restuning.detach(pipe.unet, f"b{i}")
    return out


def timed_pairs(first, second, repeats: int):
    """Alternate the two ways (A B A B ...): under a varying load each pair sees about the same
    machine, so the per-pair ratio is fairer than ratios of separate medians."""
    times, results = ([], []), [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times, results


def other_load() -> str:
    """What else ran on the machine: the figures are only comparable with the same load."""
    try:
        procs = subprocess.run(["pgrep", "-af", "build_demo_model|trainers.dreambooth"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        procs = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return (f"load average {load:.2f}" if load is not None else "") + (
        f"; other heavy jobs running: {len(procs.splitlines())} process(es) ({procs.splitlines()[0][:80]}...)" if procs else "; no other heavy job")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO))
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="K=2, 2 steps, 1 repeat")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.steps, args.repeats = "2", 2, 1
    ks = [int(k) for k in args.ks.split(",")]

    from trainers.models import check_source, load_pipeline
    from trainers.sampling import Column, Sampler, Settings

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = load_pipeline(check_source(args.model))
    pipe.set_progress_bar_config(disable=True)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())  # before any tuner is attached
    settings = json.loads((Path(args.model) / "demo_settings.json").read_text()) if (Path(args.model) / "demo_settings.json").exists() else {}
    row = Settings("a sks star in red on a blue background", seed=0, steps=args.steps,
                   guidance=float(settings.get("guidance_scale", 5.0)), scheduler="Euler",
                   height=settings.get("height"), width=settings.get("width"))
    load_before = other_load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tuners = make_tuners(pipe, max(ks), Path(tmp))
        sampler = Sampler(pipe)
        for k in ks:
            columns = [Column(f"{i}-{m}", tuner=path) for i, (m, path) in enumerate(tuners[:k])]
            sampler.render(columns, [row])  # warm-up: loads the K tuners, first-call allocations
            (batched_t, seq_t), (batched, seq) = timed_pairs(lambda: sampler.render(columns, [row]),
                                                             lambda: [sampler.render([c], [row])[0][0] for c in columns],
                                                             args.repeats)
            diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                       for a, b in zip(batched[0], seq))
            b, s = statistics.median(batched_t), statistics.median(seq_t)
            rows.append({"k": k, "methods": [m for m, _ in tuners[:k]], "batched_s": batched_t, "sequential_s": seq_t,
                         "batched_median_s": round(b, 4), "sequential_median_s": round(s, 4), "ratio": round(s / b, 3),
                         "batched_min_s": round(min(batched_t), 4), "sequential_min_s": round(min(seq_t), 4),
                         "ratio_of_min": round(min(seq_t) / min(batched_t), 3),
                         "pair_ratio_median": round(statistics.median(q / p for p, q in zip(batched_t, seq_t)), 3),
                         "max_pixel_diff": diff})
            print(f"K={k}: batched {b:.3f} s, sequential {s:.3f} s, ratio {s / b:.2f}x, max pixel diff {diff}", flush=True)
    image = pipe.unet.config.sample_size * pipe.vae_scale_factor if row.height is None else row.height
    result = {"model": str(args.model), "unet_params": unet_params,
              "steps": args.steps, "scheduler": row.scheduler, "image_px": image, "repeats": args.repeats,
              "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "quick": args.quick, "load_before": load_before, "load_after": other_load(), "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_batched.json").write_text(json.dumps(result, indent=2))
    lines = [f"# K tuners: one batched call vs K sequential calls ({'quick: no claims' if args.quick else 'demo model'})", "",
             f"Model {Path(args.model).name} (U-Net {result['unet_params'] / 1e6:.2f}M params), {image}x{image} px, "
             f"{args.steps} {row.scheduler} steps, CFG on (batch doubles), CPU, {result['threads']} threads, "
             f"median (and best) of {args.repeats}, batched and sequential alternating, after a warm-up. Load: before: {load_before}; after: {result['load_after']}.", "",
             "| K | methods | batched (s) | sequential (s) | sequential / batched | best of runs: ratio | median pair ratio | max pixel diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {', '.join(r['methods'])} | {r['batched_median_s']:.3f} | {r['sequential_median_s']:.3f} "
                     f"| {r['ratio']:.2f}x | {r['ratio_of_min']:.2f}x | {r['pair_ratio_median']:.2f}x | {r['max_pixel_diff']} |")
    (out / "compare_batched.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
