"""Res-Tuning Studio: `python app.py` serves http://127.0.0.1:7860 on the bundled demo model.

    python app.py [--model HUB_ID|FOLDER|FILE.safetensors] [--models-dir DIR] [--runs-dir DIR] [--host H] [--port P]
                  [--jobs-per-device N] [--shared | --no-shared] [--runs-per-visitor N] [--proxy-hops N]
                  [--cluster http://HEAD:8265 | ray://HEAD:10001] [--cluster-cpus N] [--cluster-gpu-memory GIB]

Defaults come from webui/space.py: on a local machine 127.0.0.1:7860 and ./runs, one user; on a
Hugging Face Space (SPACE_ID set) 0.0.0.0 at $PORT (or 7860), runs on the persistent storage
mount /data when one is attached, and many visitors, each seeing only their own runs.
RESTUNING_RUNS_DIR / RESTUNING_HOST / RESTUNING_PORT override them; a shared studio's caps come
from RESTUNING_* variables too (trainers/service/limits.py, docs/space.md). Only wiring lives here: the
UI is webui/, the job runner trainers/service/jobs.py, training trainers/dreambooth.py. With --cluster
(or RAY_ADDRESS) each run is a Ray job on that cluster instead of a process here
(trainers/service/cluster.py, docs/cluster.md).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Compare and Generate sample in this process: the same OpenMP spin limit the trainer's processes
# get (trainers.service.jobs.LocalLauncher), read by libgomp once, when torch first loads it, so before any
# import below. On a busy CPU a 20-step render took 43-76 s with libgomp's default, 18-19 s with it.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def parse_args(argv=None, env=None) -> argparse.Namespace:
    from trainers.service import limits
    from webui.catalog import MODELS_DIR_ENV
    from webui.files import PROXY_HOPS_ENV
    from webui.space import detect

    try:
        here = env or detect()
    except ValueError as exc:
        sys.exit(f"app.py: {exc}")
    p = argparse.ArgumentParser(description="Res-Tuning Studio: train concept tuners for Stable Diffusion in the browser.")
    p.add_argument("--model", default=os.environ.get("RESTUNING_MODEL") or None,
                   help="the base model the Train form starts on: a hub id, a diffusers folder or a .safetensors "
                        "file, of SD 1.x, 2.x or XL (env RESTUNING_MODEL; default: assets/demo-model)")
    p.add_argument("--models-dir", default=None,
                   help="more base models to pick in the Train form: the diffusers folders and .safetensors files "
                        f"of SD 1.x, 2.x or XL directly in this folder (env {MODELS_DIR_ENV}; default: models/ beside "
                        "app.py); hub models already in the local Hugging Face cache are offered too, never downloaded")
    p.add_argument("--runs-dir", default=str(here.runs_dir),
                   help="where runs live (env RESTUNING_RUNS_DIR; default ./runs, on a Space /data/restuning-runs if /data is writable)")
    p.add_argument("--host", default=here.host, help="address to serve on (127.0.0.1; 0.0.0.0 on a Space)")
    p.add_argument("--port", type=int, default=here.port, help="port (RESTUNING_PORT, PORT, GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--jobs-per-device", type=int, default=1, help="runs training at once on each device")
    p.add_argument("--shared", action=argparse.BooleanOptionalAction, default=here.shared,
                   help="many visitors: each sees and controls only their own runs (default: on when SPACE_ID is set)")
    p.add_argument("--runs-per-visitor", type=int, default=None,
                   help="with --shared: runs one visitor may have queued or running at once "
                        "(env RESTUNING_RUNS_PER_VISITOR; default 2)")
    p.add_argument("--proxy-hops", type=int, default=None,
                   help="trusted proxies in front of the studio, whose X-Forwarded-For names a client for the upload "
                        f"quota (env {PROXY_HOPS_ENV}; default 1 on a Space, else 0)")
    p.add_argument("--cluster", default=os.environ.get("RAY_ADDRESS") or None,
                   help="run each training as a Ray job on this cluster (its dashboard http://HEAD:8265, or "
                        "ray://HEAD:10001; env RAY_ADDRESS); the runs folder must be at the same path on every node "
                        "(docs/cluster.md). Default: runs train on this machine")
    p.add_argument("--cluster-cpus", type=int, default=None,
                   help="with --cluster: CPUs (threads) each run asks for (default: 1 beside a GPU, else a whole node's)")
    p.add_argument("--cluster-gpu-memory", type=float, default=None,
                   help="with --cluster: GiB of one of the cluster's GPUs, for the memory check before a run is queued")
    args = p.parse_args(argv)
    args.sample_device, args.where = here.device, here
    try:
        args.limits = limits.from_env(args.shared, runs_per_owner=args.runs_per_visitor if args.shared else None)
        hops = os.environ.get(PROXY_HOPS_ENV, "").strip()
        args.proxy_hops = args.proxy_hops if args.proxy_hops is not None else int(hops) if hops else int(bool(here.space_id))
    except ValueError as exc:
        sys.exit(f"app.py: {exc}")
    return args


def cluster_preset(launcher) -> tuple[str, str]:
    """The hardware preset for a cluster's runs: its nodes' device, not this machine's; a GPU of
    unknown size gets the 8 GB preset, which fits every card."""
    where = launcher.describe()
    if launcher.devices[0] == "cpu":
        return "CPU demo", f"{where}: CPU nodes"
    gib = (launcher.gpu_memory or 0) / 2**30
    if not gib:
        return "8 GB GPU", f"{where}: GPUs of a size not given (--cluster-gpu-memory)"
    return ("8 GB GPU" if gib < 12 else "16 GB GPU" if gib < 20 else "24 GB+ GPU"), f"{where}: {gib:.0f} GiB GPUs"


def main(argv=None) -> None:
    args = parse_args(argv)
    import webui
    from trainers.service.jobs import JobRunner, detect_devices
    from webui.catalog import discover, models_dir
    from webui.model import describe
    from webui.presets import detect_preset

    try:
        base = describe(args.model)
    except ValueError as exc:
        sys.exit(f"app.py: {exc}")
    models = discover(base, models_dir(args.models_dir))
    preset, detected = detect_preset()
    launcher = None
    if args.cluster:
        from trainers.service.cluster import ClusterError, RayLauncher

        try:
            launcher = RayLauncher(args.cluster, cpus_per_run=args.cluster_cpus,
                                   gpu_memory=int(args.cluster_gpu_memory * 2**30) if args.cluster_gpu_memory else None)
        except ClusterError as exc:
            sys.exit(f"app.py: {exc}")
    runner = JobRunner(args.runs_dir, devices=detect_devices(), per_device=args.jobs_per_device, launcher=launcher,
                       limits=args.limits,
                       unguessable_ids=args.shared).start()
    devices = runner.devices
    if launcher is not None:
        preset, detected = cluster_preset(launcher)
    demo = webui.build(runner, base, device=devices[0].split(":")[0], preset=preset, detected=detected,
                       shared=args.shared, sample_device=args.sample_device,
                       persistent=args.where.persistent, models=models)
    print(f"Res-Tuning Studio: base model {base.label} ({len(models.entries)} to pick from), runs in {runner.runs_dir}, "
          f"runs on {runner.launcher.describe()}; "
          f"{args.where.summary().split(';')[0]}" + ("; shared: each visitor sees their own runs" if args.shared else ""))
    if args.where.space_id and not args.where.persistent:
        print("Res-Tuning Studio: no persistent storage at /data: runs vanish when the Space restarts (docs/space.md)")
    demo.launch(**webui.launch_options(runner, args.host, args.port, shared=args.shared, proxy_hops=args.proxy_hops))


if __name__ == "__main__":
    main()
