"""The job runner against a fake trainer process (tests/fake_trainer.py) that keeps the events
contract: queue order and positions, cancel, restart recovery, a killed process, resume."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from trainers.events import read_events
from trainers.service.jobs import PROCESS_FILE, JobError, JobRunner

FAKE = Path(__file__).with_name("fake_trainer.py")


def fake_command(config_path, config, device):
    return [sys.executable, str(FAKE), "--config", str(config_path)]


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"png bytes")
    return [(src, "a.png")]


def make_runner(runs, **kw):
    return JobRunner(runs, devices=["cpu"], command=fake_command, poll_seconds=0.05, **kw)


def wait_for(runner, run_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.tick()
        info = runner.info(run_id)
        if info.status in statuses:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{run_id} stayed {runner.info(run_id).status}, wanted {statuses}")


def wait_step(runner, run_id, step, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.tick()
        steps = [e["step"] for e in runner.events(run_id) if e["event"] == "step"]
        if steps and steps[-1] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_id} did not reach step {step}")


def test_run_goes_to_done_and_writes_only_inside_its_folder(tmp_path, images):
    runs = tmp_path / "runs"
    runner = make_runner(runs)
    run_id = runner.submit({"method": "lora", "max_train_steps": 3, "instance_prompt": "a sks star"}, images)
    info = wait_for(runner, run_id, {"done", "failed"})
    assert info.status == "done", info.log_tail
    config = json.loads((info.dir / "config.json").read_text())
    assert config["output_dir"] == str(info.dir) and config["instance_data_dir"] == str(info.dir / "instance")
    assert (info.dir / "instance" / "a.png").read_bytes() == b"png bytes"
    assert [e["step"] for e in info.events if e["event"] == "step"] == [1, 2, 3]
    assert sorted(p.name for p in runs.iterdir()) == [run_id]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "src.png"]


def test_a_cpu_trainer_spins_briefly_at_openmp_barriers_unless_told_otherwise(tmp_path, images, monkeypatch):
    runner = make_runner(tmp_path / "runs")
    config = {"method": "lora", "max_train_steps": 1, "instance_prompt": "a sks star", "fake_report_env": ["GOMP_SPINCOUNT"]}
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    first = wait_for(runner, runner.submit(config, images), {"done", "failed"})
    monkeypatch.setenv("GOMP_SPINCOUNT", "777")
    second = wait_for(runner, runner.submit(config, images), {"done", "failed"})
    reported = [next(e["env"] for e in info.events if e["event"] == "info") for info in (first, second)]
    assert reported == [{"GOMP_SPINCOUNT": "10000"}, {"GOMP_SPINCOUNT": "777"}]


def test_queue_runs_one_at_a_time_in_order_with_positions(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    slow = {"max_train_steps": 200, "fake_step_seconds": 0.05}
    a = runner.submit(slow, images, label="first")
    b = runner.submit(slow, images, label="second")
    c = runner.submit(slow, images, label="third")
    runner.tick()
    infos = {i.id: i for i in runner.list_runs()}
    assert infos[a].status == "running"
    assert (infos[b].status, infos[b].position) == ("queued", 1)
    assert (infos[c].status, infos[c].position) == ("queued", 2)
    assert not (infos[b].dir / PROCESS_FILE).exists()
    runner.cancel(b)  # a queued run leaves the queue and never starts
    assert runner.info(b).status == "cancelled" and runner.info(c).position == 1
    runner.cancel(a)
    wait_for(runner, a, {"cancelled"})
    wait_for(runner, c, {"running"})
    assert not (runner.info(b).dir / PROCESS_FILE).exists()
    runner.cancel(c)
    wait_for(runner, c, {"cancelled"})


def test_two_slots_per_device_run_two_at_once(tmp_path, images):
    runner = make_runner(tmp_path / "runs", per_device=2)
    ids = [runner.submit({"max_train_steps": 200}, images) for _ in range(3)]
    runner.tick()
    assert [runner.info(i).status for i in ids] == ["running", "running", "queued"]
    for i in ids:
        runner.cancel(i)
    for i in ids:
        wait_for(runner, i, {"cancelled"})


def test_cancel_keeps_the_checkpoint_and_resume_continues_from_it(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 400, "checkpointing_steps": 1000, "fake_step_seconds": 0.02}, images)
    wait_step(runner, run_id, 3)
    runner.cancel(run_id)
    info = wait_for(runner, run_id, {"cancelled"})
    deadline = time.monotonic() + 20
    while info.alive and time.monotonic() < deadline:  # it said `cancelled` and is exiting: resumable once gone
        time.sleep(0.05)
        runner.tick()
        info = runner.info(run_id)
    assert (info.dir / "cancelled").exists()
    assert info.resumable and info.checkpoint.startswith("checkpoints/checkpoint-")
    stopped_at = int(info.checkpoint.rsplit("-", 1)[1])
    assert stopped_at >= 3
    runner.resume(run_id)
    assert json.loads((info.dir / "config.json").read_text())["resume_from_checkpoint"] == "latest"
    wait_step(runner, run_id, stopped_at + 1)
    steps = [e["step"] for e in runner.events(run_id) if e["event"] == "step"]
    # the second process starts after the checkpoint, not from step 1
    assert steps[steps.index(stopped_at) + 1] == stopped_at + 1
    assert steps.count(1) == 1
    runner.cancel(run_id)
    wait_for(runner, run_id, {"cancelled"})


def test_a_run_shows_its_end_only_once_its_process_has_exited(tmp_path, images):
    """Issue 29, item 6: the trainer writes `cancelled` (or `done`) and then still has to exit;
    until it has, the run is `running` and not resumable. The test holds the process after its
    final phase for as long as it likes (fake_exit_when), so no timing is assumed."""
    runner = make_runner(tmp_path / "runs")
    release = tmp_path / "release"
    run_id = runner.submit({"max_train_steps": 400, "checkpointing_steps": 1000, "fake_step_seconds": 0.02,
                            "fake_exit_when": str(release)}, images)
    try:
        wait_step(runner, run_id, 2)
        runner.cancel(run_id)
        deadline = time.monotonic() + 60
        while read_events(runner.run_dir(run_id))[-1].get("phase") != "cancelled":
            assert time.monotonic() < deadline, "the trainer never reported cancelled"
            time.sleep(0.02)
        for _ in range(3):  # however often it is asked while the process lives
            runner.tick()
            info = runner.info(run_id)
            assert (info.status, info.resumable) == ("running", False), "cancelled shown while its process still runs"
            with pytest.raises(JobError, match="still stopping"):
                runner.resume(run_id)
    finally:
        release.write_text("")  # a failure leaves no process waiting
    info = wait_for(runner, run_id, {"cancelled", "failed"}, timeout=60)
    assert info.status == "cancelled" and info.resumable and not info.alive
    assert (info.dir / info.checkpoint / "tuner_state.safetensors").is_file(), "its last checkpoint is on disk"
    assert runner.resume(run_id).startswith("queued again")
    runner.cancel(run_id)
    wait_for(runner, run_id, {"cancelled"}, timeout=60)


LAUNCHER = """import signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # like accelerate launch: gone at once
child.wait()
"""


def launcher_command(config_path, config, device):
    return [sys.executable, "-c", LAUNCHER, *fake_command(config_path, config, device)]


def test_a_run_lives_while_its_trainer_does_even_after_the_launcher_exits(tmp_path, images):
    runner = JobRunner(tmp_path / "runs", devices=["cpu"], command=launcher_command)
    a = runner.submit({"max_train_steps": 400, "fake_step_seconds": 0.02, "fake_save_seconds": 1.0}, images)
    b = runner.submit({"max_train_steps": 1}, images)
    wait_step(runner, a, 2)
    runner.cancel(a)
    time.sleep(0.5)  # the launcher has exited; the trainer is still saving
    runner.tick()
    assert runner.info(a).status == "running" and runner.info(b).status == "queued"
    info = wait_for(runner, a, {"cancelled", "failed"})
    assert info.status == "cancelled" and info.checkpoint
    phases = [e["phase"] for e in runner.events(a) if e["event"] == "phase"]
    assert phases == ["queued", "loading", "training", "cancelled"]  # the trainer's own word, once
    assert wait_for(runner, b, {"done"}).status == "done"
    assert [e["phase"] for e in runner.events(a) if e["event"] == "phase"] == phases


def test_a_process_that_dies_shows_failed_with_its_log_tail(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 10, "checkpointing_steps": 2, "fake_crash_at": 5}, images)
    info = wait_for(runner, run_id, {"failed", "done"})
    assert info.status == "failed"
    assert "exit code 3" in info.error
    assert any("something went badly wrong" in line for line in info.log_tail)
    failure = read_events(info.dir)[-1]  # the last lines are in the failure event too
    assert failure["phase"] == "failed" and "fake trainer: something went badly wrong" in failure["log_tail"]
    assert info.resumable and info.checkpoint == "checkpoints/checkpoint-4"
    with pytest.raises(JobError, match="failed"):
        runner.cancel(run_id)


def test_a_run_whose_process_has_exited_is_running_until_reaped(tmp_path, images):
    # The order a loaded machine can give: the runner ticks, then the process exits, then a page
    # asks for the run before the next tick. It must not read "failed" with no reason yet.
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 10, "checkpointing_steps": 2, "fake_crash_at": 5}, images)
    runner.tick()
    child = runner.launcher._children[run_id][0]
    child.wait(timeout=30)
    assert runner.info(run_id).status == "running"
    runner.tick()
    info = runner.info(run_id)
    assert info.status == "failed" and "exit code 3" in info.error


def test_restart_adopts_live_runs_and_marks_dead_ones_failed(tmp_path, images):
    runs = tmp_path / "runs"
    first = make_runner(runs)
    live = first.submit({"max_train_steps": 400, "checkpointing_steps": 2, "fake_step_seconds": 0.02}, images)
    waiting = first.submit({"max_train_steps": 2}, images)
    wait_step(first, live, 3)
    del first  # the app stops; its child keeps training in its own session

    second = make_runner(runs)
    assert second.info(live).status == "running"
    assert (second.info(waiting).status, second.info(waiting).position) == ("queued", 1)
    second.tick()
    assert second.info(waiting).status == "queued"  # the adopted run still holds the only slot

    pid = json.loads((runs / live / PROCESS_FILE).read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)  # dies without a word, like an out-of-memory kill
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and second.info(live).status == "running":
        time.sleep(0.05)
    os.waitpid(pid, 0)  # the first runner's child: reap it here, as nobody else will

    third = make_runner(runs)  # restarted after the death
    info = third.info(live)
    assert info.status == "failed"
    assert any("fake trainer: step" in line for line in info.log_tail)
    assert read_events(runs / live)[-1]["phase"] == "failed"
    assert info.resumable
    wait_for(third, waiting, {"done"})
    third.resume(live)
    wait_step(third, live, int(info.checkpoint.rsplit("-", 1)[1]) + 1)
    third.cancel(live)
    wait_for(third, live, {"cancelled"})


def test_run_ids_are_checked_and_delete_touches_only_its_run(tmp_path, images):
    runs = tmp_path / "runs"
    runner = make_runner(runs)
    outside = tmp_path / "keep"
    outside.mkdir()
    for bad in ("../keep", "..", "/etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(JobError):
            runner.run_dir(bad)
    (runs / "link").symlink_to(outside)
    with pytest.raises(JobError):
        runner.delete("link")
    a = runner.submit({"max_train_steps": 200}, images)
    b = runner.submit({"max_train_steps": 1}, images)
    runner.tick()
    with pytest.raises(JobError, match="cancel it before deleting"):
        runner.delete(a)
    runner.cancel(b)
    runner.delete(b)
    assert not (runs / b).exists() and (runs / a).is_dir() and outside.is_dir()
    runner.cancel(a)
    wait_for(runner, a, {"cancelled"})


def test_unsafe_image_names_are_refused_and_leave_nothing(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    src = images[0][0]
    for name in ("../evil.png", "a/b.png", ".."):
        with pytest.raises(JobError):
            runner.submit({}, [(src, name)])
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.slow
def test_the_real_trainer_cancels_to_a_checkpoint_and_resumes_to_done(tmp_path):
    """The runner with `accelerate launch -m trainers.dreambooth` on the demo model: SIGTERM
    leaves a checkpoint and `cancelled`; resume continues from it to `done`."""
    demo = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
    if not (demo / "model_index.json").exists():
        pytest.skip("assets/demo-model is missing")
    stars = sorted((demo.parent / "concepts" / "star").glob("*.png"))[:3]
    runner = JobRunner(tmp_path / "runs", devices=["cpu"], poll_seconds=0.2)
    config = {"method": "res-tuning", "pretrained_model_name_or_path": str(demo), "instance_prompt": "a sks star",
              "resolution": 64, "max_train_steps": 400, "checkpointing_steps": 1000, "mixed_precision": "no"}
    run_id = runner.submit(config, [(p, p.name) for p in stars])
    wait_step(runner, run_id, 2, timeout=240)
    runner.cancel(run_id)
    info = wait_for(runner, run_id, {"cancelled", "failed"}, timeout=120)
    assert info.status == "cancelled", info.log_tail
    assert info.checkpoint, "the trainer saved no checkpoint on SIGTERM"
    # where the SIGTERM checkpoint is, not the last step event: step events are throttled, and a
    # fast machine trains several steps past the last one before the signal lands
    stopped_at = next(e["step"] for e in reversed(runner.events(run_id)) if e["event"] == "checkpoint")
    config_path = info.dir / "config.json"
    resumed = {**json.loads(config_path.read_text()), "max_train_steps": stopped_at + 3}
    config_path.write_text(json.dumps(resumed))
    # The trainer exits a moment after its last event: until then resume is refused, not doubled.
    deadline = time.monotonic() + 60
    while True:
        assert runner.info(run_id).status == "cancelled"
        try:
            runner.resume(run_id)
            break
        except JobError as exc:
            assert "still stopping" in str(exc)
            assert time.monotonic() < deadline, "the cancelled trainer never exited"
            time.sleep(0.1)
    info = wait_for(runner, run_id, {"done", "failed"}, timeout=240)
    assert info.status == "done", info.log_tail
    assert (info.dir / "tuner.safetensors").exists()
    steps = [e["step"] for e in runner.events(run_id) if e["event"] == "step"]
    assert steps[-1] == stopped_at + 3 and steps.count(1) == 1  # continued, not restarted


# -- CPU threads of a run ------------------------------------------------------------------------------


def _model_with_unet_of(tmp_path, size: int) -> Path:
    model = tmp_path / f"model-{size}"
    (model / "unet").mkdir(parents=True)
    with open(model / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.truncate(size)  # sparse: the rule reads the size only
    return model


def test_a_small_u_net_gets_one_thread_and_a_big_or_unreadable_model_every_core(tmp_path):
    from trainers.models import SMALL_UNET_BYTES, cpu_threads_for

    assert cpu_threads_for(str(_model_with_unet_of(tmp_path, SMALL_UNET_BYTES - 1)), 2) == 1
    assert cpu_threads_for(str(_model_with_unet_of(tmp_path, SMALL_UNET_BYTES)), 4) == 4  # at the limit: not small
    assert cpu_threads_for(str(tmp_path / "missing"), 4) == 4
    assert cpu_threads_for("stable-diffusion-v1-5/stable-diffusion-v1-5", 4) == 4  # a hub id
    assert cpu_threads_for(str(_model_with_unet_of(tmp_path, 0)), 4) == 4  # no weights to size
    assert cpu_threads_for("assets/demo-model", 2) == 1


def test_the_launch_command_carries_the_threads_and_the_runner_no_niceness(tmp_path, monkeypatch):
    import inspect

    from trainers import models
    from trainers.service import jobs

    small = _model_with_unet_of(tmp_path, 1000)
    monkeypatch.setattr(models, "cpu_threads_for", lambda model, cores: 1 if model == str(small) else cores)
    cmd = jobs.default_command(tmp_path / "config.json", {"pretrained_model_name_or_path": str(small)}, "cpu")
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "1"
    cmd = jobs.default_command(tmp_path / "config.json", {"pretrained_model_name_or_path": str(small)}, "cpu", threads=3)
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "3"
    # beside a busy neighbour a niced run gets a third of the CPU: runs are not niced by default
    assert inspect.signature(JobRunner).parameters["niceness"].default == 0
