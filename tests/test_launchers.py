"""The cluster launcher's pieces that need no cluster: the job's shell command (run here by the
shell Ray uses), and how Ray's verdict on a job becomes the run's `failed` message."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from trainers.service.cluster import RayLauncher, entrypoint


def test_the_entrypoint_runs_in_the_checkout_and_appends_to_the_log_whatever_the_paths(tmp_path):
    run = tmp_path / "a run; $(touch pwned) 'x'"
    run.mkdir()
    (run / "train.log").write_text("studio: earlier line\n")
    script = "import os, sys; print('cwd', os.getcwd()); print('args', sys.argv[1:]); print('oops', file=sys.stderr)"
    command = entrypoint([sys.executable, "-c", script, str(run / "config.json")], run / "train.log", repo=tmp_path)
    subprocess.run(["/bin/sh", "-c", command], check=True, cwd="/")
    log = (run / "train.log").read_text().splitlines()
    assert log == ["studio: earlier line", f"cwd {tmp_path}", f"args {[str(run / 'config.json')]}", "oops"]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_how_a_ray_job_ended_reads_as_the_runs_failure(tmp_path):
    (tmp_path / "train.log").write_text("step 3\n")
    lost = SimpleNamespace(status="FAILED", driver_exit_code=None,
                           message="Job supervisor actor died: the node was lost\nmore detail")
    assert RayLauncher._how(tmp_path, lost) == "its Ray job failed: Job supervisor actor died: the node was lost"
    assert RayLauncher._how(tmp_path, SimpleNamespace(status="FAILED", driver_exit_code=3, message="")) == "exit code 3"
    assert RayLauncher._how(tmp_path, SimpleNamespace(status="STOPPED", driver_exit_code=None, message="")) == "stopped on the cluster"
    assert "unknown to the cluster" in RayLauncher._how(tmp_path, None)


def test_the_studio_takes_a_cluster_from_its_flag_or_ray_address(monkeypatch):
    import app
    from webui.space import detect

    here = detect({}, device="cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert app.parse_args([], env=here).cluster is None, "no cluster: runs train on this machine"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert app.parse_args([], env=here).cluster == "http://head:8265"
    assert app.parse_args(["--cluster", "ray://other:10001"], env=here).cluster == "ray://other:10001"


def test_a_clusters_preset_follows_its_nodes_not_this_machine():
    import app

    cpu = SimpleNamespace(devices=["cpu"], gpu_memory=None, describe=lambda: "the Ray cluster at x")
    assert app.cluster_preset(cpu)[0] == "CPU demo"
    assert app.cluster_preset(SimpleNamespace(**{**vars(cpu), "devices": ["cuda"]}))[0] == "8 GB GPU"
    assert app.cluster_preset(SimpleNamespace(**{**vars(cpu), "devices": ["cuda"], "gpu_memory": 80 * 2**30}))[0] == "24 GB+ GPU"
