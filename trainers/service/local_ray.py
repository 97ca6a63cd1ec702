"""A real Ray cluster made of this machine's processes, on loopback addresses only: a head node
(GCS, dashboard with the Job Submission API, no CPUs of its own so no run lands on it) and
`workers` worker nodes, each its own `ray start --block` process group. For tests, benchmarks and
trying the studio's cluster backend without a cluster (docs/cluster.md).

    with LocalRayCluster(workers=2, cpus_per_worker=1) as cluster:
        cluster.address            # http://127.0.0.1:<port>: the dashboard, for --cluster
        cluster.kill_worker(0)     # SIGKILL to every process of worker 0: the machine "dies"

Why the addresses are 127.0.0.2, 127.0.0.3, ...: Ray replaces a node address of 127.0.0.1 (or
localhost) with the machine's outward address, so that other machines can reach it; any other
address of the loopback range 127.0.0.0/8 is taken as given, and traffic between the nodes stays
on this machine. Each node gets its own, as separate machines would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report sent anywhere
    # a killed worker node is declared dead after ~3 s instead of ~30 (its runs fail, and say so, sooner)
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The `ray` command of this Python's environment."""
    path = Path(sys.executable).with_name("ray")
    return str(path) if path.exists() else (shutil.which("ray") or "ray")


class LocalRayCluster:
    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, memory_per_worker: int = 4 * 2**30,
                 object_store: int = 80 * 10**6, env: dict | None = None, start_timeout: float = 180.0):
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.memory_per_worker = memory_per_worker
        self.object_store = object_store
        self.env = {**os.environ, **RAY_ENV, **(env or {})}
        self.start_timeout = start_timeout
        self.temp_dir = ""
        self.gcs_port = self.dashboard_port = 0
        self.head: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen | None] = []
        self.logs: dict[int, Path] = {}  # pid of each node's `ray start` -> its output

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.2:{self.gcs_port}"

    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(self.object_store),
                "--temp-dir", self.temp_dir, "--disable-usage-stats", "--block"]

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        path = Path(self.temp_dir) / log_name
        with open(path, "ab") as log:
            # a process group of its own: stopping or killing a node reaches every process it
            # started that stays in its group (the raylet, the agents); Ray's workers end with their raylet
            proc = subprocess.Popen([ray_cli(), "start", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.logs[proc.pid] = path
        return proc

    def start(self) -> Self:
        # short: Ray's Unix socket paths live under it and must stay under 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="rt-ray-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.head = self._start(["--head", "--node-ip-address", "127.0.0.2", "--port", str(self.gcs_port),
                                 "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                 "--ray-client-server-port", str(free_port()), *self._node_ports()], "head.log")
        try:
            self._wait_for(1)
            # one node at a time: a raylet that cannot register within Ray's 30 s (a loaded
            # machine, several starting at once) makes its `ray start` give up
            for _ in range(self.workers):
                self.add_worker()
                self._wait_for(len(self.nodes) + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self) -> int:
        """Start one more worker node (127.0.0.<3 + its index>); returns its index."""
        index = len(self.nodes)
        self.nodes.append(self._start(["--address", self.gcs_address, "--node-ip-address", f"127.0.0.{3 + index}",
                                       "--num-cpus", str(self.cpus_per_worker), "--num-gpus", "0",
                                       "--memory", str(self.memory_per_worker), *self._node_ports()], f"worker{index}.log"))
        return index

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address, raise_on_missing_output=False) if n.state == "ALIVE"]

    def _wait_for(self, count: int) -> None:
        """Until `count` nodes are alive and the Job API answers."""
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in [self.head, *self.nodes]:
                if proc is not None and proc.poll() is not None:
                    tail = Path(self.logs[proc.pid]).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"a Ray node exited while starting (exit {proc.returncode}):\n{tail}")
            try:
                if len(self.alive_nodes()) >= count:
                    from ray.job_submission import JobSubmissionClient

                    JobSubmissionClient(self.address).list_jobs()  # the Job API answers too
                    return
            except Exception as exc:  # noqa: BLE001 - the dashboard comes up after the head: wait and ask again
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise TimeoutError(f"the local Ray cluster did not come up in {self.start_timeout:.0f} s ({last}); see {self.temp_dir}/*.log")

    def wait_for_nodes(self, count: int) -> None:
        """Until exactly `count` nodes (head included) are alive: after a kill, Ray's health
        check declares the node dead within a few seconds."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {count} alive nodes")

    def kill_worker(self, index: int) -> None:
        """What a machine failure does to a node: SIGKILL to every process of its group, no goodbye."""
        proc = self.nodes[index]
        if proc is None:
            return
        self._kill_group(proc, signal.SIGKILL)
        self.nodes[index] = None

    @staticmethod
    def _kill_group(proc: subprocess.Popen, sig: int, wait: float = 5.0) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def stop(self) -> None:
        """Stop the workers, then the head (SIGTERM to `ray start --block` ends the processes it
        started), then whatever of this cluster is left: processes whose command line names its
        temp folder (Ray's workers and agents are started with it)."""
        import psutil

        for proc in [*self.nodes, self.head]:
            if proc is not None and proc.poll() is None:
                self._kill_group(proc, signal.SIGTERM)
        self.nodes, self.head = [], None
        if self.temp_dir:
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                        p.kill()
                except psutil.Error:
                    continue
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> None:
    """`python -m trainers.service.local_ray [--workers 2] [--cpus 1]`: a local cluster until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description="A Ray cluster of this machine's processes, on loopback addresses.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each worker node")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="Ray's memory resource of each worker node")
    args = parser.parse_args(argv)
    with LocalRayCluster(workers=args.workers, cpus_per_worker=args.cpus, memory_per_worker=int(args.memory_gib * 2**30)) as c:
        print(f"Ray cluster up: {c.address} (python app.py --cluster {c.address}); Ctrl-C stops it", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
