"""Issue 26, item 5: the command line (`python -m trainers.dreambooth`) writes only into a folder
it made, or with consent; every number it takes is bounded; paths are checked as paths (by
making them), so a bad one is a message, never a traceback or lost files."""

import argparse

import pytest

from trainers import dreambooth, options
from trainers.options import BOUNDS, OptionError, parse

ASSETS = options.DEMO_MODEL.parent


def base_args(images, out):
    return ["--instance_data_dir", str(images), "--instance_prompt", "a sks star", "--resolution", "64",
            "--output_dir", str(out)]


@pytest.fixture
def empty_images(tmp_path):
    """A folder of no images: a run given it fails at its first check (it never trains), so the
    tests see where the trainer writes without waiting for training."""
    folder = tmp_path / "no-images"
    folder.mkdir()
    return folder


def test_an_empty_output_dir_is_refused_and_the_current_folder_untouched(tmp_path, empty_images, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("the project's own readme")
    monkeypatch.chdir(project)
    assert dreambooth.main(base_args(empty_images, "")) == 2
    assert "--output_dir is empty" in capsys.readouterr().err
    assert sorted(p.name for p in project.iterdir()) == ["README.md"]
    assert (project / "README.md").read_text() == "the project's own readme"


def test_a_folder_of_other_files_is_written_only_with_consent(tmp_path, empty_images, capsys):
    theirs = tmp_path / "someone-elses"
    theirs.mkdir()
    (theirs / "README.md").write_text("mine")
    assert dreambooth.main(base_args(empty_images, theirs)) == 2
    err = capsys.readouterr().err
    assert "already holds files this trainer did not write (e.g. README.md)" in err and "--overwrite_output_dir" in err
    assert sorted(p.name for p in theirs.iterdir()) == ["README.md"], "not even a failure event is written there"
    assert dreambooth.main(base_args(empty_images, theirs) + ["--overwrite_output_dir"]) == 2  # consent: it runs (and fails on no images)
    assert "no images" in capsys.readouterr().err.lower()
    assert (theirs / "events.jsonl").is_file()


def test_a_run_folder_it_made_stays_its_own_to_resume_in(tmp_path, empty_images, capsys):
    out = tmp_path / "run"
    assert dreambooth.main(base_args(empty_images, out)) == 2  # made it, failed on no images
    assert (out / ".restuning-run").is_file()
    (out / "notes.txt").write_text("files beside its own are fine: it made the folder")
    assert dreambooth.main(base_args(empty_images, out) + ["--resume_from_checkpoint", "latest"]) == 2
    assert "did not write" not in capsys.readouterr().err
    studio = tmp_path / "studio-run"
    studio.mkdir()
    (studio / "config.json").write_text("{}")
    (studio / "events.jsonl").write_text("")  # a run folder made before there was a marker
    options.claim_output_dir(parse(base_args(empty_images, studio)).args)


@pytest.mark.parametrize("flag, value, message", [
    ("--output_dir", "/proc/restuning-x/y", "--output_dir /proc/restuning-x/y: cannot be created"),
    ("--output_dir", "/dev/null/run", "--output_dir /dev/null/run: /dev/null is not a folder"),
    ("--class_data_dir", "/etc/passwd", "--class_data_dir /etc/passwd is a file, not a folder"),
    ("--class_data_dir", "", "--class_data_dir is empty"),
])
def test_paths_are_checked_as_paths(flag, value, message, tmp_path, capsys):
    images = ASSETS / "concepts" / "star"
    args = base_args(images, tmp_path / "run") + ["--with_prior_preservation", "--class_prompt", "a shape", flag, value]
    assert dreambooth.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def numeric_options() -> dict[str, argparse.Action]:
    parser = options.build_parser()
    return {a.dest: a for a in parser._actions if a.type in (int, float)}


def test_every_number_the_trainer_takes_is_bounded():
    """A new numeric option fails here until it has bounds (trainers.options.BOUNDS)."""
    assert sorted(set(numeric_options()) - set(BOUNDS)) == []


@pytest.mark.parametrize("name", sorted(numeric_options()))
def test_numbers_beyond_any_run_are_refused_with_a_message(name, tmp_path):
    low, high, _ = BOUNDS[name]
    kind = numeric_options()[name].type
    extra = ["--method", "lora", "--train_text_encoder"] if name == "text_encoder_lr" else []
    for value in (high * 1000 + 1, low - 1, float("nan") if kind is float else None):
        if value is None:
            continue
        with pytest.raises(OptionError, match=f"--{name}"):
            parse(base_args("imgs", tmp_path / "run") + extra + [f"--{name}", str(kind(value) if kind is int else value)])


def test_the_tokenizer_length_of_issue_26_is_refused(tmp_path, capsys):
    for value in ("1000000000", "-5", "0"):
        assert dreambooth.main(base_args(ASSETS / "concepts" / "star", tmp_path / "run") + ["--tokenizer_max_length", value]) == 2
        err = capsys.readouterr().err
        assert "--tokenizer_max_length must be from 1 to 1,024" in err and "Traceback" not in err


def test_text_is_bounded_too(tmp_path):
    with pytest.raises(OptionError, match="--instance_prompt is 1,000,000 characters long"):
        parse(["--instance_data_dir", "x", "--instance_prompt", "x" * 1_000_000, "--output_dir", str(tmp_path / "r")])
    with pytest.raises(OptionError, match="--validation_prompt is"):
        parse(base_args("x", tmp_path / "r") + ["--validation_prompt", "ok", "y" * 5000])
    with pytest.raises(OptionError, match="--targets is longer than"):
        parse(base_args("x", tmp_path / "r") + ["--method", "lora", "--targets", ",".join(["to_q"] * 1000)])


def text_options() -> list[str]:
    """Every option that takes free text (a path, a name, a layer list): not a number, a flag or a choice."""
    return sorted(a.dest for a in options.build_parser()._actions
                  if a.option_strings and a.type in (None, str) and a.nargs != 0 and not a.choices and a.dest != "help")


ESCAPES = ["\x1b[2J\x1b[31mred", "a\x9b31mb", "a\x00b", "a\x7fb", "a\rb"]


@pytest.mark.parametrize("name", text_options())
def test_control_characters_are_refused_in_every_text_option(name, tmp_path):
    """Issue 39, item 12: an escape sequence in --output_dir reached the terminal; every text
    option refuses control characters now, and the message does not echo them."""
    assert len(text_options()) > 20
    for value in ESCAPES + ([] if name in options.PROMPTS else ["a\nb", "a\tb"]):
        with pytest.raises(OptionError, match=f"^--{name} holds control characters") as refused:
            parse(base_args("x", tmp_path / "run") + [f"--{name}", value])
        assert value not in str(refused.value)


def test_a_prompt_may_hold_tabs_and_newlines_and_a_config_file_is_checked_too(tmp_path):
    assert parse(base_args("x", tmp_path / "run") + ["--instance_prompt", "a sks\tstar\non white"]).args.instance_prompt
    config = tmp_path / "config.json"
    config.write_text('{"logging_dir": "logs\\u001b[2J"}')
    with pytest.raises(OptionError, match="^--logging_dir holds control characters"):
        parse(base_args("x", tmp_path / "run") + ["--config", str(config)])
    with pytest.raises(OptionError, match="^--config holds control characters"):
        parse(base_args("x", tmp_path / "run") + ["--config", str(tmp_path / "\x1b[2Jconfig.json")])


def test_an_escape_sequence_in_the_output_dir_never_reaches_the_terminal(tmp_path, empty_images, capsys):
    out = tmp_path / "\x1b[2J\x1b]0;owned\x07run"
    assert dreambooth.main(base_args(empty_images, out)) == 2
    captured = capsys.readouterr()
    assert "--output_dir holds control characters" in captured.err
    assert "\x1b" not in captured.err + captured.out and not out.exists()


@pytest.mark.parametrize("logging_dir, inside", [
    ("logs", True), ("./logs", True), ("a/../logs", True), (".", True), ("", True), ("deep/er/logs", True),
    ("..", False), ("../x", False), ("../../..", False), ("logs/../../x", False), ("/", False),
])
def test_the_logging_dir_stays_inside_the_run_folder(logging_dir, inside, tmp_path):
    """Issue 39, item 12: `--logging_dir ../../..` had the trackers write outside the run folder."""
    args = base_args("x", tmp_path / "run") + ["--logging_dir", logging_dir]
    if inside:
        assert parse(args).args.logging_dir == logging_dir
    else:
        with pytest.raises(OptionError, match=f"--logging_dir {logging_dir}: outside the run folder"):
            parse(args)


def test_an_absolute_or_symlinked_logging_dir_is_judged_by_where_it_resolves(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    assert parse(base_args("x", run) + ["--logging_dir", str(run / "logs")]).args.logging_dir == str(run / "logs")
    for outside in (str(elsewhere), str(run) + "-logs", str(run / ".." / "x")):
        with pytest.raises(OptionError, match="outside the run folder"):
            parse(base_args("x", run) + ["--logging_dir", outside])
    (run / "out").symlink_to(elsewhere)
    (run / "in").symlink_to(run / "logs")
    (run / "loop").symlink_to(run / "loop")
    assert parse(base_args("x", run) + ["--logging_dir", "in"]).args.logging_dir == "in"
    for link in ("out", "out/logs", "loop/x"):
        with pytest.raises(OptionError, match="outside the run folder"):
            parse(base_args("x", run) + ["--logging_dir", link])
