"""trainers/memory.py on a CUDA machine: the estimate against torch's measured peak for SD v1.5
settings outside its calibration, and a studio run capped on the card.

    python -m bench.memory_gpu [--out-dir DIR] [--skip-cap]

1. Each case builds the SD v1.5 U-Net (random weights), casts the frozen weights to the run's
   precision and keeps the method's in fp32 (as the trainer does), resets torch's peak, then runs
   3 training steps (forward under autocast, MSE loss, backward, fused AdamW; 8-bit AdamW where
   asked). The peak is torch.cuda.max_memory_allocated; the estimate is the U-Net's training step
   alone (trainers.memory.estimate_parts(..., unet_only=True)) less the 1 GiB the estimate keeps for
   the CUDA context, which torch does not count.
2. A JobRunner on cuda:0 with the real trainer (`accelerate launch`) runs the demo model with a
   cap of 8 MiB on the card: it must fail with the cap in its hint; a second run with its own cap
   (from its estimate) must finish.

Writes memory_gpu.json and memory_gpu.md to --out-dir (default bench/results). Not run yet: no
such results are in bench/results; the CPU side (the estimates) is what has been exercised.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import write_results

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# (method, resolution, batch, precision, gradient checkpointing, 8-bit Adam): none of these is in
# the calibration (512 px, batch 8, fp16 and its three variants)
CASES = [
    ("res-tuning", 512, 2, "bf16", False, False),
    ("lora", 256, 16, "fp16", False, False),
    ("bypass", 512, 8, "fp16", False, False),
    ("adapter", 768, 2, "fp16", False, False),
    ("prefix", 1024, 1, "fp16", False, False),
    ("res-tuning", 512, 8, "fp16", True, False),
    ("full", 512, 4, "bf16", True, False),
    ("lora", 512, 4, "fp32", False, False),
]


def measure(method: str, resolution: int, batch: int, precision: str, checkpointing: bool, adam8: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params

    import restuning
    from restuning.arch import build_unet
    from restuning.methods import METHODS

    device = torch.device("cuda")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet = build_unet("sd15", seed=0, device=device)
    unet.requires_grad_(False)
    restuning.attach(unet, METHODS[method].config())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = restuning.trainable_parameters(unet)
    unet.to(dtype)
    cast_training_params(unet, torch.float32)
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    side = resolution // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(batch, 4, side, side, generator=g).to(device, dtype)
    target = torch.randn(sample.shape, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    text = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        with torch.autocast("cuda", dtype=dtype, enabled=precision != "fp32"):
            out = unet(sample, timesteps, text).sample
        loss = F.mse_loss(out.float(), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    count = sum(p.numel() for p in trainable)
    del unet, optimizer, trainable, out, loss
    torch.cuda.empty_cache()
    return {"peak_bytes": int(peak), "trainable": count}


def estimate_row(method, resolution, batch, precision, checkpointing, adam8) -> float:
    from trainers import memory
    from trainers.models import CONFIGS

    facts = memory.model_facts(str(CONFIGS["sd1"]))
    trainable, kind, rendered = memory.trainable_weights(str(CONFIGS["sd1"]), method, "{}")
    est = memory.estimate_parts(facts, trainable, kind, device="cuda", resolution=resolution, batch=batch,
                                precision=precision.replace("fp32", "no"), checkpointing=checkpointing, adam8=adam8,
                                unet_only=True, rendered=rendered)
    return (est.total - est.parts["overhead"]) / GIB


def cap_check() -> dict:
    """The studio's cap on the card, end to end through accelerate and the real trainer."""
    from trainers.service.jobs import JobRunner

    concept = ROOT / "assets" / "concepts" / "heart"
    images = [(p, p.name) for p in sorted(concept.glob("*.png"))]
    config = {"method": "res-tuning", "pretrained_model_name_or_path": str(ROOT / "assets" / "demo-model"),
              "instance_prompt": "a sks shape", "validation_prompt": ["a sks shape"], "resolution": 64, "train_batch_size": 4,
              "mixed_precision": "fp16", "max_train_steps": 5, "validation_steps": 5, "num_validation_images": 1}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cap in (("capped", 8 * 2**20), ("own cap", None)):
            runner = JobRunner(Path(tmp) / name, devices=["cuda:0"], poll_seconds=0.2, run_memory_cap=cap)
            run_id = runner.submit(config, images)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                runner.tick()
                info = runner.info(run_id)
                if info.status in ("done", "failed", "cancelled") and not info.alive:
                    break
                time.sleep(0.5)
            record = json.loads((info.dir / "process.json").read_text())
            out[name] = {"status": info.status, "error": info.error[:300], "hint": info.hint[:400],
                         "memory_cap": record.get("memory_cap"),
                         "estimate": json.loads((info.dir / "job.json").read_text()).get("memory_estimate"),
                         "log_tail": (info.dir / "train.log").read_text()[-1500:]}
            print(name, json.dumps({k: v for k, v in out[name].items() if k != "log_tail"}, indent=1), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--skip-cap", action="store_true")
    args = p.parse_args(argv)
    import torch

    started = time.time()
    rows = []
    for case in CASES:
        method, resolution, batch, precision, checkpointing, adam8 = case
        try:
            measured = measure(*case)
        except Exception as exc:  # noqa: BLE001 - one case's failure is a row, the others go on
            rows.append({"case": list(case), "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(case, "failed", exc, flush=True)
            continue
        est = estimate_row(*case)
        row = {"method": method, "resolution": resolution, "batch": batch, "precision": precision,
               "gradient_checkpointing": checkpointing, "adam8": adam8, "trainable": measured["trainable"],
               "measured_gib": round(measured["peak_bytes"] / GIB, 3), "estimate_gib": round(est, 3)}
        row["ratio"] = round(row["estimate_gib"] / row["measured_gib"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.skip_cap:
        result["cap"] = cap_check()
    result["wall_s"] = round(time.time() - started, 1)
    lines = [f"### Memory estimate against measured peaks on {result['gpu']} (outside the calibration)", "",
             "| method | px | batch | precision | checkpointing | measured (GiB) | estimate (GiB) | estimate / measured |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['resolution']} | {r['batch']} | {r['precision']} | {r['gradient_checkpointing']} "
                         f"| {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | {r['ratio']:.2f} |")
    write_results(args.out_dir, "memory_gpu", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
