"""A 3-method comparison on the local runner with one slot against the same comparison on a local
Ray cluster of two worker nodes (trainers.service.local_ray: a head and two `ray start` workers on
loopback addresses), and whether the tuners are the same.

    python -m bench.cluster_compare [--steps 200] [--threads 1] [--methods res-tuning,bypass,lora]

Both sides train the same configs (demo model, the star concept, 64 px, seed 0) through the same
job runner (trainers.service.jobs) and the same `accelerate launch` command with `--threads` CPU threads
per run, so the arithmetic is the same and so should be the weights: each method's saved files
are compared byte for byte (tensor data; the header as JSON) and tensor by tensor. The wall time of each side runs from the first
submission to the last run's end; the cluster's start-up is reported apart (a cluster is started
once and serves many comparisons). Writes bench/results/cluster_compare.{json,md}.

On one machine the two workers share its cores, so the cluster's gain here is what two runs at
once give over one at a time on those cores, with one thread each; on a real cluster each
worker is a machine of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def configs(args) -> list[tuple[str, dict]]:
    base = {"pretrained_model_name_or_path": str(ROOT / "assets" / "demo-model"), "instance_prompt": "a sks shape",
            "resolution": 64, "train_batch_size": 1, "max_train_steps": args.steps, "seed": 0,
            "checkpointing_steps": args.steps + 1, "learning_rate": 1e-3}
    return [(m, {**base, "method": m}) for m in args.methods.split(",")]


def images() -> list[tuple[Path, str]]:
    folder = ROOT / "assets" / "concepts" / "star"
    return [(p, p.name) for p in sorted(folder.iterdir()) if p.suffix == ".png"]


def run_all(runner, args) -> tuple[float, dict[str, Path], int]:
    """Submit the comparison, schedule until every run ended; (wall seconds, method -> run folder,
    the most runs seen training at once)."""
    started = time.monotonic()
    ids = {m: runner.submit(c, images(), label=m, group="bench") for m, c in configs(args)}
    most = 0
    while True:
        runner.tick()
        infos = {m: runner.info(i) for m, i in ids.items()}
        most = max(most, sum(1 for i in infos.values() if i.status == "running"))
        if all(i.status in ("done", "failed", "cancelled") and not i.alive for i in infos.values()):
            break
        time.sleep(0.25)
    wall = time.monotonic() - started
    failed = {m: i.error for m, i in infos.items() if i.status != "done"}
    if failed:
        raise SystemExit(f"runs did not finish: {failed}")
    return wall, {m: i.dir for m, i in infos.items()}, most


def weights(folder: Path) -> dict[str, Path]:
    """The run's saved weight files (its `artifact` events), by kind."""
    from trainers.events import read_events

    return {e["kind"]: folder / e["path"] for e in read_events(folder)
            if e.get("event") == "artifact" and str(e.get("path", "")).endswith(".safetensors")}


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed, canonical: see `canonical`) and its tensor data bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return canonical(json.loads(raw[8:8 + size])), raw[8 + size:]


def canonical(header: dict) -> dict:
    """The header with what the writing process orders by its own hash seed put in one order:
    safetensors writes the metadata map in hash order (a dict compares equal whatever the order),
    and peft's LoraConfig serialises `target_modules`, a Python set, in the process's string-hash
    order (diffusers' `lora_adapter_metadata`), so two local runs of one config differ there too."""
    meta = dict(header.get("__metadata__") or {})
    for key, value in meta.items():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict) and any(k.endswith("target_modules") for k in parsed):
            meta[key] = {k: sorted(v) if k.endswith("target_modules") and isinstance(v, list) else v for k, v in parsed.items()}
    return {**header, "__metadata__": meta}


def same(a: Path, b: Path) -> dict:
    """Whether two safetensors files hold the same: header (canonical), tensor bytes, tensors;
    and whether the files are equal byte for byte (they are not, by `canonical`'s orders alone)."""
    from safetensors.torch import load_file

    (ha, da), (hb, db) = split(a), split(b)
    ta, tb = load_file(str(a)), load_file(str(b))
    tensors = ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)
    return {"header": ha == hb, "data_bytes": da == db, "tensors": bool(tensors), "file_bytes": a.read_bytes() == b.read_bytes(),
            "size": a.stat().st_size}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run, on both sides")
    parser.add_argument("--methods", default="res-tuning,bypass,lora")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from trainers.service.cluster import RayLauncher
    from trainers.service.jobs import JobRunner, default_command
    from trainers.service.local_ray import LocalRayCluster

    work = Path(tempfile.mkdtemp(prefix="cluster-compare-"))
    load_before = os.getloadavg()
    try:
        local = JobRunner(work / "local", devices=["cpu"], per_device=1, poll_seconds=0.25,
                          command=lambda path, config, device: default_command(path, config, device, args.threads))
        print(f"local runner, one slot: {args.methods} ...", flush=True)
        local_wall, local_runs, local_most = run_all(local, args)
        print(f"  {local_wall:.1f} s", flush=True)
        t = time.monotonic()
        with LocalRayCluster(workers=2, cpus_per_worker=args.threads) as cluster:
            cluster_start = time.monotonic() - t
            runner = JobRunner(work / "cluster", poll_seconds=0.25,
                               launcher=RayLauncher(cluster.address, cpus_per_run=args.threads))
            print(f"local Ray cluster, 2 workers (started in {cluster_start:.0f} s): {args.methods} ...", flush=True)
            cluster_wall, cluster_runs, cluster_most = run_all(runner, args)
            print(f"  {cluster_wall:.1f} s", flush=True)
        files = {}
        for method in local_runs:
            ours, theirs = weights(local_runs[method]), weights(cluster_runs[method])
            if ours.keys() != theirs.keys() or not ours:
                raise SystemExit(f"{method}: the two sides saved different files: {sorted(ours)} / {sorted(theirs)}")
            files[method] = {kind: same(ours[kind], theirs[kind]) for kind in ours}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "methods": args.methods.split(","), "steps": args.steps, "threads_per_run": args.threads,
        "local_one_slot_s": round(local_wall, 1), "cluster_two_workers_s": round(cluster_wall, 1),
        "ratio_cluster_over_local": round(cluster_wall / local_wall, 3), "cluster_start_s": round(cluster_start, 1),
        "most_at_once": {"local": local_most, "cluster": cluster_most}, "files": files,
        "identical": all(f["header"] and f["data_bytes"] and f["tensors"] for kinds in files.values() for f in kinds.values()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_before": round(load_before[0], 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)},
    }
    rows = ["| side | wall (s) | runs at once |", "|---|---|---|",
            f"| local runner, one slot | {report['local_one_slot_s']} | {local_most} |",
            f"| local Ray cluster, 2 workers | {report['cluster_two_workers_s']} | {cluster_most} |"]
    same_rows = ["| method | file | header (JSON) equal | tensor bytes equal | tensors equal | whole file equal |",
                 "|---|---|---|---|---|---|"]
    for method, kinds in files.items():
        for kind, f in kinds.items():
            same_rows.append(f"| {method} | {kind} ({f['size']} B) | {f['header']} | {f['data_bytes']} | {f['tensors']} | {f['file_bytes']} |")
    text = "\n".join([
        "# Cluster comparison: `python -m bench.cluster_compare`", "",
        (f"{len(files)} methods ({args.methods}), {args.steps} steps each on the demo model, {args.threads} thread(s) per run, "
         f"on a {os.cpu_count()}-core machine (load average {report['machine']['load_avg_1m_before']} before, "
         f"{report['machine']['load_avg_1m_after']} after). Cluster start-up, not counted: {report['cluster_start_s']} s."), "",
        *rows, "", f"Cluster / local wall time: **{report['ratio_cluster_over_local']}**.", "",
        ("Saved weights, cluster run against local run of the same method and seed. The header is compared "
         "as JSON with set-like fields sorted: safetensors writes its metadata map, and peft its LoRA "
         "`target_modules` set, in each process's own hash order, so even two local runs' files differ "
         "in those orders alone (bench/cluster_compare.py, `canonical`)."), "", *same_rows, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "cluster_compare.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
