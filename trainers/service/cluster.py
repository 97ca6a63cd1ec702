"""Runs on a Ray cluster: each run is a Ray job (Ray's Job Submission API), placed by Ray's own
scheduler on a node with the resources it asks for.

    launcher = RayLauncher("http://HEAD:8265")       # or ray://HEAD:10001, or HEAD:6379 (Ray resolves each)
    runner = JobRunner("/shared/runs", launcher=launcher)

The job's entrypoint is the command a local run has (`accelerate launch -m trainers.dreambooth
--config <run>/config.json`), with its output appended to the run's train.log: the runs folder,
this checkout and its Python environment must be at the same paths on every node (a shared
filesystem; docs/cluster.md). So events.jsonl, samples, checkpoints and tuner files appear in the
run folder as the trainer writes them, and the studio reads them as it reads a local run's.

What Ray gives each run: `cpus_per_run` CPUs (the trainer's threads), one GPU when the cluster
has GPUs, and for a CPU run its memory cap (trainers.memory's estimate with headroom) as Ray's
`memory` resource, so Ray places no more runs on a node than its memory holds. Cancel is Ray's
stop_job: SIGTERM to the entrypoint's processes (the trainer saves a checkpoint and ends
`cancelled`), SIGKILL after `kill_after` seconds (RAY_JOB_STOP_WAIT_TIME_S, set per job). A node
that dies takes its job with it: Ray marks the job FAILED, the runner writes `failed` with the
log's last lines, and resume submits a new job that continues from the last checkpoint on a node
that is alive. Ray keeps each job's state in its head node, so a studio started anew finds its
runs' jobs again from the job id in process.json.

Order and fairness stay the runner's (its FIFO queue and per-visitor limits): a queued run is
handed to Ray only while fewer runs handed over wait for room than the cluster has nodes that
can take one (`max_waiting` to set another number). So a comparison fans out at once, as far as
the nodes have room, and Ray places it (where, and when a node frees up); the rest wait in the
studio's queue, where a visitor sees their place. A run handed over and waiting shows as queued
without a place, and cancel stops it there. A run Ray could not place within its start
timeout (RAY_JOB_START_TIMEOUT_SECONDS on the head, 15 min by default) goes back to the queue.
"""

from __future__ import annotations

import math
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path

from .. import memory
from .jobs import (
    CONFIG_FILE,
    LOG_FILE,
    REPO_ROOT,
    Launcher,
    LocalLauncher,
    _process_alive,
    _read_json,
    default_command,
    how_it_ended,
)

# The studio's settings the trainer reads, passed to each job (a node's own environment is its
# raylet's); nothing else of the studio's environment (tokens, paths of this machine) is sent
FORWARDED_ENV = ("RESTUNING_RUN_MEMORY_SHARE", "RESTUNING_MEMORY_CHECK", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_HOME", "HF_HUB_CACHE", "GOMP_SPINCOUNT")
WAITING, RUNNING, ENDED = "waiting", "running", "ended"
RAY_STATES = {"PENDING": WAITING, "RUNNING": RUNNING, "STOPPED": ENDED, "SUCCEEDED": ENDED, "FAILED": ENDED}
START_TIMEOUT = "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"


class ClusterError(RuntimeError):
    """The cluster cannot be reached or used; the message is for the user."""


def connect(address: str):
    """Ray's JobSubmissionClient for `address` (http://HEAD:8265, ray://HEAD:10001 or HEAD:6379)."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise ClusterError(f"the cluster backend needs Ray: pip install -r requirements-cluster.txt ({exc})") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or ValueError by address form
        raise ClusterError(f"no Ray cluster answers at {address}: {exc}") from None


def entrypoint(cmd: list[str], log: Path, repo: Path = REPO_ROOT) -> str:
    """A Ray job's shell command: `cmd` run in the checkout, its output appended to `log`."""
    return f"cd {shlex.quote(str(repo))} && exec {shlex.join(cmd)} >> {shlex.quote(str(log))} 2>&1"


def submit(client, job_id: str, command: str, env: dict, *, cpus: int, gpus: int = 0, memory_bytes: int | None = None,
           kill_after: float = 120.0, metadata: dict | None = None) -> str:
    """Submit `command` as Ray job `job_id` asking for `cpus` CPUs, `gpus` GPUs and `memory_bytes`
    of Ray's memory resource; its processes get SIGTERM on stop, SIGKILL `kill_after` s later
    (at least: Ray counts whole seconds)."""
    resources = {"entrypoint_num_cpus": cpus}
    if gpus:
        resources["entrypoint_num_gpus"] = gpus
    if memory_bytes:
        resources["entrypoint_memory"] = int(memory_bytes)
    env = {**env, "RAY_JOB_STOP_WAIT_TIME_S": str(math.ceil(kill_after))}
    try:
        return client.submit_job(entrypoint=command, submission_id=job_id, runtime_env={"env_vars": env},
                                 metadata=metadata or {}, **resources)
    except Exception as exc:  # noqa: BLE001 - Ray's SDK raises RuntimeError or requests' errors
        raise OSError(f"the Ray cluster did not take job {job_id}: {exc}") from None


def wait(client, job_id: str, poll_seconds: float = 1.0):
    """Ray's JobDetails of `job_id` once it has ended."""
    while True:
        info = client.get_job_info(job_id)
        if RAY_STATES.get(str(getattr(info.status, "value", info.status))) == ENDED:
            return info
        time.sleep(poll_seconds)


class RayLauncher(Launcher):
    def __init__(self, address: str, *, cpus_per_run: int | None = None, gpu_memory: int | None = None,
                 command=None, niceness: int = 5, kill_after: float = 120.0, max_waiting: int | None = None,
                 refresh_seconds: float = 0.5, python: str = sys.executable, repo: Path = REPO_ROOT):
        """`cpus_per_run`: CPUs each run asks for, and its threads (default: 1 beside a GPU; on a
        CPU cluster every CPU of the largest node, as a local run takes every core).
        `gpu_memory`: bytes of one of the cluster's GPUs, for the memory check before a run is
        queued (Ray does not report it; without it the trainer checks on the card it gets).
        `command(config_path, config, device, threads)`: the trainer's command (default:
        accelerate launch, as a local run)."""
        self.address = address
        self.client = connect(address)
        self.api_url = self.client.get_address()
        self.gpu_memory = gpu_memory
        self.command = command or default_command
        self.niceness, self.kill_after, self.max_waiting = niceness, kill_after, max_waiting
        self.refresh_seconds = refresh_seconds
        self.python, self.repo = python, Path(repo)
        self._nodes_cache: tuple[float, list] = (0.0, [])
        self._jobs: dict[str, tuple[float, str, object]] = {}  # job id -> (when asked, state, Ray's JobDetails or None)
        self._watched: dict[str, tuple[str, Path]] = {}  # run id -> (job id, run folder)
        nodes = self.nodes()
        has_gpu = any(n.resources_total.get("GPU", 0) >= 1 for n in nodes)
        self.devices = ["cuda" if has_gpu else "cpu"]
        biggest = max((int(n.resources_total.get("CPU", 0)) for n in nodes), default=1)
        self.cpus_per_run = int(cpus_per_run or (1 if has_gpu else max(1, biggest)))

    def describe(self) -> str:
        return f"the Ray cluster at {self.address}"

    # ---- the cluster's nodes ---------------------------------------------------------------------

    def nodes(self) -> list:
        """The alive nodes (Ray's state API), asked again at most every 10 s."""
        when, nodes = self._nodes_cache
        if time.monotonic() - when > 10.0 or not nodes:
            from ray.util.state import list_nodes

            try:
                nodes = [n for n in list_nodes(address=self.api_url, raise_on_missing_output=False) if n.state == "ALIVE"]
            except Exception as exc:  # noqa: BLE001 - the state API raises its own or requests' errors
                raise ClusterError(f"the Ray cluster at {self.address} does not answer: {exc}") from None
            self._nodes_cache = (time.monotonic(), nodes)
        return nodes

    def _fitting(self) -> list:
        gpu = self.devices[0] == "cuda"
        return [n for n in self.nodes() if n.resources_total.get("CPU", 0) >= self.cpus_per_run
                and (not gpu or n.resources_total.get("GPU", 0) >= 1)]

    def refusal(self, config: dict) -> str | None:
        try:
            if self._fitting():
                return None
        except ClusterError as exc:
            return str(exc)
        wants = f"{self.cpus_per_run} CPU(s)" + (" and a GPU" if self.devices[0] == "cuda" else "")
        return f"no node of {self.describe()} has {wants} for a run"

    def room(self, device: str) -> memory.Room | None:
        """A CPU run: Ray's `memory` resource of the largest node that can take a run (Ray already
        keeps part of each node's memory for itself). A GPU run: `gpu_memory` when given."""
        if device.startswith("cuda"):
            if not self.gpu_memory:
                return None
            share = memory.memory_share()
            return memory.Room(device, int(self.gpu_memory * share), self.gpu_memory, self.gpu_memory,
                               f"{share:.0%} of the {self.gpu_memory / memory.GIB:.1f} GiB given for the cluster's GPUs")
        try:
            fitting = self._fitting()
        except ClusterError:
            fitting = []
        node = max(fitting, key=lambda n: n.resources_total.get("memory", 0), default=None)
        if node is None:
            return memory.Room(device, 0, 0, 0, f"no node of {self.describe()} can take a run")
        size = int(node.resources_total.get("memory", 0))
        return memory.Room(device, size, size, size, f"Ray's memory of the largest node of {self.describe()} ({node.node_ip})")

    # ---- jobs ------------------------------------------------------------------------------------

    def _job(self, job_id: str) -> tuple[str, object]:
        """(state, Ray's JobDetails) of a job, asked again at most every `refresh_seconds`; an
        ended job is final. A cluster that does not answer leaves the last known state."""
        cached = self._jobs.get(job_id)
        if cached and (cached[1] == ENDED or time.monotonic() - cached[0] < self.refresh_seconds):
            return cached[1], cached[2]
        try:
            info = self.client.get_job_info(job_id)
            state = RAY_STATES.get(str(getattr(info.status, "value", info.status)), RUNNING)
        except RuntimeError as exc:
            if "404" not in str(exc):
                return (cached[1], cached[2]) if cached else (RUNNING, None)
            info, state = None, ENDED  # the cluster has no record of it (a head started anew)
        except OSError:  # requests' connection errors: can't tell, so nothing is declared dead
            return (cached[1], cached[2]) if cached else (RUNNING, None)
        self._jobs[job_id] = (time.monotonic(), state, info)
        return state, info

    def state(self, run_id: str, record: dict) -> str:
        job_id = record.get("ray_job")
        if isinstance(job_id, str) and job_id:
            return self._job(job_id)[0]
        # a run started on the studio's machine before it was pointed at the cluster: still watched by its pid
        return RUNNING if "pid" in record and _process_alive(record) else ENDED

    def next_device(self, held: list[dict]) -> str | None:
        waiting = sum(1 for record in held if self.state("", record) == WAITING)
        try:
            width = self.max_waiting or len(self._fitting())
        except ClusterError:
            return None  # nothing is handed to a cluster that does not answer; the runs wait in the queue
        return self.devices[0] if waiting < max(1, width) else None

    def entrypoint(self, path: Path, device: str) -> str:
        """The job's shell command: the trainer in the checkout, its output appended to train.log."""
        config_path = path / CONFIG_FILE
        threads = self.cpus_per_run if device == "cpu" else None
        cmd = [str(c) for c in self.command(config_path, _read_json(config_path), device, threads)]
        if cmd and cmd[0] == sys.executable:
            cmd[0] = self.python
        if self.niceness:
            cmd = ["nice", "-n", str(self.niceness), *cmd]
        return entrypoint(cmd, path / LOG_FILE, self.repo)

    def launch(self, run_id: str, path: Path, device: str, cap: int | None) -> dict:
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(self.repo))
        if device == "cpu":
            env.setdefault("GOMP_SPINCOUNT", "10000")  # as a local run (trainers.service.jobs.LocalLauncher.launch)
        elif cap:
            env[memory.CUDA_CAP_ENV] = str(cap)
        command = self.entrypoint(path, device)
        job_id = f"restuning-{run_id}-{secrets.token_hex(3)}"
        with open(path / LOG_FILE, "ab") as log:
            log.write(f"studio: Ray job {job_id} on {self.address}\n$ {command}\n".encode())
        submit(self.client, job_id, command, env, cpus=self.cpus_per_run, gpus=int(device == "cuda"),
               memory_bytes=cap if device == "cpu" else None, kill_after=self.kill_after, metadata={"restuning_run": run_id})
        self._jobs[job_id] = (time.monotonic(), WAITING, None)
        self._watched[run_id] = (job_id, path)
        return {"ray_job": job_id, "cluster": self.address, "device": f"ray:{device}", "started": time.time(),
                "command": command, "memory_cap": cap, "cpus": self.cpus_per_run, "gpus": int(device == "cuda")}

    def adopt(self, run_id: str, path: Path, record: dict) -> None:
        if isinstance(record.get("ray_job"), str):
            self._watched[run_id] = (record["ray_job"], path)

    def reap(self) -> list[tuple[str, str | None]]:
        ended = []
        for run_id, (job_id, path) in list(self._watched.items()):
            state, info = self._job(job_id)
            if state == ENDED:
                del self._watched[run_id]
                ended.append((run_id, None if getattr(info, "error_type", None) == START_TIMEOUT else self._how(path, info)))
        return ended

    def how_it_ended(self, path: Path, record: dict) -> str:
        job_id = record.get("ray_job")
        return self._how(path, self._job(job_id)[1] if isinstance(job_id, str) else None)

    @staticmethod
    def _how(path: Path, info) -> str:
        if info is None:
            return "its Ray job is unknown to the cluster (its head node was started anew?)"
        status = str(getattr(info.status, "value", info.status))
        if status == "STOPPED":
            return "stopped on the cluster"
        if info.driver_exit_code is not None:
            return how_it_ended(path, info.driver_exit_code)
        message = (info.message or "").strip().splitlines()
        return f"its Ray job {status.lower()}: {message[0] if message else 'no reason given'}"

    def stop(self, record: dict, force: bool = False) -> None:
        """Ray's stop_job: SIGTERM now, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray escalates by
        itself, so `force` asks the same)."""
        job_id = record.get("ray_job")
        if not isinstance(job_id, str):
            if "pid" in record:  # a local run from before (see `state`)
                LocalLauncher._signal(record, signal.SIGKILL if force else signal.SIGTERM)
            return
        try:
            self.client.stop_job(job_id)
        except Exception:  # noqa: BLE001 - an ended or unknown job: nothing to stop
            return
        self._jobs.pop(job_id, None)  # ask again on the next look

    def forget(self, run_id: str) -> None:
        self._watched.pop(run_id, None)
