"""Where the studio runs: local defaults stay as they were; on a Hugging Face Space (SPACE_ID)
it serves on 0.0.0.0 at the Space's port, keeps runs on persistent storage when mounted, and
shares the server between visitors."""

import pytest

from webui.space import DEFAULT_PORT, detect


def test_local_machine_keeps_the_old_defaults(tmp_path):
    env = detect({}, mount=tmp_path / "absent", device="cpu")
    assert (env.host, env.port, str(env.runs_dir), env.shared, env.persistent) == ("127.0.0.1", DEFAULT_PORT, "runs", False, True)


def test_a_space_binds_all_interfaces_and_uses_persistent_storage(tmp_path):
    env = detect({"SPACE_ID": "someone/restuning-studio", "PORT": "7861"}, mount=tmp_path, device="cpu")
    assert env.host == "0.0.0.0" and env.port == 7861 and env.shared
    assert env.runs_dir == tmp_path / "restuning-runs" and env.persistent
    assert "someone/restuning-studio" in env.summary() and "persistent storage" in env.summary()


def test_a_space_without_storage_says_runs_are_ephemeral(tmp_path):
    env = detect({"SPACE_ID": "a/b", "GRADIO_SERVER_PORT": "7000"}, mount=tmp_path / "absent", device="cpu")
    assert env.port == 7000 and str(env.runs_dir) == "runs" and not env.persistent
    assert "vanish" in env.summary()


def test_explicit_settings_win(tmp_path):
    env = detect({"SPACE_ID": "a/b", "RESTUNING_RUNS_DIR": str(tmp_path / "mine"), "RESTUNING_HOST": "127.0.0.1",
                  "RESTUNING_PORT": "9000", "PORT": "7861"}, mount=tmp_path / "absent", device="cpu")
    assert (env.host, env.port, env.runs_dir) == ("127.0.0.1", 9000, tmp_path / "mine")
    assert not env.persistent


def test_a_bad_port_is_named():
    with pytest.raises(ValueError, match="PORT='http' is not a port number"):
        detect({"PORT": "http"}, device="cpu")


def test_app_arguments_take_the_space_defaults(tmp_path, monkeypatch):
    import app

    monkeypatch.delenv("RESTUNING_RUNS_DIR", raising=False)
    space = detect({"SPACE_ID": "a/b", "PORT": "7861"}, mount=tmp_path, device="cpu")
    args = app.parse_args([], env=space)
    assert (args.host, args.port, args.runs_dir, args.shared) == ("0.0.0.0", 7861, str(tmp_path / "restuning-runs"), True)
    local = app.parse_args(["--runs-dir", str(tmp_path / "r")], env=detect({}, mount=tmp_path / "x", device="cpu"))
    assert (local.host, local.shared, local.runs_dir) == ("127.0.0.1", False, str(tmp_path / "r"))
    assert app.parse_args(["--shared"], env=detect({}, device="cpu")).shared
