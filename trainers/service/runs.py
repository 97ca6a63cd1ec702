"""The studio's runs from the command line: the same job runner (trainers.service.jobs) and run folders,
on this machine or on a Ray cluster (trainers.service.cluster, docs/cluster.md).

    # "Train for comparison": one run per method, same images and options; waits and reports
    python -m trainers.service.runs compare --images assets/concepts/star --methods res-tuning,bypass,lora \\
        --config base.json [--set max_train_steps=300] [--runs-dir runs] [--cluster http://HEAD:8265]
    python -m trainers.service.runs list [--runs-dir runs] [--cluster ...]
    python -m trainers.service.runs cancel RUN | resume RUN [--wait] [--runs-dir runs] [--cluster ...]

`--config` is a JSON object of trainer options as a run's config.json holds them (docs/trainer.md);
`--set NAME=VALUE` adds or replaces one (VALUE is JSON, or else a string). Every method's config is
checked by the trainer's own checks before any run folder exists. The runs are queued as the
studio queues them (a comparison group) and show in a studio serving the same runs folder.
`compare`, and `resume --wait`, keep scheduling until the runs end: on a cluster they fan out as
far as its nodes have room. Stopped with Ctrl-C, the runs started go on and the others stay queued
for a studio on that folder to start.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

from ..options import OptionError, from_dict, read_config
from .jobs import JobError, JobRunner
from .uploads import UploadError, check_images

FINAL = ("done", "failed", "cancelled")


def make_runner(args) -> JobRunner:
    address = args.cluster or os.environ.get("RAY_ADDRESS")
    if not address:
        return JobRunner(args.runs_dir, poll_seconds=0.5)
    from .cluster import RayLauncher

    return JobRunner(args.runs_dir, launcher=RayLauncher(address, cpus_per_run=args.cluster_cpus), poll_seconds=0.5)


def base_config(args) -> dict:
    config = read_config(Path(args.config)) if args.config else {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OptionError(f"--set {item!r}: give NAME=VALUE")
        try:
            config[name] = json.loads(value)
        except json.JSONDecodeError:
            config[name] = value
    return config


def images_of(folder: str) -> list[tuple[Path, str]]:
    """The folder's files, checked by content as the studio checks uploads (trainers.service.uploads)."""
    path = Path(folder)
    if not path.is_dir():
        raise OptionError(f"--images {folder}: not a folder")
    return check_images(sorted(p for p in path.iterdir() if p.is_file()))


def compare(args, runner: JobRunner) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise OptionError("--methods: name at least one method")
    base = base_config(args)
    configs = []
    for method in methods:
        config = {**base, "method": method}
        from_dict({**config, "instance_data_dir": "instance", "output_dir": "run"})  # the trainer's own checks
        configs.append((method, config))
    images = images_of(args.images)
    for _, config in configs:
        runner.check_memory(config)
    group = secrets.token_hex(3) if len(configs) > 1 else ""
    ids = [runner.submit(config, images, label=label, group=group) for label, config in configs]
    for run_id in ids:
        print(f"{run_id}: queued", flush=True)
    return ids


def follow(runner: JobRunner, ids: list[str]) -> bool:
    """Schedule and report each status change until every run ended; True when all are done."""
    shown: dict[str, str] = {}
    while True:
        runner.tick()
        infos = [runner.info(run_id) for run_id in ids]
        for info in infos:
            step = next((e for e in reversed(info.events) if e.get("event") == "step"), None)
            now = info.status + (f" (step {step['step']}/{step['total']})" if info.status == "running" and step else "")
            if info.status != shown.get(info.id, "").split(" (")[0] or (now != shown[info.id] and _tenth(info, step)):
                shown[info.id] = now
                print(f"{info.id}: {now}" + (f": {info.error}" if info.status == "failed" else ""), flush=True)
        if all(info.status in FINAL and not info.alive for info in infos):
            return all(info.status == "done" for info in infos)
        time.sleep(runner.poll_seconds)


def _tenth(info, step) -> bool:
    """Report progress at every tenth of the run, not every step."""
    return bool(step) and step["step"] % max(1, int(step["total"]) // 10) == 0


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-dir", default=os.environ.get("RESTUNING_RUNS_DIR", "runs"))
    common.add_argument("--cluster", help="a Ray cluster's address (http://HEAD:8265, ray://HEAD:10001; env RAY_ADDRESS)")
    common.add_argument("--cluster-cpus", type=int, help="CPUs (threads) each run asks the cluster for")
    parser = argparse.ArgumentParser(prog="python -m trainers.service.runs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", parents=[common], help="one run per method, same images and options")
    c.add_argument("--images", required=True, help="a folder of the concept's images")
    c.add_argument("--methods", default="res-tuning,bypass,lora")
    c.add_argument("--config", help="a JSON file of trainer options (as a run's config.json)")
    c.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="one trainer option (VALUE: JSON)")
    c.add_argument("--no-wait", action="store_true", help="queue and return (a studio on the runs folder starts them)")
    sub.add_parser("list", parents=[common], help="every run with its status")
    for name in ("cancel", "resume"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("run")
        p.add_argument("--wait", action="store_true", help="then follow the run until it ends")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runner = make_runner(args)
        if args.command == "compare":
            ids = compare(args, runner)
            return 0 if args.no_wait or follow(runner, ids) else 1
        if args.command == "list":
            for info in runner.list_runs():
                print(f"{info.id}\t{info.method}\t{info.status}\t{info.device}\t{info.prompt}")
            return 0
        message = runner.cancel(args.run) if args.command == "cancel" else runner.resume(args.run)
        print(f"{args.run}: {message}", flush=True)
        return 0 if not args.wait or follow(runner, [args.run]) else 1
    except (JobError, OptionError, UploadError, OSError, RuntimeError) as exc:
        print(f"trainers.service.runs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped following; started runs go on, queued ones wait for a studio on this runs folder", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
