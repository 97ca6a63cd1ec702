"""Training cost of every method on the Stable Diffusion v1.5 U-Net architecture (or SD 2.1's, or
SDXL's: --arch): trainable parameters, peak memory and training-step time, beside the paper's Table 6.

    python -m bench.train_cost                     # 256 px, batch 1, fp32, 5 steps, every method
    python -m bench.train_cost --resolution 512 --batch-size 2 --methods inference,lora,bypass
    python -m bench.train_cost --paper-setting     # CUDA only: 512 px, batch 8, fp16 (Table 6)
    python -m bench.train_cost --arch sdxl         # SDXL's U-Net (2.57B parameters: ~10 GB of fp32 weights)
    python -m bench.train_cost --quick             # tiny U-Net (of --arch's family), 2 steps: checks the path, no figures

Every method of the registry (restuning.methods.METHODS) at its default config, plus
"inference" (a forward pass under no_grad: the floor any training method pays), each in a fresh
process so that one case's allocations cannot colour the next one's peak. The U-Net is built
from its config with random weights: a step costs the same whatever the weights' values.

A step is forward, MSE loss, backward and an AdamW step (fused where the build has it: on a CPU
the default AdamW takes 5-20 s per step on a full U-Net, fused about 1 s). The time reported is
the median of steps 2..N; step 1 pays one-off allocations. Peak memory is the child process's
peak resident set (getrusage) on CPU, torch.cuda.max_memory_allocated on CUDA; both include the
weights. Under fp16/bf16 the frozen weights are cast to that dtype and the trainable ones kept
in fp32 under autocast, as diffusers' training scripts do. An SDXL U-Net also gets its pooled text
embedding and size/crop ids (restuning.arch.added_cond_kwargs), as its training step does.

Writes bench/results/train_cost_<arch>_<device>_<res>px_b<batch>_<precision>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import BYPASS_ABLATION, bypass_config_options, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INFERENCE = "inference"
ABLATION = {case: (label, options) for case, label, options in BYPASS_ABLATION}
GIB = 1024**3

# Table 6 of the paper (SD v1.5 on COCO, 8xA100, 512 px, batch 8): training memory (GB) and
# time (h/epoch), keyed by registry name. Only their ratios are comparable with ours.
PAPER_TABLE6 = {
    "full": (72.77, 1.98),
    "lora": (61.03, 1.42),
    "adapter": (54.30, 1.30),
    "prefix": (64.91, 2.20),
    "prompt": (63.70, 2.17),
    "res-tuning": (54.49, 1.38),
    "bypass": (21.35, 0.82),
}

# The targets: (what, case, measure, reference case, at most this ratio).
TARGETS = [
    ("Bypass peak memory <= 1.10 x inference-only", "bypass", "peak_bytes", INFERENCE, 1.10),
    ("Bypass step time <= 0.25 x full fine-tuning", "bypass", "median_s", "full", 0.25),
    ("Bypass step time <= 0.6 x LoRA", "bypass", "median_s", "lora", 0.6),
    ("Res-Tuning peak memory <= LoRA's", "res-tuning", "peak_bytes", "lora", 1.0),
]

PRECISIONS = ("fp32", "fp16", "bf16")
# --arch: the published U-Nets (restuning.arch), their own resolution, and their tiny counterparts (--quick)
NATIVE = {"sd15": 512, "sd2": 768, "sdxl": 1024}
TINY = {"sd15": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}


# -- the child: one case, one process -----------------------------------------------------------


def peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_optimizer(params):
    """AdamW, fused where this build and device have it; returns (optimiser, fused?)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True), True
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4), False


def measure(case: str, arch: str, resolution: int, batch: int, precision: str, steps: int, device: str,
            gradient_checkpointing: bool = False, optimizer: str = "adamw", attention: str = "sdpa") -> dict:
    """One case. The last three are bench.gpu_check's variants: activation recomputation,
    bitsandbytes' 8-bit AdamW ("adamw8bit"), and xformers attention (set before the method is
    attached, as the trainer does, so prefix/prompt processors stay in place)."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params

    import restuning
    from restuning.arch import added_cond_kwargs, build_unet
    from restuning.methods import METHODS
    from restuning.methods.bypass import off_concept

    device = torch.device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet = build_unet(arch, seed=0, device=device)
    unet_params = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    config = None
    if case in ABLATION:
        config = METHODS["bypass"].config(**bypass_config_options(ABLATION[case][1]))
    elif case != INFERENCE:
        config = METHODS[case].config()
    if config is not None:
        restuning.attach(unet, config)
    if gradient_checkpointing or (case in ABLATION and ABLATION[case][1].get("gradient_checkpointing")):
        gradient_checkpointing = True
        unet.enable_gradient_checkpointing()
    trainable = restuning.trainable_parameters(unet)
    if dtype != torch.float32:
        unet.to(dtype)
        cast_training_params(unet, torch.float32)
    unet.train(case != INFERENCE)
    fused = None
    if not trainable:
        optimizer = None
    elif optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    else:
        optimizer, fused = make_optimizer(trainable)
    # fp16 gradients underflow without loss scaling; accelerate uses the same scaler in training.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and optimizer is not None else None

    g = torch.Generator(device="cpu").manual_seed(0)
    side = resolution // 8  # the VAE's downsampling factor
    sample = torch.randn(batch, unet.config.in_channels, side, side, generator=g).to(device)
    target = torch.randn(sample.shape, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(device)
    added = added_cond_kwargs(unet.config, batch, size=resolution, generator=g, device=device)
    extra = {"added_cond_kwargs": added} if added else {}
    weight = getattr(config, "off_concept_loss", 0)
    off_text = torch.randn(text.shape, generator=g).to(device) if weight and case != INFERENCE else None
    setup_peak = peak_memory(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, losses = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if optimizer is None:
                with torch.no_grad():
                    unet(sample, timesteps, text, **extra)
            else:
                with off_concept(off_text, off_text) if off_text is not None else contextlib.nullcontext([]) as energies:
                    loss = F.mse_loss(unet(sample, timesteps, text, **extra).sample.float(), target)
                if energies:
                    loss = loss + weight * torch.stack(energies).mean()
        if optimizer is not None:
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        sync()
        times.append(time.perf_counter() - start)
    losses = [float(v) for v in losses]  # read after the timed loop: .item() per step would sync
    return {
        "case": case,
        "config": config.to_dict() if config is not None else None,
        "trainable": sum(p.numel() for p in trainable),
        "unet_params": unet_params,
        "peak_bytes": peak_memory(device),
        "setup_peak_bytes": setup_peak,
        "step_s": times,
        "median_s": statistics.median(times[1:] if len(times) > 1 else times),
        "losses": losses,
        "finite_loss": all(math.isfinite(v) for v in losses),
        "fused_adamw": fused,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer.__class__.__name__ if optimizer is not None else None,
        "attention": attention,
        "threads": torch.get_num_threads(),
    }


# -- the parent: one fresh process per case ------------------------------------------------------


def run_case(case: str, settings: dict, timeout: float, **variant) -> dict:
    """`variant`: measure()'s gradient_checkpointing / optimizer / attention, where not the defaults."""
    spec = {"case": case, **{k: settings[k] for k in ("arch", "resolution", "batch", "precision", "steps", "device")}, **variant}
    load = os.getloadavg()[0]
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.train_cost", "--child", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s", "wall_s": time.time() - started, "load_before": load}
    wall = time.time() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        else:
            reason = (proc.stderr.strip().splitlines() or ["no result"])[-1]
        return {"case": case, "error": reason, "wall_s": wall, "load_before": load}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall, "load_before": load}


def ratio(rows: dict, case: str, key: str, ref: str) -> float | None:
    a, b = rows.get(case), rows.get(ref)
    if not a or not b or "error" in a or "error" in b:
        return None
    return a[key] / b[key]


def paper_ratio(case: str, ref: str, index: int) -> float | None:
    if case not in PAPER_TABLE6 or ref not in PAPER_TABLE6:
        return None
    return PAPER_TABLE6[case][index] / PAPER_TABLE6[ref][index]


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    from restuning.methods import METHODS

    s = result["settings"]
    rows = {r["case"]: r for r in result["rows"]}
    ref = result["reference"]
    label = {INFERENCE: "Inference only (no_grad)", **{n: m.label for n, m in METHODS.items()}, **{c: v[0] for c, v in ABLATION.items()}}
    ref_label = label.get(ref, ref)
    own_inference = ref == INFERENCE  # its "memory / inference" column is already there
    lines = [
        f"### Training cost: `{s['arch']}` U-Net, random weights, {s['device']}, {s['resolution']} px, "
        f"batch {s['batch']}, {s['precision']}",
        "",
        f"Median of training steps 2..{s['steps']} (forward, backward, AdamW step), each case in a fresh process; "
        f"{s['cpu']}, torch {s['torch']}, {result['rows'][0].get('threads', '?')} threads; run took {result['wall_s'] / 60:.1f} min "
        f"on {result['date']}. Ratios are against {ref_label}; the paper's are from its Table 6 (8xA100, 512 px, batch 8, fp16).",
    ]
    if s.get("note"):
        lines += ["", f"Note: {s['note']}"]
    lines += [
        "",
        f"| method | trainable | peak memory (GiB) | memory / inference{'' if own_inference else f' | memory / {ref}'} "
        f"| paper memory / {ref} | step (s) | time / {ref} | paper time / {ref} |",
        "|---|" + "---:|" * (7 if own_inference else 8),
    ]
    for case, r in rows.items():
        if "error" in r:
            lines.append(f"| {label.get(case, case)} | failed: {r['error']} |" + " |" * (6 if own_inference else 7))
            continue
        pct = 100 * r["trainable"] / r["unet_params"]
        lines.append(
            f"| {label.get(case, case)} | {r['trainable'] / 1e6:.2f}M ({pct:.2f}%) | {r['peak_bytes'] / GIB:.2f} "
            f"| {fmt(ratio(rows, case, 'peak_bytes', INFERENCE))}"
            + ("" if own_inference else f" | {fmt(ratio(rows, case, 'peak_bytes', ref))}")
            + " "
            f"| {fmt(paper_ratio(case, ref, 0))} | {r['median_s']:.2f} | {fmt(ratio(rows, case, 'median_s', ref))} "
            f"| {fmt(paper_ratio(case, ref, 1))} |"
        )
    checks = target_checks(rows) if s["arch"] == "sd15" else []  # the targets speak of SD v1.5
    if checks:
        lines += ["", "Targets (issue 3):", ""]
        lines += [f"- {what}: {value:.2f} x, {'met' if ok else 'MISSED'}" for what, value, ok in checks]
    return "\n".join(lines) + "\n"


def target_checks(rows: dict) -> list[tuple[str, float, bool]]:
    checks = []
    for what, case, key, ref, limit in TARGETS:
        value = ratio(rows, case, key, ref)
        if value is not None:
            checks.append((what, value, value <= limit))
    return checks


def parse(argv=None):
    from restuning.methods import METHODS

    cases = [INFERENCE, *METHODS, *ABLATION]
    p = argparse.ArgumentParser(prog="python -m bench.train_cost", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (the latent is 1/8 of it); default 256")
    p.add_argument("--batch-size", type=int, default=1, help="default 1")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default fp32")
    p.add_argument("--steps", type=int, default=5, help="training steps per case; the median of steps 2..N is reported (default 5)")
    p.add_argument("--methods", default=",".join([INFERENCE, *METHODS]),
                   help=f"comma-separated cases (default every method: {','.join([INFERENCE, *METHODS])}; also {','.join(ABLATION)})")
    p.add_argument("--reference", help="case the ratios are taken against (default: full if run, else lora)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--arch", choices=tuple(NATIVE), default="sd15",
                   help="the U-Net: sd15 (default), sd2 (SD 2.1), sdxl (SDXL base 1.0), built from its config with random weights")
    p.add_argument("--paper-setting", action="store_true",
                   help="the paper's setting on CUDA: batch 8, fp16, at the U-Net's own resolution (512 px for sd15, 768 for sd2, 1024 for sdxl)")
    p.add_argument("--quick", action="store_true", help="the tiny U-Net of --arch's family, 64 px, 2 steps: exercises the path in seconds")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and Markdown go (default bench/results)")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. other load on the machine)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds allowed per case (default 1200)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.cases = [c.strip() for c in args.methods.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in cases]
    if unknown or not args.cases:
        p.error(f"unknown case(s) {unknown or 'none given'}; choose from {', '.join(cases)}")
    if args.resolution % 8 or args.resolution <= 0 or args.batch_size <= 0 or args.steps <= 0:
        p.error("--resolution must be a positive multiple of 8, --batch-size and --steps positive")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    if args.paper_setting:
        if args.device != "cuda":
            p.error("--paper-setting needs a CUDA GPU (512 px, batch 8, fp16 does not fit a 24 GiB CPU machine)")
        args.resolution, args.batch_size, args.precision = NATIVE[args.arch], 8, "fp16"
    if args.quick:
        args.arch, args.resolution, args.steps = TINY[args.arch], 64, 2
    if args.reference is None:
        args.reference = "full" if "full" in args.cases else "lora"
    if args.reference not in args.cases:
        p.error(f"--reference {args.reference} is not among the cases run")
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(measure(**spec)), flush=True)
        return None
    import torch

    settings = {"arch": args.arch, "resolution": args.resolution, "batch": args.batch_size, "precision": args.precision,
                "steps": args.steps, "device": args.device, "torch": torch.__version__, "note": args.note,
                "cpu": f"{os.cpu_count()} CPU cores" if args.device == "cpu" else torch.cuda.get_device_name()}
    started = time.time()
    rows = []
    for case in args.cases:
        print(f"[{time.strftime('%H:%M:%S')}] {case} ...", flush=True)
        row = run_case(case, settings, args.timeout)
        rows.append(row)
        if "error" in row:
            print(f"    failed: {row['error']}", flush=True)
        else:
            print(f"    {row['trainable']:,} trainable, peak {row['peak_bytes'] / GIB:.2f} GiB, median step {row['median_s']:.2f} s "
                  f"(steps {', '.join(f'{t:.2f}' for t in row['step_s'])})", flush=True)
    result = {"settings": settings, "reference": args.reference, "rows": rows, "wall_s": time.time() - started,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = f"train_cost_{args.arch}_{args.device}_{args.resolution}px_b{args.batch_size}_{args.precision}"
    write_results(args.out_dir, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
