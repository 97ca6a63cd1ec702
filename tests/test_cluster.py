"""The job runner on a real Ray cluster (trainers.service.cluster.RayLauncher): a head and two worker
nodes started on loopback addresses by trainers.service.local_ray (CPU only, small object stores), one
cluster for the module. Runs fan out, cancel keeps the checkpoint, a studio started anew adopts
running jobs, a killed worker leaves a failed run with its log that resume completes elsewhere,
a run Ray cannot place in time waits in the queue again, and the CLI submits a comparison.
Most runs use the fake trainer (tests/fake_trainer.py); the CLI's runs train the demo model."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from tests.test_jobs import FAKE, wait_for, wait_step
from trainers.service.cluster import ClusterError, RayLauncher
from trainers.events import read_events
from trainers.service.jobs import PROCESS_FILE, JobError, JobRunner
from trainers.service.local_ray import LocalRayCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# a run Ray cannot place within this many seconds goes back to the studio's queue
START_TIMEOUT_S = 25


def fake_command(config_path, config, device, threads=None):
    return [sys.executable, str(FAKE), "--config", str(config_path)]


@pytest.fixture(scope="module")
def cluster():
    with LocalRayCluster(workers=2, cpus_per_worker=1, env={"RAY_JOB_START_TIMEOUT_SECONDS": str(START_TIMEOUT_S)}) as c:
        yield c


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"png bytes")
    return [(src, "a.png")]


def make_runner(runs, cluster, **kw):
    launcher = RayLauncher(cluster.address, command=fake_command, kill_after=kw.pop("kill_after", 30.0))
    return JobRunner(runs, launcher=launcher, poll_seconds=0.2, **kw)


def wait_exited(runner, run_id, timeout=120.0):
    """Until the run's job has ended on the cluster too (Ray marks a stopped job STOPPED once its
    processes have exited, a moment after the trainer's last event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.tick()
        info = runner.info(run_id)
        if not info.alive:
            return info
        time.sleep(0.2)
    raise AssertionError(f"{run_id} is still alive")


def settle(runner, ids, timeout=120.0):
    """Tick until every run has ended; returns the largest number seen running at once."""
    most, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.tick()
        statuses = [runner.info(i).status for i in ids]
        most = max(most, statuses.count("running"))
        if all(s in ("done", "failed", "cancelled") for s in statuses):
            return most
        time.sleep(0.2)
    raise AssertionError(f"runs did not end: {[runner.info(i).status for i in ids]}")


def test_a_comparison_fans_out_over_the_workers_and_finishes(tmp_path, images, cluster):
    runner = make_runner(tmp_path / "runs", cluster)
    config = {"max_train_steps": 20, "fake_step_seconds": 0.25, "checkpointing_steps": 5}
    ids = [runner.submit({**config, "method": m}, images, label=m, group="g") for m in ("res-tuning", "bypass", "lora")]
    most = settle(runner, ids)
    assert most == 2, "two workers with one CPU each: two runs at once, the third after"
    for run_id in ids:
        info = runner.info(run_id)
        assert info.status == "done", info.log_tail
        assert (info.dir / "tuner.safetensors").exists() and info.device == "ray:cpu"
        assert [e["step"] for e in info.events if e["event"] == "step"] == list(range(1, 21))
        record = json.loads((info.dir / PROCESS_FILE).read_text())
        assert record["ray_job"].startswith(f"restuning-{run_id}-")
        assert "fake trainer: step 20/20" in (info.dir / "train.log").read_text()
    head = next(n for n in cluster.alive_nodes() if n.is_head_node)
    assert runner.launcher.client.get_job_info(record["ray_job"]).driver_node_id != head.node_id, "the head has no CPU for runs"


def test_cancel_keeps_the_checkpoint_and_resume_continues_on_the_cluster(tmp_path, images, cluster):
    runner = make_runner(tmp_path / "runs", cluster)
    run_id = runner.submit({"max_train_steps": 400, "checkpointing_steps": 1000, "fake_step_seconds": 0.05}, images)
    wait_step(runner, run_id, 3, timeout=120)
    runner.cancel(run_id)
    info = wait_for(runner, run_id, {"cancelled", "failed"}, timeout=120)
    assert info.status == "cancelled", info.log_tail
    assert (info.dir / "cancelled").exists(), "the trainer got SIGTERM and saved before it ended"
    stopped_at = int(info.checkpoint.rsplit("-", 1)[1])
    if runner.info(run_id).alive:  # the job may still be ending on the cluster: resume waits for it
        with pytest.raises(JobError, match="still stopping"):
            runner.resume(run_id)
    assert wait_exited(runner, run_id).resumable
    runner.resume(run_id)
    wait_step(runner, run_id, stopped_at + 1, timeout=120)
    steps = [e["step"] for e in runner.events(run_id) if e["event"] == "step"]
    assert steps[steps.index(stopped_at) + 1] == stopped_at + 1 and steps.count(1) == 1
    runner.cancel(run_id)
    assert wait_for(runner, run_id, {"cancelled", "failed"}, timeout=120).status == "cancelled"


def test_a_studio_started_anew_adopts_its_running_jobs(tmp_path, images, cluster):
    first = make_runner(tmp_path / "runs", cluster)
    run_id = first.submit({"max_train_steps": 40, "fake_step_seconds": 0.2}, images)
    wait_step(first, run_id, 2, timeout=120)
    again = make_runner(tmp_path / "runs", cluster)  # the studio restarted: a new runner, a new launcher
    assert again.info(run_id).status == "running"
    assert wait_for(again, run_id, {"done", "failed"}, timeout=120).status == "done"


def test_a_killed_worker_fails_the_run_with_its_log_and_resume_finishes_it_elsewhere(tmp_path, images, cluster):
    runner = make_runner(tmp_path / "runs", cluster)
    run_id = runner.submit({"max_train_steps": 300, "checkpointing_steps": 5, "fake_step_seconds": 0.1}, images)
    wait_step(runner, run_id, 7, timeout=120)
    job = json.loads((runner.run_dir(run_id) / PROCESS_FILE).read_text())["ray_job"]
    node_id = runner.launcher.client.get_job_info(job).driver_node_id
    ip = next(n.node_ip for n in cluster.alive_nodes() if n.node_id == node_id)
    index = int(ip.rsplit(".", 1)[1]) - 3
    cluster.kill_worker(index)
    try:
        info = wait_for(runner, run_id, {"failed", "done", "cancelled"}, timeout=120)
    finally:
        cluster.add_worker()  # back to two workers for the next test; the resumed run may land on either live one
    assert info.status == "failed"
    # Ray reports the job failed, or, when its supervisor saw the driver die first, the signal
    assert re.match(r"the training process ended \((its Ray job failed:|killed \(signal 9\))", info.error), info.error
    assert any("fake trainer: step" in line for line in info.log_tail), "the run's own log, up to the kill"
    assert info.resumable
    stopped_at = int(info.checkpoint.rsplit("-", 1)[1])
    cluster.wait_for_nodes(3)
    config = json.loads((info.dir / "config.json").read_text())
    config["max_train_steps"] = stopped_at + 5
    (info.dir / "config.json").write_text(json.dumps(config))
    runner.resume(run_id)
    info = wait_for(runner, run_id, {"done", "failed"}, timeout=180)
    assert info.status == "done", info.log_tail
    steps = [e["step"] for e in info.events if e["event"] == "step"]
    assert steps[-5:] == list(range(stopped_at + 1, stopped_at + 6))
    new_job = json.loads((info.dir / PROCESS_FILE).read_text())["ray_job"]
    assert runner.launcher.client.get_job_info(new_job).driver_node_id != node_id


def test_a_run_ray_cannot_place_in_time_waits_in_the_queue_again(tmp_path, images, cluster):
    runner = make_runner(tmp_path / "runs", cluster)
    busy = [runner.submit({"max_train_steps": 2000, "fake_step_seconds": 0.05}, images) for _ in range(2)]
    for run_id in busy:
        wait_step(runner, run_id, 1, timeout=120)
    late = runner.submit({"max_train_steps": 3}, images)
    wait_for(runner, late, {"queued"})
    deadline = time.monotonic() + START_TIMEOUT_S + 60
    log = runner.run_dir(late) / "train.log"
    while time.monotonic() < deadline and "waits in the queue again" not in (log.read_text() if log.exists() else ""):
        runner.tick()
        time.sleep(0.5)
    assert "waits in the queue again" in log.read_text()
    assert runner.info(late).status == "queued", "back in the queue, not failed"
    for run_id in busy:
        runner.cancel(run_id)
    assert wait_for(runner, late, {"done", "failed"}, timeout=180).status == "done"
    for run_id in busy:
        assert wait_for(runner, run_id, {"cancelled", "failed"}, timeout=60).status == "cancelled"


def test_an_address_where_no_cluster_answers_is_refused_with_the_reason():
    with pytest.raises(ClusterError, match="no Ray cluster answers at http://127.0.0.1:9"):  # app.py exits with it
        RayLauncher("http://127.0.0.1:9")


def test_a_run_no_node_can_take_is_refused_before_it_is_queued(tmp_path, images, cluster):
    launcher = RayLauncher(cluster.address, command=fake_command, cpus_per_run=4)
    runner = JobRunner(tmp_path / "runs", launcher=launcher)
    with pytest.raises(JobError, match=r"no node of the Ray cluster at .* has 4 CPU\(s\) for a run"):
        runner.submit({"max_train_steps": 3}, images)
    assert list((tmp_path / "runs").iterdir()) == []


def test_the_cli_trains_a_comparison_on_the_cluster(tmp_path, cluster):
    base = {"instance_prompt": "a sks shape", "resolution": 64, "max_train_steps": 2, "train_batch_size": 1,
            "num_validation_images": 1, "validation_steps": 100, "checkpointing_steps": 100}
    (tmp_path / "base.json").write_text(json.dumps(base))
    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "trainers.service.runs", "compare", "--cluster", cluster.address,
                          "--runs-dir", str(runs), "--images", str(ROOT / "assets" / "concepts" / "star"),
                          "--config", str(tmp_path / "base.json"), "--methods", "res-tuning,lora"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    done = [line for line in out.stdout.splitlines() if line.endswith(": done")]
    assert len(done) == 2, out.stdout
    for folder in runs.iterdir():
        events = read_events(folder)
        assert events[-1]["phase"] == "done"
        assert json.loads((folder / PROCESS_FILE).read_text())["ray_job"]


def test_bench_quality_trains_its_cells_on_the_cluster_to_the_same_weights(tmp_path, cluster):
    from bench import quality
    from bench.cluster_compare import split

    trained = {}
    for side, extra in (("local", []), ("cluster", ["--cluster", cluster.address, "--jobs", "2"])):
        args = quality.parse_args(["--quick", "--methods", "res-tuning", "--device", "cpu", "--threads", "1",
                                   "--work", str(tmp_path / side), *extra])
        args.device = args.device_resolved = quality.resolve_device(args)
        cells = [quality.Cell(v, *quality.recipe_for(v, args), seed=0) for v in quality.selected_variants(args)]
        trained[side] = quality.run_cells(cells, args, args.device)
    for (cell, local), (_, remote) in zip(trained["local"], trained["cluster"]):
        assert remote["peak_rss_gib"] is None and remote["trainable_params"] == local["trainable_params"]
        for kind, path in local["artifacts"].items():
            if path.endswith(".safetensors"):
                ours, theirs = split(Path(local["run"]) / path), split(Path(remote["run"]) / path)
                # the tensors' bytes, and the header with what a process orders by its hash seed
                # put in one order (bench.cluster_compare.canonical): two local runs differ there too
                assert ours == theirs, f"{cell.variant.label}: {kind} differs"
