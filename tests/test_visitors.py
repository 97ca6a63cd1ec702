"""Many visitors on one studio: runs carry their owner, others see them only once published and
never control them, and one visitor cannot fill the queue."""

import pytest

from tests.test_jobs import images, make_runner, wait_for  # noqa: F401 (images is a fixture)
from trainers.service.jobs import JobError
from webui import visitors

ALICE, BOB = (visitors.owner_id(visitors.new_secret()) for _ in range(2))


def test_visitor_secrets_are_random_and_checked():
    secret = visitors.new_secret()
    assert secret != visitors.new_secret() and visitors.checked_secret(secret) == secret
    assert ALICE != BOB and visitors.OWNER.match(ALICE)
    for bad in (None, "", "../x", "A" * 32, 42, ALICE):
        assert visitors.checked_secret(bad) is None


def test_each_visitor_sees_and_controls_only_their_own_runs(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    mine = runner.submit({"method": "res-tuning", "max_train_steps": 400, "fake_step_seconds": 0.05}, images, owner=ALICE)
    assert [r.id for r in visitors.visible_runs(runner, ALICE)] == [mine]
    assert visitors.visible_runs(runner, BOB) == [] and visitors.visible_runs(runner, "") == []
    assert [r.id for r in visitors.visible_runs(runner, None)] == [mine], "a local studio shows every run"
    with pytest.raises(JobError, match="no run"):
        visitors.controlled(runner, mine, BOB)
    runner.publish(mine)
    assert [r.id for r in visitors.visible_runs(runner, BOB)] == [mine]
    with pytest.raises(JobError, match="published by another visitor"):
        visitors.controlled(runner, mine, BOB)
    assert visitors.controlled(runner, mine, ALICE).owner == ALICE
    runner.cancel(mine)
    wait_for(runner, mine, {"cancelled"})


def test_one_visitor_cannot_fill_the_queue(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    slow = {"method": "res-tuning", "max_train_steps": 400, "fake_step_seconds": 0.05}
    first = [runner.submit(slow, images, owner=ALICE) for _ in range(2)]
    with pytest.raises(JobError, match="allows 2 per visitor"):
        runner.submit(slow, images, owner=ALICE)
    with pytest.raises(JobError, match="3 runs at once are more than the 2 a visitor may have"):
        runner.submit(slow, images, owner=BOB, batch=3)
    other = runner.submit(slow, images, owner=BOB)
    assert runner.info(other).status in ("queued", "running")
    assert len(runner.run_ids()) == 3
    for run_id in [*first, other]:
        runner.cancel(run_id)
    for run_id in [*first, other]:
        wait_for(runner, run_id, {"cancelled"})
    again = runner.submit(slow, images, owner=ALICE)  # finished runs no longer count
    runner.cancel(again)
    wait_for(runner, again, {"cancelled"})


def test_run_ids_of_a_shared_studio_are_unguessable(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=3, unguessable_ids=True)
    run_id = runner.submit({"max_train_steps": 2}, images, owner=ALICE)
    assert len(run_id.rsplit("-", 1)[1]) == 16, "64 random bits in the id"
    wait_for(runner, run_id, {"done"})
    assert len(make_runner(tmp_path / "local").new_run_dir("x")[0].rsplit("-", 1)[1]) == 4, "local ids unchanged"
