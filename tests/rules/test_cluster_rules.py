"""trainers.service.cluster's rules without a cluster (tests/test_cluster.py runs a real one, slowly): what a
Ray job asks for (CPUs, a GPU, and for a CPU run its memory cap), the grace a cancel gives the
trainer to write its checkpoint, which nodes can take a run, how many runs are handed to Ray at
once, and how Ray's job states become a run's. A recording client stands in for Ray's
JobSubmissionClient."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from trainers import memory
from trainers.service import cluster
from trainers.service.cluster import ENDED, RUNNING, START_TIMEOUT, WAITING, RayLauncher


class Client:
    def __init__(self):
        self.submitted: list[dict] = []
        self.stopped: list[str] = []
        self.status: dict[str, object] = {}

    def get_address(self):
        return "http://head:8265"

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    def get_job_info(self, job_id):
        found = self.status[job_id]
        if isinstance(found, Exception):
            raise found
        return found

    def stop_job(self, job_id):
        self.stopped.append(job_id)


@dataclass
class Node:
    resources_total: dict = field(default_factory=dict)
    node_ip: str = "10.0.0.1"
    state: str = "ALIVE"


def node(cpus, gpus=0, mem=8 << 30):
    return Node({"CPU": cpus, "GPU": gpus, "memory": mem})


def launcher_of(monkeypatch, nodes, **kw):
    client = Client()
    monkeypatch.setattr(cluster, "connect", lambda address: client)
    monkeypatch.setattr(RayLauncher, "nodes", lambda self: list(nodes))
    return RayLauncher("http://head:8265", command=lambda config_path, config, device, threads: ["train", str(threads)],
                       **kw), client


@pytest.mark.parametrize("cpus, gpus, memory_bytes, asked", [
    (4, 0, None, {"entrypoint_num_cpus": 4}),
    (4, 0, 0, {"entrypoint_num_cpus": 4}),
    (2, 0, 3 << 30, {"entrypoint_num_cpus": 2, "entrypoint_memory": 3 << 30}),
    (1, 1, None, {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 1}),
    (1, 1, 5 << 30, {"entrypoint_num_cpus": 1, "entrypoint_num_gpus": 1, "entrypoint_memory": 5 << 30}),
])
def test_a_job_asks_ray_for_its_cpus_gpu_and_memory(cpus, gpus, memory_bytes, asked):
    client = Client()
    cluster.submit(client, "job-1", "cmd", {}, cpus=cpus, gpus=gpus, memory_bytes=memory_bytes)
    job = client.submitted[0]
    assert {k: v for k, v in job.items() if k.startswith("entrypoint_")} == asked
    assert all(isinstance(v, int) for k, v in job.items() if k.startswith("entrypoint_num") or k == "entrypoint_memory")


@pytest.mark.parametrize("kill_after, grace", [(120.0, "120"), (30, "30"), (1.0, "1"), (0.5, "1"), (29.2, "30")])
def test_a_cancel_gives_the_trainer_at_least_kill_after_seconds_before_sigkill(kill_after, grace):
    client = Client()
    cluster.submit(client, "job-1", "cmd", {"A": "b"}, cpus=1, kill_after=kill_after)
    env = client.submitted[0]["runtime_env"]["env_vars"]
    assert env == {"A": "b", "RAY_JOB_STOP_WAIT_TIME_S": grace} and int(grace) >= kill_after


def test_a_failed_submission_is_an_os_error_naming_the_job():
    class Refusing(Client):
        def submit_job(self, **kwargs):
            raise RuntimeError("no")

    with pytest.raises(OSError, match="did not take job job-1: no"):
        cluster.submit(Refusing(), "job-1", "cmd", {}, cpus=1)


@pytest.mark.parametrize("device, cap, asked", [
    ("cpu", 2 << 30, {"entrypoint_num_cpus": 8, "entrypoint_memory": 2 << 30}),
    ("cpu", None, {"entrypoint_num_cpus": 8}),
    ("cuda", 2 << 30, {"entrypoint_num_cpus": 8, "entrypoint_num_gpus": 1}),  # on a card the trainer holds itself to the cap
])
def test_a_run_asks_for_its_memory_cap_on_the_cpu_and_a_gpu_on_a_card(monkeypatch, tmp_path, device, cap, asked):
    launcher, client = launcher_of(monkeypatch, [node(8)], kill_after=45.0, cpus_per_run=8)
    monkeypatch.setenv("HF_HOME", "/models")
    monkeypatch.setenv("HF_TOKEN", "secret")
    record = launcher.launch("run-1", tmp_path, device, cap)
    job = client.submitted[0]
    assert {k: v for k, v in job.items() if k.startswith("entrypoint_")} == asked
    env = job["runtime_env"]["env_vars"]
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "45" and env["HF_HOME"] == "/models" and "HF_TOKEN" not in env
    assert (env.get(memory.CUDA_CAP_ENV) == str(cap)) == (device == "cuda")
    assert record["memory_cap"] == cap and record["cpus"] == 8 and record["gpus"] == int(device == "cuda")
    assert launcher.state("run-1", record) == WAITING
    assert ("train 8" in job["entrypoint"]) == (device == "cpu")  # a CPU run's threads are its CPUs


@pytest.mark.parametrize("nodes, default", [([node(4), node(16)], 16), ([node(4, gpus=1), node(16)], 1), ([node(1)], 1)])
def test_cpus_per_run_default_to_the_biggest_node_or_one_beside_a_gpu(monkeypatch, nodes, default):
    launcher, _ = launcher_of(monkeypatch, nodes)
    assert launcher.cpus_per_run == default


@pytest.mark.parametrize("cpus, gpu, fits", [(3, 0, False), (4, 0, True), (5, 0, True)])
def test_a_node_takes_a_run_with_at_least_its_cpus(monkeypatch, cpus, gpu, fits):
    launcher, _ = launcher_of(monkeypatch, [node(cpus)], cpus_per_run=4)
    assert (launcher.refusal({}) is None) == fits
    assert (launcher.room("cpu").limit > 0) == fits


def test_on_a_gpu_cluster_only_nodes_with_a_gpu_take_runs(monkeypatch):
    nodes = [node(8, gpus=1), node(64)]
    launcher, _ = launcher_of(monkeypatch, nodes, cpus_per_run=2)
    assert launcher.devices == ["cuda"] and launcher._fitting() == [nodes[0]]
    nodes[0].resources_total["GPU"] = 0
    assert "has 2 CPU(s) and a GPU" in launcher.refusal({})


def test_the_memory_a_cpu_run_may_use_is_the_biggest_fitting_nodes(monkeypatch):
    launcher, _ = launcher_of(monkeypatch, [node(2, mem=64 << 30), node(8, mem=16 << 30), node(8, mem=32 << 30)], cpus_per_run=4)
    assert launcher.room("cpu").limit == 32 << 30


@pytest.mark.parametrize("waiting, width, hands_over", [(0, 2, True), (1, 2, True), (2, 2, False), (3, 2, False),
                                                        (0, 1, True), (1, 1, False)])
def test_runs_are_handed_to_ray_while_fewer_wait_than_nodes_can_take_one(monkeypatch, waiting, width, hands_over):
    launcher, client = launcher_of(monkeypatch, [node(4) for _ in range(width)] + [node(1)], cpus_per_run=4)
    held = []
    for i in range(waiting):
        client.status[f"j{i}"] = SimpleNamespace(status="PENDING")
        held.append({"ray_job": f"j{i}"})
    client.status["r"] = SimpleNamespace(status="RUNNING")
    held.append({"ray_job": "r"})  # a running one does not wait
    assert (launcher.next_device(held) is not None) == hands_over
    launcher.max_waiting = waiting + 1
    assert launcher.next_device(held) is not None


@pytest.mark.parametrize("status, state", [("PENDING", WAITING), ("RUNNING", RUNNING), ("STOPPED", ENDED),
                                           ("SUCCEEDED", ENDED), ("FAILED", ENDED), ("SOMETHING NEW", RUNNING)])
def test_rays_job_states_become_a_runs(monkeypatch, status, state):
    launcher, client = launcher_of(monkeypatch, [node(4)])
    client.status["j"] = SimpleNamespace(status=status)
    assert launcher.state("run", {"ray_job": "j"}) == state


@pytest.mark.parametrize("error, state", [(RuntimeError("404 not found"), ENDED), (RuntimeError("500"), RUNNING),
                                          (ConnectionError("refused"), RUNNING)])
def test_a_cluster_that_cannot_say_declares_nothing_dead(monkeypatch, error, state):
    launcher, client = launcher_of(monkeypatch, [node(4)])
    client.status["j"] = error
    assert launcher.state("run", {"ray_job": "j"}) == state


@pytest.mark.parametrize("info, how", [
    (SimpleNamespace(status="FAILED", error_type=START_TIMEOUT, driver_exit_code=None, message="no room"), None),
    (SimpleNamespace(status="STOPPED", error_type=None, driver_exit_code=None, message=""), "stopped on the cluster"),
    (SimpleNamespace(status="FAILED", error_type=None, driver_exit_code=3, message=""), "exit code 3"),
    (SimpleNamespace(status="FAILED", error_type="X", driver_exit_code=None, message="node died\nmore"),
     "its Ray job failed: node died"),
])
def test_how_a_job_ended_and_one_never_placed_goes_back_to_the_queue(monkeypatch, tmp_path, info, how):
    launcher, client = launcher_of(monkeypatch, [node(4)])
    launcher.adopt("run", tmp_path, {"ray_job": "j"})
    client.status["j"] = info
    assert launcher.reap() == [("run", how)] and launcher.reap() == []


def test_stop_asks_ray_to_stop_the_job_and_forgets_its_state(monkeypatch):
    launcher, client = launcher_of(monkeypatch, [node(4)])
    client.status["j"] = SimpleNamespace(status="RUNNING")
    assert launcher.state("run", {"ray_job": "j"}) == RUNNING
    client.status["j"] = SimpleNamespace(status="STOPPED")
    launcher.stop({"ray_job": "j"})
    assert client.stopped == ["j"] and launcher.state("run", {"ray_job": "j"}) == ENDED
