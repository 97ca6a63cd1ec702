"""Shared mode: one visitor cannot become another (issue 13, items 1-3; what the file routes serve
and what the page holds: test_routes.py)."""

import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

import webui
from tests.test_jobs import make_runner, wait_for
from trainers.service.jobs import JobError
from webui import visitors

SLOW = {"method": "res-tuning", "max_train_steps": 400, "fake_step_seconds": 0.05}


def fetch(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_what_a_run_stores_is_not_the_secret_a_visitor_proves(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    secret, owner = webui.identify(None)
    assert webui.identify(secret) == (secret, owner), "a browser that remembers its secret is the same visitor"
    run_id = runner.submit({"max_train_steps": 1}, images, owner=owner)
    wait_for(runner, run_id, {"done"})
    stored = "".join(p.read_text(errors="replace") for p in runner.run_dir(run_id).rglob("*") if p.is_file())
    assert secret not in stored
    # a visitor who read the owner id somewhere and sends it as their stored identity
    forged_secret, forged_owner = webui.identify(runner.info(run_id).owner)
    assert forged_owner != owner and forged_secret != owner
    assert visitors.visible_runs(runner, forged_owner) == []
    with pytest.raises(JobError, match="no run"):
        visitors.controlled(runner, run_id, forged_owner)


def test_a_shared_studio_refuses_runs_that_belong_to_no_visitor(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    with pytest.raises(JobError, match="belongs to a visitor"):
        runner.submit(SLOW, images, owner="")
    tuner = tmp_path / "t.safetensors"
    tuner.write_bytes(b"")
    with pytest.raises(JobError, match="belongs to a visitor"):
        runner.import_tuner(tuner, {"method": "lora"}, owner="")
    assert runner.run_ids() == []
    local = make_runner(tmp_path / "local")
    assert local.submit({"max_train_steps": 1}, images, owner=""), "a local studio has one user and no ids"


def test_parallel_submissions_from_many_clients_keep_every_limit(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    owners = [webui.identify(None)[1] for _ in range(5)] + [""]
    start = threading.Barrier(len(owners) * 4)

    def submit(owner):
        start.wait()
        try:
            runner.submit(SLOW, images, owner=owner)
        except JobError:
            pass

    threads = [threading.Thread(target=submit, args=(owner,)) for owner in owners for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = runner.list_runs()
    try:
        assert sorted(r.owner for r in runs) == sorted(o for o in owners[:5] for _ in range(2))
    finally:
        for r in runs:
            runner.cancel(r.id)
