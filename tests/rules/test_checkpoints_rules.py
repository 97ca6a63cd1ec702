"""trainers.checkpoints' one ordering of checkpoints, case by case at its edges: a name is a
checkpoint only as checkpoint-<ASCII digits>, "latest" is the highest step (not the last name),
and the trainer's rotation (--checkpoints_total_limit) and resume use the same order."""

import pytest
from safetensors.numpy import save_file
import numpy

from trainers import checkpoints, dreambooth
from trainers.events import EventLog
from trainers.options import OptionError


@pytest.mark.parametrize("name, step", [
    ("checkpoint-0", 0), ("checkpoint-7", 7), ("checkpoint-99", 99), ("checkpoint-100", 100), ("checkpoint-1000", 1000),
    ("checkpoint-007", 7),
    ("checkpoint-", -1), ("checkpoint", -1), ("checkpoint--1", -1), ("checkpoint-+5", -1), ("checkpoint- 5", -1),
    ("checkpoint-1_000", -1), ("checkpoint-5.tmp", -1), (".checkpoint-5.tmp", -1), ("checkpoint-latest", -1),
    ("checkpoint-\u0665", -1), ("checkpoint-\u00b2", -1), ("Checkpoint-5", -1), ("xcheckpoint-5", -1), ("step-5", -1),
])
def test_step_of_reads_only_checkpoint_dash_ascii_digits(name, step):
    assert checkpoints.step_of(name) == step


@pytest.mark.parametrize("names, order", [
    (["checkpoint-1000", "checkpoint-900"], ["checkpoint-900", "checkpoint-1000"]),
    (["checkpoint-100", "checkpoint-99", "checkpoint-1000"], ["checkpoint-99", "checkpoint-100", "checkpoint-1000"]),
    (["checkpoint-10", "checkpoint-9", "checkpoint-latest", "notes", "checkpoint-1_000"], ["checkpoint-9", "checkpoint-10"]),
    (["checkpoint-2"], ["checkpoint-2"]),
    ([], []),
])
def test_ordered_is_by_step_number_not_by_name_and_leaves_odd_names_out(names, order):
    assert [p.name for p in checkpoints.ordered(names)] == order


def whole(run, step_or_name):
    name = step_or_name if isinstance(step_or_name, str) else f"checkpoint-{step_or_name}"
    path = run / checkpoints.CHECKPOINTS / name
    path.mkdir(parents=True)
    save_file({"w": numpy.zeros(1, dtype=numpy.float32)}, str(path / checkpoints.TUNER_STATE))
    return path


@pytest.mark.parametrize("steps, latest", [([900, 1000], 1000), ([99, 100], 100), ([99, 100, 1000], 1000),
                                           ([9, 10], 10), ([2], 2)])
def test_latest_is_the_highest_step(tmp_path, steps, latest):
    for step in steps:
        whole(tmp_path, step)
    assert checkpoints.newest(tmp_path).name == f"checkpoint-{latest}"
    assert dreambooth.find_checkpoint(tmp_path, "latest").name == f"checkpoint-{latest}"
    assert [p.name for p in checkpoints.found(tmp_path)] == [f"checkpoint-{s}" for s in sorted(steps, reverse=True)]


def test_found_skips_odd_names_files_and_symlinks(tmp_path):
    whole(tmp_path, 5)
    whole(tmp_path, "checkpoint-1_000")
    whole(tmp_path, "checkpoint-latest")
    (tmp_path / checkpoints.CHECKPOINTS / "checkpoint-50").write_text("a file, not a folder")
    (tmp_path / checkpoints.CHECKPOINTS / "checkpoint-60").symlink_to(whole(tmp_path / "elsewhere", 60))
    assert [p.name for p in checkpoints.found(tmp_path)] == ["checkpoint-5"]
    assert checkpoints.newest(tmp_path).name == "checkpoint-5"
    assert checkpoints.found(tmp_path / "no-run") == [] and checkpoints.newest(tmp_path / "no-run") is None


def test_a_named_checkpoint_must_be_a_checkpoint_name_and_the_error_lists_them_by_step(tmp_path):
    for step in (1000, 99, 100):
        whole(tmp_path, step)
    whole(tmp_path, "checkpoint-1_000")
    assert dreambooth.find_checkpoint(tmp_path, "checkpoint-99").name == "checkpoint-99"
    with pytest.raises(OptionError, match=r"\(checkpoint-99, checkpoint-100, checkpoint-1000\)"):
        dreambooth.find_checkpoint(tmp_path, "checkpoint-1_000")


class FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True)
        save_file({"w": numpy.zeros(1, dtype=numpy.float32)}, str(Path(path) / checkpoints.TUNER_STATE))


@pytest.mark.parametrize("existing, step, limit, kept", [
    ([99, 100], 1000, 2, [100, 1000]),      # 99 is the oldest, though "checkpoint-99" sorts last by name
    ([900], 1000, 1, [1000]),
    ([900], 1000, 2, [900, 1000]),          # at the limit: nothing removed
    ([8, 9], 10, 3, [8, 9, 10]),
    ([8, 9], 10, 2, [9, 10]),               # one over: the oldest goes
    ([8, 9], 10, None, [8, 9, 10]),         # no limit: all kept
    ([100, 200], 300, 2, [200, 300]),
])
def test_rotation_keeps_the_newest_by_step_and_never_touches_odd_names(tmp_path, existing, step, limit, kept):
    for s in existing:
        whole(tmp_path, s)
    odd = [whole(tmp_path, "checkpoint-1_000"), whole(tmp_path, "checkpoint-+5"), whole(tmp_path, "checkpoint-latest")]
    dreambooth.save_checkpoint(FakeAccelerator(), tmp_path, step, limit, EventLog(tmp_path))
    assert [p.name for p in checkpoints.found(tmp_path)] == [f"checkpoint-{s}" for s in sorted(kept, reverse=True)]
    assert all(p.is_dir() for p in odd)


class Loading:
    """accelerate's load_state, failing on the checkpoints named."""

    def __init__(self, failing):
        self.failing, self.tried = set(failing), []

    def load_state(self, path):
        from pathlib import Path

        self.tried.append(Path(path).name)
        if Path(path).name in self.failing:
            raise RuntimeError("damaged")


@pytest.mark.parametrize("first, failing, tried, loaded", [
    (1000, [], ["checkpoint-1000"], "checkpoint-1000"),
    (1000, ["checkpoint-1000"], ["checkpoint-1000", "checkpoint-900"], "checkpoint-900"),
    (100, ["checkpoint-100"], ["checkpoint-100", "checkpoint-99"], "checkpoint-99"),   # never the newer 900 or 1000
    (900, ["checkpoint-900", "checkpoint-100"], ["checkpoint-900", "checkpoint-100", "checkpoint-99"], "checkpoint-99"),
])
def test_the_resume_fallback_tries_only_older_checkpoints_newest_first(tmp_path, first, failing, tried, loaded):
    for step in (99, 100, 900, 1000):
        whole(tmp_path, step)
    accelerator = Loading(failing)
    path = checkpoints.load(accelerator, tmp_path / "checkpoints" / f"checkpoint-{first}", tmp_path)
    assert (accelerator.tried, path.name) == (tried, loaded)


def test_without_a_fallback_folder_only_the_checkpoint_given_is_tried(tmp_path):
    for step in (1, 2):
        whole(tmp_path, step)
    accelerator = Loading(["checkpoint-2"])
    with pytest.raises(ValueError, match="checkpoint-2: RuntimeError: damaged"):
        checkpoints.load(accelerator, tmp_path / "checkpoints" / "checkpoint-2", None)
    assert accelerator.tried == ["checkpoint-2"]
