"""Messages instead of tracebacks (issue 13, items 4 and 9): a failed run shows the trainer's own
error and hint, not the launcher's CalledProcessError; a killed run says it was killed; a run
over its memory cap fails alone, saying so."""

import json
import os
import signal
import sys
import time

from tests.test_jobs import FAKE, make_runner, wait_for
from trainers.events import last_phase
from trainers.service.jobs import JobRunner, default_memory_limit
from webui import live, runs_tab

# what `accelerate launch` does with its trainer: run it, and re-raise a failure as CalledProcessError
LAUNCHER = "import subprocess, sys; subprocess.run(sys.argv[1:], check=True)"


def launched(config_path, config, device):
    return [sys.executable, "-c", LAUNCHER, sys.executable, str(FAKE), "--config", str(config_path)]


def ended(runner, run_id, timeout=20.0):
    """The run once its final phase is written (a process that just died is `failed` a moment
    before the runner reaps it and writes how it ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runner.tick()
        if last_phase(runner.events(run_id)) in ("failed", "done", "cancelled"):
            return runner.info(run_id)
        time.sleep(0.05)
    raise AssertionError(f"{run_id} has no final phase")


def shown(info) -> str:
    return runs_tab._details(info) + live.log_text(info)


def test_a_failed_run_shows_the_trainers_error_not_the_launchers_traceback(tmp_path, images):
    runner = JobRunner(tmp_path / "runs", devices=["cpu"], command=launched, poll_seconds=0.05)
    run_id = runner.submit({"max_train_steps": 5, "fake_fail_with": "x.png: not an image"}, images)
    info = wait_for(runner, run_id, {"failed"})
    deadline = time.monotonic() + 20
    while info.alive and time.monotonic() < deadline:  # the launcher writes its traceback as it exits
        time.sleep(0.05)
        info = runner.info(run_id)
    assert "CalledProcessError" in (info.dir / "train.log").read_text(), "the launcher did raise"
    assert info.error == "x.png: not an image" and info.hint == "fix the input and start again"
    assert "CalledProcessError" not in shown(info) and "Traceback" not in shown(info)
    assert "hint: fix the input" in live.log_text(info)


def test_a_killed_run_says_it_was_killed(tmp_path, images):
    runner = JobRunner(tmp_path / "runs", devices=["cpu"], command=launched, poll_seconds=0.05)
    slow = {"max_train_steps": 400, "fake_step_seconds": 0.05}
    run_id = runner.submit(slow, images)
    deadline = time.monotonic() + 20
    while not any(e.get("pid") for e in runner.events(run_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    trainer = next(e["pid"] for e in runner.events(run_id) if e.get("pid"))
    os.kill(trainer, signal.SIGKILL)  # the trainer, under the launcher: as the OOM killer or a kill -9 does
    info = ended(runner, run_id)
    assert "killed (signal 9)" in info.error and "exit code" not in info.error
    assert "CalledProcessError" not in shown(info)
    direct = make_runner(tmp_path / "direct")
    run_id = direct.submit(slow, images)
    deadline = time.monotonic() + 20
    while not (direct.run_dir(run_id) / "process.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(json.loads((direct.run_dir(run_id) / "process.json").read_text())["pid"], signal.SIGKILL)
    assert "killed (signal 9)" in ended(direct, run_id).error


def test_a_run_over_its_memory_cap_fails_alone_saying_so(tmp_path, images):
    runner = make_runner(tmp_path / "runs", memory_limit=1 << 30)
    greedy = runner.submit({"max_train_steps": 2, "fake_reserve_mb": 4096}, images)
    modest = runner.submit({"max_train_steps": 2}, images)
    info = ended(runner, greedy)
    assert info.status == "failed" and "ran out of the memory allowed for a run: 1.0 GiB" in info.hint
    assert wait_for(runner, modest, {"failed", "done"}).status == "done"
    assert 0 < default_memory_limit() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
