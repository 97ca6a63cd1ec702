"""webui.visitors, case by case (its docstrings are the contract): who sees and who controls a
run, for each kind of visitor (the local user, a visitor without an id yet, the owner, another
visitor) and each kind of run (unowned, owned, published); what a forged or malformed id gets;
where a visitor's pictures go and when they are pruned."""

import os
from pathlib import Path

import pytest

from trainers.service.jobs import JobError, RunInfo
from webui import visitors

ALICE, BOB = (visitors.owner_id(visitors.new_secret()) for _ in range(2))


class Runner:
    """What webui.visitors reads of the job runner: its runs and its folder."""

    def __init__(self, runs_dir: Path, runs=()):
        self.runs_dir, self.runs = runs_dir, {r.id: r for r in runs}

    def list_runs(self):
        return list(self.runs.values())

    def info(self, run_id):
        if run_id not in self.runs:
            raise JobError(f"no run {run_id!r} in {self.runs_dir}")
        return self.runs[run_id]


def run(run_id, owner="", published=False):
    return RunInfo(id=run_id, dir=Path(run_id), status="done", phase="done", owner=owner, published=published)


RUNS = {"unowned": run("unowned"), "unowned-published": run("unowned-published", published=True),
        "alices": run("alices", ALICE), "alices-published": run("alices-published", ALICE, published=True)}
LOCAL, NO_ID_YET = None, ""
# (run, visitor) -> (sees, controls)
TABLE = [
    ("unowned", LOCAL, True, True), ("unowned-published", LOCAL, True, True),
    ("alices", LOCAL, True, True), ("alices-published", LOCAL, True, True),
    ("unowned", NO_ID_YET, False, False), ("unowned-published", NO_ID_YET, True, False),
    ("alices", NO_ID_YET, False, False), ("alices-published", NO_ID_YET, True, False),
    ("unowned", ALICE, False, False), ("unowned-published", ALICE, True, False),
    ("alices", ALICE, True, True), ("alices-published", ALICE, True, True),
    ("unowned", BOB, False, False), ("unowned-published", BOB, True, False),
    ("alices", BOB, False, False), ("alices-published", BOB, True, False),
]


@pytest.mark.parametrize(("run_id", "owner", "sees", "controls"), TABLE)
def test_who_sees_and_who_controls_which_run(run_id, owner, sees, controls, tmp_path):
    info, runner = RUNS[run_id], Runner(tmp_path, RUNS.values())
    assert visitors.can_see(info, owner) is sees
    assert visitors.can_control(info, owner) is controls
    assert (info in visitors.visible_runs(runner, owner)) is sees
    if sees:
        assert visitors.seen(runner, run_id, owner) is info
    else:
        with pytest.raises(JobError) as unseen:
            visitors.seen(runner, run_id, owner)
        with pytest.raises(JobError) as missing:
            visitors.seen(runner, "no-such-run", owner)
        assert str(unseen.value) == f"no run {run_id!r}"
        assert str(missing.value) == "no run 'no-such-run'", "an unknown id gets the answer an unseen one gets"
    if controls:
        assert visitors.controlled(runner, run_id, owner) is info
    else:
        with pytest.raises(JobError, match="published by another visitor" if sees else "^no run"):
            visitors.controlled(runner, run_id, owner)


@pytest.mark.parametrize("owner", [LOCAL, NO_ID_YET, ALICE])
def test_an_unknown_run_is_no_run_for_everyone_without_the_servers_path(owner, tmp_path):
    with pytest.raises(JobError) as missing:
        visitors.seen(Runner(tmp_path), "20250101-000000-x-abcd", owner)
    assert str(missing.value) == "no run '20250101-000000-x-abcd'" and str(tmp_path) not in str(missing.value)


SECRET = "0123456789abcdef" * 2


@pytest.mark.parametrize(("value", "kept"), [
    (SECRET, True), (SECRET.upper(), False), (SECRET[:-1], False), (SECRET + "0", False), (SECRET + "\n", False),
    (SECRET + "/../x", False), ("../" + SECRET, False), ("", False), (None, False), (42, False), ([SECRET], False),
    (visitors.owner_id(SECRET), False),  # an owner id sent as a secret
])
def test_only_a_well_formed_secret_is_kept(value, kept):
    assert visitors.checked_secret(value) == (value if kept else None)


def test_an_owner_id_is_the_hash_of_the_secret_never_the_secret():
    owner = visitors.owner_id(SECRET)
    assert visitors.OWNER.fullmatch(owner) and owner == visitors.owner_id(SECRET) != visitors.owner_id(SECRET[::-1])
    assert SECRET not in owner


@pytest.mark.parametrize(("owner", "folder"), [(LOCAL, "local"), (ALICE, ALICE)])
def test_a_visitors_pictures_go_to_their_own_folder_in_the_runs_folder(owner, folder, tmp_path):
    path = visitors.scratch_dir(Runner(tmp_path), owner, "compare")
    assert path == tmp_path / visitors.SCRATCH / folder / "compare" and path.is_dir()


@pytest.mark.parametrize("owner", [NO_ID_YET, "local", ALICE.upper(), ALICE[:-1], ALICE + "0", ALICE + "\n", ALICE + "/../../x",
                                   "../" + ALICE, SECRET])
def test_a_visitor_without_a_well_formed_id_gets_no_folder(owner, tmp_path):
    with pytest.raises(JobError, match="no visitor id yet"):
        visitors.scratch_dir(Runner(tmp_path), owner, "generate")
    assert not (tmp_path / visitors.SCRATCH).exists(), "nothing is made"


NOW = 1_000_000_000.0


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setattr(visitors.time, "time", lambda: NOW)


def pictures(folder: Path, ages: list[float]) -> list[Path]:
    """Files `ages` seconds old (newest first in the list's order)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, age in enumerate(ages):
        path = folder / f"p{i:04d}.png"
        path.write_bytes(b"png")
        os.utime(path, (NOW - age, NOW - age))
        out.append(path)
    return out


@pytest.mark.parametrize(("count", "kept"), [(2, 2), (3, 3), (4, 3), (6, 3)])
def test_all_but_the_newest_are_pruned(count, kept, tmp_path, clock):
    made = pictures(tmp_path, [i for i in range(count)])  # p0000 is the newest
    visitors.prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in made[:kept]]


@pytest.mark.parametrize(("age", "kept"), [(0, True), (visitors.SCRATCH_AGE - 1, True), (visitors.SCRATCH_AGE, True),
                                           (visitors.SCRATCH_AGE + 1, False), (10 * visitors.SCRATCH_AGE, False)])
def test_pictures_older_than_a_day_are_pruned(age, kept, tmp_path, clock):
    assert visitors.SCRATCH_AGE == 86400, "a day"
    (picture,) = pictures(tmp_path, [age])
    visitors.prune(tmp_path)
    assert picture.exists() is kept


def test_the_default_keeps_200_and_leaves_folders_and_links_alone(tmp_path, clock):
    assert visitors.SCRATCH_KEEP == 200
    made = pictures(tmp_path / "pics", list(range(201)))
    (tmp_path / "pics" / "a-folder").mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not the visitor's")
    (tmp_path / "pics" / "link.png").symlink_to(outside)
    visitors.prune(tmp_path / "pics")
    assert [p.exists() for p in made] == [True] * 200 + [False]
    assert (tmp_path / "pics" / "a-folder").is_dir() and (tmp_path / "pics" / "link.png").is_symlink() and outside.exists()


def test_pictures_are_pruned_each_time_a_visitors_folder_is_asked_for(tmp_path, clock):
    """Before each render: a visitor who renders all day holds at most a day's, at most 200."""
    folder = tmp_path / visitors.SCRATCH / ALICE / "generate"
    old, new = pictures(folder, [visitors.SCRATCH_AGE + 60, 60])
    assert visitors.scratch_dir(Runner(tmp_path), ALICE, "generate") == folder
    assert not old.exists() and new.exists()
    others = pictures(tmp_path / visitors.SCRATCH / BOB / "generate", [visitors.SCRATCH_AGE + 60])
    assert others[0].exists(), "another visitor's folder is pruned when theirs is asked for"


@pytest.mark.parametrize(("kept", "env", "key"), [
    (None, {}, visitors.BROWSER_STATE_KEY),
    ("an old key\n", {}, "an old key"),
    ("", {}, visitors.BROWSER_STATE_KEY),
    ("k" * 256, {}, "k" * 256),
    ("k" * 257, {}, visitors.BROWSER_STATE_KEY),
    ("an old key", {visitors.BROWSER_KEY_ENV: " from the settings "}, "from the settings"),
    (None, {visitors.BROWSER_KEY_ENV: "   "}, visitors.BROWSER_STATE_KEY),
])
def test_the_browser_state_key(kept, env, key, tmp_path):
    if kept is not None:
        (tmp_path / visitors.SCRATCH).mkdir()
        (tmp_path / visitors.SCRATCH / visitors.BROWSER_KEY_FILE).write_text(kept)
    assert visitors.browser_state_key(tmp_path, env) == key
