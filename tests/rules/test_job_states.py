"""The job runner's state rules (trainers.service.jobs), case by case: every status x every action, how a
process's end becomes a status, whether a resume passes the caps a new run passes and where it
goes in the queue, and a recorded pid that now names another process. A launcher driven by the
test (no processes, no sleeping) stands in for LocalLauncher."""

import dataclasses
import json
import os

import numpy
import psutil
import pytest
from safetensors.numpy import save_file

from trainers.service import jobs
from trainers.service import limits as caps
from trainers.events import EventLog
from trainers.service.jobs import JOB_FILE, PROCESS_FILE, JobError, JobRunner, Launcher


class Driven(Launcher):
    """Runs start when there is a slot and end when the test says so."""

    def __init__(self, slots=1):
        self.devices, self.slots = ["cpu"], slots
        self.states: dict[str, str] = {}
        self.ended: list[tuple[str, str | None]] = []
        self.stops: list[tuple[str, bool]] = []
        self.adopted: list[str] = []

    def describe(self):
        return "the test"

    def room(self, device):
        return None

    def next_device(self, held):
        return "cpu" if len(held) < self.slots else None

    def launch(self, run_id, path, device, cap):
        self.states[run_id] = "running"
        return {"device": device, "run": run_id}

    def state(self, run_id, record):
        return self.states.get(run_id, "ended")

    def reap(self):
        out, self.ended = self.ended, []
        return out

    def adopt(self, run_id, path, record):
        self.adopted.append(run_id)

    def how_it_ended(self, path, record):
        return "it was gone when the studio started"

    def stop(self, record, force=False):
        self.stops.append((record["run"], force))

    def forget(self, run_id):
        self.states.pop(run_id, None)

    def end(self, run_id, how="exit code 1"):
        self.states[run_id] = "ended"
        self.ended.append((run_id, how))


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "src.png"
    src.write_bytes(b"png bytes")
    return [(src, "a.png")]


def runner_of(tmp_path, slots=1, **limits):
    launcher = Driven(slots)
    return JobRunner(tmp_path / "runs", launcher=launcher, memory_check=False, limits=dataclasses.replace(caps.LOCAL, **limits),
                     disk_check_seconds=0.0), launcher


def checkpoint(runner, run_id, step=2):
    path = runner.run_dir(run_id) / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": numpy.zeros(1, dtype=numpy.float32)}, str(path / "tuner_state.safetensors"))
    EventLog(path.parent.parent).emit("checkpoint", step=step, path=f"checkpoints/checkpoint-{step}")


def phase(runner, run_id, name, **fields):
    EventLog(runner.run_dir(run_id)).phase(name, **fields)


def make(runner, launcher, images, status, owner=""):
    """A run in `status`; running ones hold the launcher's slot."""
    slots = launcher.slots
    if status == "queued":
        launcher.slots = 0
    run_id = runner.submit({"max_train_steps": 10}, images, owner=owner)
    launcher.slots = slots
    if status in ("running", "stopping"):
        assert runner.info(run_id).status == "running"
        if status == "stopping":
            phase(runner, run_id, "done")  # its final word written, its process still writing files
    elif status in ("done", "failed", "cancelled", "failed-no-checkpoint", "damaged"):
        if status != "failed-no-checkpoint":
            checkpoint(runner, run_id)
        phase(runner, run_id, "failed" if status == "damaged" else status.split("-")[0])
        launcher.end(run_id, "exit code 0")
        runner.tick()
        if status == "damaged":
            (runner.run_dir(run_id) / JOB_FILE).write_text("{not json")
    return run_id


STATUSES = ["queued", "running", "stopping", "done", "failed", "failed-no-checkpoint", "cancelled", "damaged"]
SHOWN = {"stopping": "running", "failed-no-checkpoint": "failed"}


@pytest.mark.parametrize("status", STATUSES)
def test_each_status_is_derived_from_the_files_and_the_process(tmp_path, images, status):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, status)
    info = runner.info(run_id)
    assert info.status == SHOWN.get(status, status)
    assert info.resumable == (status in ("failed", "cancelled"))
    assert info.alive == (status in ("running", "stopping"))
    assert (info.position == 1) == (status == "queued")


# status -> (what cancel does, what resume does, what delete does): "ok" or the JobError's words
NOT_CANCELLED, NOT_RESUMED = "refused: only queued or running runs can be cancelled", "refused: only failed or cancelled"
ACTIONS = {
    "queued": ("removed from the queue", NOT_RESUMED, "refused: cancel it before deleting"),
    "running": ("stopping: the trainer saves a checkpoint", NOT_RESUMED, "refused: cancel it before deleting"),
    "stopping": ("stopping already", "refused: still stopping", "refused: still stopping"),
    "done": (NOT_CANCELLED, NOT_RESUMED, "ok"),
    "failed": (NOT_CANCELLED, "queued again", "ok"),
    "failed-no-checkpoint": (NOT_CANCELLED, "refused: saved no checkpoint", "ok"),
    "cancelled": (NOT_CANCELLED, "queued again", "ok"),
    "damaged": (NOT_CANCELLED, NOT_RESUMED, "ok"),
}


def act(runner, action, run_id):
    try:
        return getattr(runner, action)(run_id) or "ok"
    except JobError as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("action", ["cancel", "resume", "delete"])
@pytest.mark.parametrize("status", STATUSES)
def test_every_action_on_every_status(tmp_path, images, status, action):
    runner, launcher = runner_of(tmp_path, slots=1)
    run_id = make(runner, launcher, images, status)
    other = make(runner, launcher, images, "queued") if status not in ("running", "stopping") else None
    before = runner.info(run_id).status
    answer = act(runner, action, run_id)
    expected = ACTIONS[status][("cancel", "resume", "delete").index(action)]
    refused = expected.startswith("refused: ")
    assert answer.startswith("refused: ") == refused and expected.removeprefix("refused: ") in answer
    if refused or expected.startswith("stopping already"):  # nothing changes
        assert runner.info(run_id).status == before and launcher.stops == []
    elif action == "delete":
        assert not (runner.runs_dir / run_id).exists() and runner.info(other).status == "queued"
    elif action == "cancel" and status == "queued":
        assert runner.info(run_id).status == "cancelled" and launcher.stops == []
    elif action == "cancel":
        assert launcher.stops == [(run_id, False)] and runner.info(run_id).status == "running"
    else:  # resumed: queued behind the run that waited already
        info = runner.info(run_id)
        assert info.status in ("queued", "running") and not info.resumable
        config = json.loads((info.dir / "config.json").read_text())
        assert config["resume_from_checkpoint"] == "latest"


@pytest.mark.parametrize("final, cancel_requested, status, words", [
    (None, False, "failed", "the training process ended (exit code 1) without finishing"),
    (None, True, "cancelled", "cancelled; the process ended (exit code 1) without reporting"),
    ("done", False, "done", ""),
    ("cancelled", True, "cancelled", ""),
    ("failed", False, "failed", "its own error"),
])
def test_a_process_that_ends_gets_a_final_status_once(tmp_path, images, final, cancel_requested, status, words):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "running")
    if cancel_requested:
        runner.cancel(run_id)
    if final:
        phase(runner, run_id, final, **({"error": "its own error"} if final == "failed" else {}))
        assert runner.info(run_id).status == "running", "never ahead of its process"
    launcher.end(run_id)
    runner.tick()
    info = runner.info(run_id)
    assert info.status == status and words in json.dumps(info.events)
    phases = [e["phase"] for e in info.events if e.get("event") == "phase" and e["phase"] in ("done", "failed", "cancelled")]
    assert len(phases) == 1


def test_a_second_cancel_signals_nothing_more(tmp_path, images):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "running")
    runner.cancel(run_id, reason="first")
    assert "stopping already" in runner.cancel(run_id)
    assert launcher.stops == [(run_id, False)]


def test_a_resumed_run_that_dies_fails_rather_than_showing_its_old_cancel(tmp_path, images):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "running")
    checkpoint(runner, run_id)
    runner.cancel(run_id, reason="stopped by the studio: a cap")
    launcher.end(run_id)
    runner.tick()
    info = runner.info(run_id)
    assert info.status == "cancelled" and info.hint == "stopped by the studio: a cap"
    runner.resume(run_id)
    assert runner.info(run_id).status == "running"
    launcher.end(run_id)
    runner.tick()
    info = runner.info(run_id)
    assert info.status == "failed" and info.hint != "stopped by the studio: a cap"


@pytest.mark.parametrize("kill_after, forced", [(-1.0, True), (3600.0, False)])  # -1: overdue at once, no waiting
def test_a_cancel_the_trainer_ignores_is_forced_after_kill_after(tmp_path, images, kill_after, forced):
    runner, launcher = runner_of(tmp_path)
    runner.kill_after = kill_after
    run_id = make(runner, launcher, images, "running")
    runner.cancel(run_id)
    runner.tick()
    assert launcher.stops == [(run_id, False)] + ([(run_id, True)] if forced else [])


def test_a_run_the_launcher_hands_back_unstarted_waits_at_its_old_place(tmp_path, images):
    runner, launcher = runner_of(tmp_path)
    first = make(runner, launcher, images, "running")
    second = make(runner, launcher, images, "queued")
    launcher.states[first] = "ended"
    launcher.ended.append((first, None))
    launcher.slots = 0
    runner.tick()
    assert runner.queue() == [first, second] and not (runner.run_dir(first) / PROCESS_FILE).exists()
    assert runner.info(first).status == "queued"


def test_a_restarted_studio_adopts_live_runs_fails_dead_ones_and_keeps_a_pending_cancel(tmp_path, images):
    runner, launcher = runner_of(tmp_path, slots=3)
    live, dead, stopping = (make(runner, launcher, images, "running") for _ in range(3))
    runner.cancel(stopping)
    launcher.states[dead] = "ended"
    again = JobRunner(tmp_path / "runs", launcher=launcher, memory_check=False, kill_after=-1.0)
    assert sorted(launcher.adopted) == sorted([live, stopping])
    info = again.info(dead)
    assert info.status == "failed" and "it was gone when the studio started" in info.error
    launcher.stops.clear()
    again.tick()
    assert launcher.stops == [(stopping, True)]


# ---- resume: the caps a new run passes, and the back of the queue ----------------------------


CAP_EDGES = [(0, 1, True), (1, 2, True), (1, 1, False), (2, 2, False), (2, 1, False)]  # (runs active, cap, resumed)


@pytest.mark.parametrize("others, cap, allowed", CAP_EDGES)
def test_a_resume_counts_against_the_visitors_run_cap(tmp_path, images, others, cap, allowed):
    runner, launcher = runner_of(tmp_path, runs_per_owner=9)
    run_id = make(runner, launcher, images, "failed", owner="v1")
    for _ in range(others):
        make(runner, launcher, images, "queued", owner="v1")
    make(runner, launcher, images, "queued", owner="v2")  # another visitor's run does not count
    runner.limits = dataclasses.replace(runner.limits, runs_per_owner=cap)
    if allowed:
        assert "queued again" in runner.resume(run_id)
    else:
        with pytest.raises(JobError, match="allows .* per visitor"):
            runner.resume(run_id)
        assert runner.info(run_id).status == "failed"


@pytest.mark.parametrize("others, cap, allowed", CAP_EDGES)
def test_a_resume_counts_against_the_studios_queue_cap(tmp_path, images, others, cap, allowed):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "cancelled")
    for _ in range(others):
        make(runner, launcher, images, "queued")
    runner.limits = dataclasses.replace(runner.limits, queued_total=cap)
    answer = act(runner, "resume", run_id)
    assert ("queued again" in answer) == allowed and (allowed or "queue is full" in answer)


@pytest.mark.parametrize("margin, allowed", [(-1, True), (0, False), (1, False)])
def test_a_resume_is_refused_when_the_visitor_holds_their_disk_cap(tmp_path, images, margin, allowed):
    runner, launcher = runner_of(tmp_path, runs_per_owner=5)
    run_id = make(runner, launcher, images, "failed", owner="v1")
    held = caps.owner_bytes(runner, "v1")
    runner.limits = dataclasses.replace(runner.limits, disk_per_owner=held - margin)
    answer = act(runner, "resume", run_id)
    assert ("queued again" in answer) == allowed, answer
    if not allowed:
        assert "a visitor may keep" in answer and runner.info(run_id).status == "failed"


@pytest.mark.parametrize("margin, allowed", [(-1, True), (0, False)])
def test_a_resume_is_refused_when_the_runs_folder_holds_its_disk_cap(tmp_path, images, margin, allowed):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "failed")
    runner.limits = dataclasses.replace(runner.limits, disk_total=caps.folder_bytes(runner.runs_dir) - margin)
    assert ("queued again" in act(runner, "resume", run_id)) == allowed


def test_a_resume_is_refused_without_free_disk_and_over_the_step_cap(tmp_path, images):
    runner, launcher = runner_of(tmp_path)
    run_id = make(runner, launcher, images, "failed")
    runner.limits = dataclasses.replace(runner.limits, min_free_disk=1 << 62)
    assert "disk has" in act(runner, "resume", run_id)
    runner.limits = dataclasses.replace(runner.limits, min_free_disk=0, max_steps=9)  # the run asks for 10
    assert "over the 9 steps" in act(runner, "resume", run_id)
    runner.limits = dataclasses.replace(runner.limits, max_steps=10)
    assert "queued again" in act(runner, "resume", run_id)


def test_a_resumed_run_goes_to_the_back_of_the_queue(tmp_path, images):
    runner, launcher = runner_of(tmp_path)
    resumed = make(runner, launcher, images, "cancelled")  # the oldest of all
    waiting = [make(runner, launcher, images, "queued") for _ in range(2)]
    launcher.slots = 0
    runner.resume(resumed)
    assert runner.queue() == waiting + [resumed]
    assert [runner.info(r).position for r in waiting + [resumed]] == [1, 2, 3]
    job = json.loads((runner.run_dir(resumed) / JOB_FILE).read_text())
    assert "cancel_reason" not in job and "cancel_requested" not in job


# ---- a recorded process: alive only while the same process (by start time) or its group lives ----


@pytest.mark.parametrize("offset, alive", [(0.0, True), (0.5, True), (0.99, True), (1.0, False), (-1.0, False),
                                           (3600.0, False), (-3600.0, False)])
def test_a_pid_counts_only_with_its_start_time(offset, alive):
    """A run's pid reused by another process (another start time) is not the run."""
    me = psutil.Process(os.getpid())
    assert jobs._process_alive({"pid": me.pid, "create_time": me.create_time() + offset}) == alive


@pytest.mark.parametrize("record", [{}, {"pid": os.getpid()}, {"pid": "x", "create_time": 0}, {"create_time": 1.0},
                                    {"pid": 2 ** 22 + 12345, "create_time": 0.0}])
def test_a_record_without_a_live_pid_and_start_time_is_not_alive(record):
    assert jobs._process_alive(record) is False


@pytest.mark.parametrize("phase_, alive, waiting, damaged, status", [
    ("done", True, False, False, "running"), ("cancelled", True, False, False, "running"),
    ("training", True, False, True, "running"),
    ("training", False, False, True, "damaged"), ("done", False, False, True, "damaged"),
    ("done", False, False, False, "done"), ("failed", False, True, False, "failed"), ("cancelled", False, False, False, "cancelled"),
    ("training", False, True, False, "queued"), ("queued", False, True, False, "queued"),
    ("training", False, False, False, "failed"), (None, False, False, False, "failed"),
])
def test_status_table(phase_, alive, waiting, damaged, status):
    assert jobs._status(phase_, alive, waiting=waiting, damaged=damaged) == status
