"""Issue 26, item 6: readers of run files survive any content (depth, size, encoding); a run folder
whose job.json is missing or damaged is listed as damaged and can be deleted; resume falls back to
the newest checkpoint that loads, naming the damaged one."""

import json

import pytest

from tests.test_jobs import make_runner, wait_for
from trainers import dreambooth
from trainers.events import EVENTS_FILE, scan_events
from trainers.service.jobs import JobError
from webui import live, runs_tab

DEEP = b"[" * 200_000 + b"]" * 200_000 + b"\n"


def test_a_deeply_nested_line_stops_neither_the_studio_nor_the_queue(tmp_path, images):
    runs = tmp_path / "runs"
    runner = make_runner(runs)
    spoiled = wait_for(runner, runner.submit({"max_train_steps": 2}, images), {"done"})
    with open(spoiled.dir / EVENTS_FILE, "ab") as f:
        f.write(DEEP)
        f.write(b'{"t": 1, "event": "info", "deep": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}\n")
        f.write(b'{"t": 1, "event": "info", "long": "' + b"x" * (2 << 20) + b'"}\n')
        f.write(b'{"t": 1, "event": "info", "latin": "\xe9t\xe9"}\n')
    for name in ("job.json", "config.json"):  # valid JSON of another kind, nested deep
        text = json.loads((spoiled.dir / name).read_text())
        text["x"] = json.loads("[" * 500 + "]" * 500)
        (spoiled.dir / name).write_text(json.dumps(text))
    restarted = make_runner(runs)  # the studio starts
    info = restarted.info(spoiled.id)
    assert info.skipped_events == 4 and info.status in ("done", "damaged")
    fresh = restarted.submit({"max_train_steps": 2}, images)  # Train works, the scheduler goes on
    assert wait_for(restarted, fresh, {"done"}).status == "done"
    for run in restarted.list_runs():
        runs_tab._details(run), live.run_row(run), live.log_text(run), live.progress_html(run)


def test_a_run_without_a_readable_job_json_is_listed_as_damaged_and_can_be_deleted(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    ids = [wait_for(runner, runner.submit({"max_train_steps": 1}, images), {"done"}).id for _ in range(3)]
    (runner.run_dir(ids[0]) / "job.json").unlink()
    (runner.run_dir(ids[1]) / "job.json").write_bytes(b"\xff\xfe not json")
    runs = {r.id: r for r in runner.list_runs()}
    assert set(runs) == set(ids), "no run disappears from the list"
    for run_id in ids[:2]:
        assert runs[run_id].status == "damaged" and "job.json" in runs[run_id].error
        status = live.run_row(runs[run_id])[live.RUN_COLUMNS.index("status")]
        assert "damaged" in status or "damaged" in live.status_line(runs[run_id])
        runner.delete(run_id)
    assert [r.id for r in runner.list_runs()] == [ids[2]]
    with pytest.raises(JobError):
        runner.resume(ids[2])  # done: nothing to resume, and no damage done by asking


def class_cache(runs):
    """The class-image cache as a run on the demo model leaves it in the runs folder."""
    from trainers.data import class_cache_dir

    folder = class_cache_dir(runs, "demo", "a shape", 64)
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"png")
    return folder


def test_the_class_image_cache_is_never_a_run(tmp_path, images):
    """Issue 39, item 2: the cache every run of one model and class prompt shares is neither listed
    (Runs table, the Train tab's run list) nor opened, resumed or deleted as a run, by the service
    or the Runs tab's delete handler; the cache stays whole."""
    import gradio as gr

    from webui import train_tab

    runner = make_runner(tmp_path / "runs")
    cache = class_cache(runner.runs_dir)
    run = wait_for(runner, runner.submit({"max_train_steps": 1}, images), {"done"}).id
    assert runner.run_ids() == [run] and [r.id for r in runner.list_runs()] == [run]
    rows, ids, *_ = runs_tab.view(runner, "class-images", None, shared=False)
    assert ids == [run] and [row[0] for row in rows] == [run]
    assert [v for _, v in train_tab._run_choices(runner)] == [run]
    for action in (runner.info, runner.delete, runner.resume, runner.cancel, runner.run_dir):
        with pytest.raises(JobError, match="no run"):
            action("class-images")
    with gr.Blocks() as demo:
        with gr.Tab("Runs") as tab:
            runs_tab.build(runner, None, tab, gr.State(None))
    delete = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "do_delete")
    with pytest.raises(gr.Error, match="no run"):
        delete("class-images", None)
    assert sorted(p.name for p in cache.iterdir()) == ["0.png", "1.png", "2.png"]
    delete(run, None)
    assert runner.run_ids() == [] and cache.is_dir()


def test_event_lines_are_read_in_bounded_pieces(tmp_path):
    (tmp_path / EVENTS_FILE).write_bytes(b'{"t": 1, "event": "phase", "phase": "queued"}\n' + b"x" * (8 << 20) + b"\n" + DEEP
                                         + b'{"t": 2, "event": "phase", "phase": "loading"}\n')
    events, skipped = scan_events(tmp_path)
    assert [e["phase"] for e in events] == ["queued", "loading"] and skipped == 2


# -- resume after a damaged checkpoint (the trainer on a tiny pipeline) ---------------------------------


def checkpoint(folder, step, damage=None):
    """A checkpoint folder as accelerate and the trainer write one (tiny), damaged as named."""
    import numpy as np
    from safetensors.numpy import save_file

    path = folder / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": np.ones((64, 64), dtype=np.float32)}, str(path / "tuner_state.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (path / name).write_bytes(b"state")
    if damage == "an empty folder":
        [p.unlink() for p in path.iterdir()]
    elif damage == "a truncated tuner state":
        (path / "tuner_state.safetensors").write_bytes((path / "tuner_state.safetensors").read_bytes()[:200])
    elif damage == "an empty optimizer state":
        (path / "optimizer.bin").write_bytes(b"")
    return path


@pytest.mark.parametrize("damage", ["an empty folder", "a truncated tuner state", "an empty optimizer state"])
def test_a_checkpoint_that_is_not_whole_is_skipped_and_named(damage, tmp_path, images):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4, damage)
    notes = []
    assert dreambooth.find_checkpoint(tmp_path, "latest", notes.append).name == "checkpoint-2"
    assert len(notes) == 1 and notes[0].startswith("checkpoint-4 cannot be resumed from")
    # the studio offers resume from the one that is whole
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 400, "checkpointing_steps": 1000, "fake_step_seconds": 0.02}, images)
    runner.cancel(run_id)
    run = runner.run_dir(run_id)
    events = [json.dumps({"t": 1, "event": "checkpoint", "step": s, "path": f"checkpoints/checkpoint-{s}"}) for s in (2, 4)]
    checkpoint(run, 2)
    checkpoint(run, 4, damage)
    with open(run / EVENTS_FILE, "a") as f:
        f.write("\n".join(events) + "\n")
    assert runner.info(run_id).checkpoint == "checkpoints/checkpoint-2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 3 steps on the tiny pipeline with checkpoints at steps 1 and 2."""
    from tests.test_trainer import argv, build_tiny, make_images

    root = tmp_path_factory.mktemp("resume")
    model, images, out = build_tiny(root / "tiny"), make_images(root / "images"), root / "run"
    assert dreambooth.main(argv(model, images, out, "--max_train_steps", 3, "--checkpointing_steps", 1)) == 0
    return model, images, out


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(trained, tmp_path):
    """A checkpoint that looks whole but does not load (its optimizer state is garbage): the
    trainer names it and resumes from the one before, to the end."""
    import shutil

    from tests.test_trainer import argv
    from trainers.events import read_events

    model, images, source = trained
    out = tmp_path / "run"
    shutil.copytree(source, out)
    (out / "checkpoints" / "checkpoint-2" / "optimizer.bin").write_bytes(b"\x80\x04garbage, not a pickle of anything")
    assert dreambooth.main(argv(model, images, out, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")) == 0
    events = read_events(out)
    resumed = [e for e in events if "resumed_from" in e]
    assert resumed and resumed[-1]["resumed_from"].endswith("checkpoint-1"), "the older, whole checkpoint"
    assert any("checkpoint-2 cannot be resumed from" in e.get("message", "") for e in events), "named in the log"
    assert events[-1]["phase"] == "done"
    for kept in (out / "checkpoints").iterdir():  # none loads: a message, not a traceback
        (kept / "optimizer.bin").write_bytes(b"\x80\x04garbage")
    assert dreambooth.main(argv(model, images, out, "--max_train_steps", 5, "--resume_from_checkpoint", "latest")) == 2
    assert "cannot resume: no checkpoint loads (checkpoint-" in read_events(out)[-1]["error"]
