"""Runs that survive a bad line (issue 13, item 8): a malformed line of one run's events.jsonl is
skipped and counted, and neither the Runs tab, the scheduler nor Train stops on it."""

import json

from tests.test_jobs import make_runner, wait_for
from trainers.events import EVENTS_FILE, EventLog, scan_events
from webui import live, runs_tab

BAD_LINES = [b"[1, 2, 3]\n", b'"just a string"\n', b'{"t": 1, "event": "step", "step": 1, "total": 2, "loss": "low"}\n',
             b'{"t": 1, "event": "\xff\xfe"}\n', b'{"t": 1, "event": "phase", "phase": ["done"]}\n',
             b'{"t": 1, "event": "sample", "step": 1, "paths": "samples/a.png"}\n', b"{not json\n", b"42\n"]


def spoil(run_dir, lines=BAD_LINES):
    with open(run_dir / EVENTS_FILE, "ab") as f:
        f.writelines(lines)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    log = EventLog(tmp_path)
    log.phase("training")
    spoil(tmp_path)
    log.emit("step", step=2, total=2, loss=0.5, lr=1e-4, sec_per_step=0.1, eta_sec=0.0)
    with open(tmp_path / EVENTS_FILE, "ab") as f:
        f.write(b'{"t": 1, "event": "st')  # a writer mid-append: not counted
    events, skipped = scan_events(tmp_path)
    assert [e["event"] for e in events] == ["phase", "step"]
    assert skipped == len(BAD_LINES)


def test_one_runs_bad_file_stops_neither_the_listing_nor_the_queue_nor_a_new_run(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    spoiled = wait_for(runner, runner.submit({"max_train_steps": 2}, images, label="spoiled"), {"done"})
    spoil(spoiled.dir)
    (spoiled.dir / "job.json").write_text(json.dumps(["not", "an", "object"]))
    damaged = runner.submit({"max_train_steps": 2}, images, label="damaged")
    (runner.run_dir(damaged) / "config.json").write_text('"a string"')
    queued = runner.submit({"max_train_steps": 2}, images, label="fine")  # Train works beside them
    assert wait_for(runner, queued, {"done"}).status == "done", "the scheduler kept starting runs"
    runs = {r.id: r for r in runner.list_runs()}
    assert runs[spoiled.id].skipped_events == len(BAD_LINES) and runs[spoiled.id].status == "damaged"  # its job.json
    for info in runs.values():  # every view of the Runs and Train tabs renders each run
        runs_tab._details(info), live.run_row(info), live.progress_html(info), live.loss_frame(info)
        live.samples(info), live.log_text(info)
    assert f"{len(BAD_LINES)} malformed line(s) skipped" in runs_tab._details(runs[spoiled.id])
