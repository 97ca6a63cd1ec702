"""trainers.service.limits, case by case (its module docstring and docs/space.md, "Caps", are the
contract): what an unset, `0`, `off` or malformed variable means for every cap, which cap a shared
studio may not turn off, what applies to a local studio; and each check at one below, at and one
above its cap: runs per visitor (a comparison counts as all its runs), runs in all, disk per
visitor (runs and rendered pictures) and in all, imports (and an imported file's own size), the
step cap and the checkpoints a run keeps."""

import dataclasses
import os
from pathlib import Path

import pytest

from trainers.service import limits
from trainers.service.jobs import JobError, JobRunner, RunInfo

ALICE, BOB = "a" * 64, "b" * 64
VARIABLES = [(field, var, unit) for field, (var, unit) in limits.ENV.items()]


class Runner:
    """What the checks read of the job runner: its caps, its folder and its runs."""

    def __init__(self, runs_dir: Path, lim: limits.Limits, runs=()):
        self.limits, self.runs_dir, self.runs = lim, runs_dir, list(runs)

    def list_runs(self):
        return list(self.runs)

    @property
    def max_active_per_owner(self):
        return self.limits.runs_per_owner


def run(tmp_path, owner, status="running", imported=False, size=0, name=None):
    """A run of `owner` whose folder holds `size` bytes."""
    name = name or f"run-{len(list(tmp_path.glob('run-*')))}"
    path = tmp_path / name
    path.mkdir(parents=True, exist_ok=True)
    if size:
        (path / "tuner.safetensors").write_bytes(b"\1" * size)
    return RunInfo(id=name, dir=path, status=status, phase=None, owner=owner, imported=imported)


# -- what the variables mean -----------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_unset_variables_leave_the_studios_defaults(shared):
    assert limits.from_env(shared, {}) == (limits.SHARED if shared else limits.LOCAL)
    assert limits.from_env(shared, {var: "  " for _, var, _ in VARIABLES}) == (limits.SHARED if shared else limits.LOCAL)


def test_the_defaults_are_the_documented_ones():
    s, GB, MB = limits.SHARED, limits.GB, limits.MB
    assert (s.runs_per_owner, s.queued_total, s.max_steps, s.max_run_seconds, s.checkpoints_kept) == (2, 8, 3000, 3600, 2)
    assert (s.disk_per_owner, s.disk_total, s.min_free_disk) == (5 * GB, 50 * GB, 256 * MB)
    assert (s.imports_per_owner, s.imports_total, s.upload_per_client, s.upload_total) == (10, 200, 1024 * MB, 8192 * MB)
    local = limits.LOCAL
    assert dataclasses.asdict(local) == {**{f: None for f in limits.ENV}, "checkpoints_kept": 3, "min_free_disk": 256 * MB}
    assert s.shared and not local.shared


@pytest.mark.parametrize(("field", "var", "unit"), VARIABLES)
@pytest.mark.parametrize("text", ["1", "2", "7", "0.5", " 3 ", "1e3"])
def test_a_number_sets_a_cap_in_its_unit(field, var, unit, text):
    lim = limits.from_env(True, {var: text})
    assert getattr(lim, field) == int(float(text) * unit)
    expected = {"max_run_seconds": 60, "disk_per_owner": limits.GB, "disk_total": limits.GB, "min_free_disk": limits.MB,
                "upload_per_client": limits.MB, "upload_total": limits.MB}.get(field, 1)
    assert unit == expected, f"{var}'s unit"


OFF = ["0", "0.0", "off", "OFF", " Off ", "none"]


@pytest.mark.parametrize(("field", "var", "unit"), [v for v in VARIABLES if v[0] != "runs_per_owner"])
@pytest.mark.parametrize("text", OFF)
@pytest.mark.parametrize("shared", [True, False])
def test_0_or_off_turns_a_cap_off(field, var, unit, text, shared):
    assert getattr(limits.from_env(shared, {var: text}), field) == (0 if field == "min_free_disk" else None)


@pytest.mark.parametrize("text", OFF)
def test_a_shared_studio_may_not_turn_off_its_runs_per_visitor(text):
    with pytest.raises(ValueError, match="a shared studio needs a limit of runs per visitor"):
        limits.from_env(True, {"RESTUNING_RUNS_PER_VISITOR": text})
    with pytest.raises(ValueError, match="a shared studio needs a limit of runs per visitor"):
        limits.from_env(True, {}, runs_per_owner=0)  # --runs-per-visitor 0


@pytest.mark.parametrize("given", [1, 2, 5])
def test_the_runs_per_visitor_flag_overrides_the_variable(given):
    assert limits.from_env(True, {"RESTUNING_RUNS_PER_VISITOR": "4"}, runs_per_owner=given).runs_per_owner == given
    assert limits.from_env(True, {"RESTUNING_RUNS_PER_VISITOR": "4"}, runs_per_owner=None).runs_per_owner == 4


@pytest.mark.parametrize("text", ["1", "2", "off", "0"])
def test_a_local_studio_has_one_user_whatever_the_runs_per_visitor_says(text):
    """A per-visitor cap would make every run of the local user, who has no visitor id, refused."""
    lim = limits.from_env(False, {"RESTUNING_RUNS_PER_VISITOR": text})
    assert lim.runs_per_owner is None and not lim.shared


@pytest.mark.parametrize(("field", "var", "unit"), VARIABLES)
@pytest.mark.parametrize("text", ["-1", "-0.5", "x", "1 GB", "nan", "inf", "1e30", "2,5"])
def test_a_malformed_or_negative_value_is_refused_naming_its_variable(field, var, unit, text):
    with pytest.raises(ValueError, match=var):
        limits.from_env(True, {var: text})


@pytest.mark.parametrize("given", [-1, -5])
def test_a_negative_runs_per_visitor_flag_is_refused(given):
    with pytest.raises(ValueError, match="RESTUNING_RUNS_PER_VISITOR .or its flag. must be a number from 0 up"):
        limits.from_env(True, {}, runs_per_owner=given)


# -- runs queued or running --------------------------------------------------------------------------

CAPS = dataclasses.replace(limits.SHARED, runs_per_owner=2, queued_total=4, disk_per_owner=None, disk_total=None)


@pytest.mark.parametrize(("mine", "batch", "refused"), [
    (0, 1, None), (1, 1, None), (2, 1, "you have 2 run"),  # one below, at, one above the cap
    (0, 2, None), (1, 2, "you have 1 run"),  # a comparison of 2 counts as 2 runs
    (0, 3, "3 runs at once are more than the 2"),  # a comparison larger than the cap, refused whole
    (2, 0, None),
])
def test_runs_per_visitor(tmp_path, mine, batch, refused):
    runs = [run(tmp_path, ALICE) for _ in range(mine)] + [run(tmp_path, BOB)]  # bob's run is not alice's
    runner = Runner(tmp_path, CAPS, runs)
    if refused:
        with pytest.raises(JobError, match=refused):
            limits.check_new_runs(runner, ALICE, batch)
    else:
        limits.check_new_runs(runner, ALICE, batch)


@pytest.mark.parametrize(("status", "counts"), [("queued", True), ("running", True), ("done", False), ("failed", False),
                                                ("cancelled", False), ("damaged", False)])
def test_only_queued_and_running_runs_count(tmp_path, status, counts):
    runner = Runner(tmp_path, CAPS, [run(tmp_path, ALICE, status) for _ in range(2)])
    if counts:
        with pytest.raises(JobError, match="you have 2 run"):
            limits.check_new_runs(runner, ALICE)
    else:
        limits.check_new_runs(runner, ALICE)


@pytest.mark.parametrize(("active", "batch", "refused"), [(3, 1, False), (4, 1, True), (5, 1, True), (2, 2, False),
                                                          (3, 2, True), (0, 4, False), (0, 5, True)])
def test_runs_in_all(tmp_path, active, batch, refused):
    lim = dataclasses.replace(CAPS, runs_per_owner=8)
    runner = Runner(tmp_path, lim, [run(tmp_path, f"{i:064x}") for i in range(active)] + [run(tmp_path, BOB, "done")])
    if refused:
        with pytest.raises(JobError, match=f"the studio's queue is full: {active} runs are queued or running, 4 at most"):
            limits.check_new_runs(runner, ALICE, batch)
    else:
        limits.check_new_runs(runner, ALICE, batch)


def test_a_cap_that_is_off_counts_nothing(tmp_path):
    runner = Runner(tmp_path, limits.LOCAL, [run(tmp_path, "") for _ in range(20)])
    limits.check_new_runs(runner, "", batch=10)
    runner.limits = dataclasses.replace(CAPS, queued_total=None, runs_per_owner=25)
    limits.check_new_runs(runner, ALICE, batch=5)


# -- disk ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("margin", "refused"), [(1, False), (0, True), (-1, True)])
def test_disk_in_all_is_refused_at_its_cap(tmp_path, margin, refused):
    """A new run or import is refused once the runs folder holds its cap (the cap one byte above
    what it holds, at it, one byte below)."""
    runs = [run(tmp_path, BOB, "done", size=100_000)]
    used = limits.folder_bytes(tmp_path)
    runner = Runner(tmp_path, dataclasses.replace(CAPS, disk_total=used + margin), runs)
    if refused:
        with pytest.raises(JobError, match="the studio's runs hold"):
            limits.check_new_runs(runner, ALICE)
    else:
        limits.check_new_runs(runner, ALICE)


def scratch(tmp_path, owner, size):
    """Pictures the studio rendered for `owner` (webui.visitors.scratch_dir)."""
    folder = tmp_path / limits.SCRATCH / owner / "compare"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"grid-{size}.png").write_bytes(b"\1" * size)


@pytest.mark.parametrize("held", ["runs", "pictures", "both"])
@pytest.mark.parametrize(("margin", "refused"), [(1, False), (0, True), (-1, True)])
def test_disk_per_visitor_counts_their_runs_and_rendered_pictures(tmp_path, held, margin, refused):
    runs = [run(tmp_path, BOB, "done", size=300_000)]  # another visitor's, not counted
    scratch(tmp_path, BOB, 300_000)
    if held in ("runs", "both"):
        runs.append(run(tmp_path, ALICE, "done", size=100_000))
    if held in ("pictures", "both"):
        scratch(tmp_path, ALICE, 70_000)
    runner = Runner(tmp_path, CAPS, runs)
    mine = limits.owner_bytes(runner, ALICE)
    own_runs = sum(limits.folder_bytes(r.dir) for r in runs if r.owner == ALICE)
    pictures = limits.folder_bytes(tmp_path / limits.SCRATCH / ALICE) if held != "runs" else 0
    assert mine == own_runs + pictures and mine >= 70_000
    runner.limits = dataclasses.replace(CAPS, disk_per_owner=mine + margin)
    if refused:
        with pytest.raises(JobError, match="your runs and pictures hold"):
            limits.check_new_runs(runner, ALICE)
    else:
        limits.check_new_runs(runner, ALICE)
    limits.check_new_runs(Runner(tmp_path, runner.limits, runs), BOB.replace("b", "c"))  # a third visitor holds nothing


def test_a_visitor_without_an_id_has_no_disk_share_to_check(tmp_path):
    runner = Runner(tmp_path, dataclasses.replace(CAPS, disk_per_owner=1), [run(tmp_path, "", "done", size=10_000)])
    limits.check_disk(runner, "")  # a local studio's runs belong to no visitor


def test_folder_bytes_counts_files_and_folders_but_follows_no_link(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"\1" * 10_000)
    (tmp_path / "a" / "b" / "two").write_bytes(b"\1" * 20_000)
    big = tmp_path / "elsewhere"
    big.mkdir()
    (big / "big").write_bytes(b"\1" * 200_000)
    (tmp_path / "a" / "link-to-file").symlink_to(big / "big")
    (tmp_path / "a" / "link-to-folder").symlink_to(big)
    blocks = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "a" / "one", tmp_path / "a" / "b" / "two"))
    assert limits.folder_bytes(tmp_path / "a") == blocks >= 30_000
    assert limits.folder_bytes(tmp_path / "missing") == 0


# -- imports ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mine", "refused"), [(1, False), (2, True), (3, True)])
def test_imports_per_visitor(tmp_path, mine, refused):
    runs = ([run(tmp_path, ALICE, "done", imported=True) for _ in range(mine)]
            + [run(tmp_path, ALICE, "done"), run(tmp_path, BOB, "done", imported=True)])  # a trained run, bob's import
    runner = Runner(tmp_path, dataclasses.replace(CAPS, imports_per_owner=2, imports_total=10), runs)
    if refused:
        with pytest.raises(JobError, match=f"you have imported {mine} tuners, the 2"):
            limits.check_import(runner, ALICE, 0)
    else:
        limits.check_import(runner, ALICE, 0)


@pytest.mark.parametrize(("held", "refused"), [(2, False), (3, True), (4, True)])
def test_imports_in_all(tmp_path, held, refused):
    runs = [run(tmp_path, f"{i:064x}", "done", imported=True) for i in range(held)] + [run(tmp_path, BOB, "done")]
    runner = Runner(tmp_path, dataclasses.replace(CAPS, imports_per_owner=10, imports_total=3), runs)
    if refused:
        with pytest.raises(JobError, match=f"holds {held} imported tuners"):
            limits.check_import(runner, ALICE, 0)
    else:
        limits.check_import(runner, ALICE, 0)


@pytest.mark.parametrize(("margin", "refused"), [(1, False), (0, False), (-1, True)])
def test_an_imported_files_own_size_counts_against_the_visitors_disk(tmp_path, margin, refused):
    """The file is not in the runs folder yet: what the visitor holds plus its size must fit."""
    runs = [run(tmp_path, ALICE, "done", size=50_000)]
    runner = Runner(tmp_path, CAPS, runs)
    held, size = limits.owner_bytes(runner, ALICE), 40_000
    runner.limits = dataclasses.replace(CAPS, disk_per_owner=held + size + margin)
    if refused:
        with pytest.raises(JobError, match="this file .* would take your runs past"):
            limits.check_import(runner, ALICE, size)
    else:
        limits.check_import(runner, ALICE, size)


def test_an_import_is_refused_when_the_disk_is_at_its_cap_already(tmp_path):
    runs = [run(tmp_path, ALICE, "done", size=50_000)]
    runner = Runner(tmp_path, CAPS, runs)
    runner.limits = dataclasses.replace(CAPS, disk_total=limits.folder_bytes(tmp_path))
    with pytest.raises(JobError, match="the studio's runs hold"):
        limits.check_import(runner, BOB, 0)


def test_imports_of_a_local_studio_are_not_capped(tmp_path):
    runs = [run(tmp_path, "", "done", imported=True, size=10_000) for _ in range(30)]
    limits.check_import(Runner(tmp_path, limits.LOCAL, runs), "", 1 << 40)


# -- a run's config: steps and checkpoints (trainers.service.jobs.JobRunner.check_config) -----------------------

@pytest.mark.parametrize(("steps", "refused"), [(2999, False), (3000, False), (3001, True), (1_000_000, True)])
def test_the_step_cap(tmp_path, steps, refused):
    runner = Runner(tmp_path, limits.SHARED)
    if refused:
        with pytest.raises(JobError, match=f"max_train_steps {steps:,} is over the 3,000 steps"):
            JobRunner.check_config(runner, {"max_train_steps": steps})
    else:
        assert JobRunner.check_config(runner, {"max_train_steps": steps})["max_train_steps"] == steps
    JobRunner.check_config(Runner(tmp_path, limits.LOCAL), {"max_train_steps": steps})  # a local studio: no cap


@pytest.mark.parametrize(("shared", "asked", "kept", "refused"), [
    (True, None, 2, False), (True, 1, 1, False), (True, 2, 2, False), (True, 3, None, True),
    (False, None, 3, False), (False, 3, 3, False), (False, 50, 50, False),  # a local studio's default is no maximum
])
def test_checkpoints_kept(tmp_path, shared, asked, kept, refused):
    runner = Runner(tmp_path, limits.SHARED if shared else limits.LOCAL)
    config = {} if asked is None else {"checkpoints_total_limit": asked}
    if refused:
        with pytest.raises(JobError, match=f"checkpoints_total_limit {asked} is over the 2 checkpoints"):
            JobRunner.check_config(runner, config)
    else:
        assert JobRunner.check_config(runner, config)["checkpoints_total_limit"] == kept


def test_checkpoints_kept_off_leaves_a_run_its_own_choice(tmp_path):
    runner = Runner(tmp_path, dataclasses.replace(limits.SHARED, checkpoints_kept=None))
    assert "checkpoints_total_limit" not in JobRunner.check_config(runner, {})
    assert JobRunner.check_config(runner, {"checkpoints_total_limit": 99})["checkpoints_total_limit"] == 99


@pytest.mark.parametrize(("free", "floor", "refused"), [(1000, 999, False), (1000, 1000, False), (1000, 1001, True),
                                                        (0, 0, False)])
def test_the_free_disk_floor_holds_for_every_studio(tmp_path, monkeypatch, free, floor, refused):
    import shutil

    from trainers.service import jobs

    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    for lim in (limits.SHARED, limits.LOCAL):
        runner = Runner(tmp_path, dataclasses.replace(lim, min_free_disk=floor))
        if refused:
            with pytest.raises(JobError, match="less than the"):
                JobRunner.check_free_disk(runner)
        else:
            JobRunner.check_free_disk(runner)
