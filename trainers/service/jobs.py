"""The job runner the studio drives: every run is a folder under the runs directory and its own
`accelerate launch -m trainers.dreambooth --config <run>/config.json` process.

    runner = JobRunner("runs")                 # lists past runs from disk, adopts live ones
    run_id = runner.submit(config, images)     # folder + config.json + queued; starts when a device is free
    runner.info(run_id)                        # status, queue position, progress, log tail
    runner.cancel(run_id); runner.resume(run_id); runner.delete(run_id)

A run folder holds:
    config.json     the trainer's options (diffusers DreamBooth names + the method's own)
    job.json        what the runner knows: label, group, created/queued time, device, owner
                    and published (a shared studio: whose run it is, and whether others may see it)
    process.json    pid and start time of the launched process (present once it started)
    events.jsonl    progress, appended by the trainer (trainers/events.py); the runner adds
                    `queued`, and `failed`/`cancelled` when a process ends without saying so
    train.log       the process's stdout and stderr
    instance/       the uploaded concept images

Everything the studio shows is derived from these files, so restarting the app lists the same
runs with the same status, and a training process keeps going while no browser (or no app) is
watching: it runs in its own session and process group. The queue is FIFO by queued time, one
process per device at a time by default (`per_device`). No file is written outside the run's own
folder, and run ids are checked before any path is built from them.

Where the process runs is a launcher's business (`Launcher`): `LocalLauncher`, the default, runs it
on this machine as above; `trainers.service.cluster.RayLauncher` submits it as a Ray job to a cluster that
shares the runs folder (docs/cluster.md). The queue, the folders and everything derived from them
are the same for both.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .. import checkpoints, memory
from ..data import CLASS_CACHE
from ..events import EVENTS_FILE, FINAL_PHASES, EventLog, last_phase, read_events, scan_events
from ..options import RUN_MARKERS
from ..safe_json import Unreadable, read_object, write_atomic
from . import limits as caps
from .limits import JobError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = "config.json"
JOB_FILE = "job.json"
PROCESS_FILE = "process.json"
LOG_FILE = "train.log"
INSTANCE_DIR = "instance"
# What makes a folder a run the trainer may write into (trainers.options._check_output_dir): the
# trainer writes it into a folder it creates; the runner into each run folder it makes.
RUN_MARKER = RUN_MARKERS[0]
STAGING = ".new-"  # a run folder being made: not a run id (hidden), renamed into place when whole
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$")
# Folders of the runs folder that look like run ids and are no runs: the class-image cache every
# run of one model and class prompt shares (trainers.data). Never listed, opened or deleted as a run.
NOT_RUNS = frozenset({CLASS_CACHE})
LOG_TAIL_LINES = 30


def default_memory_limit(per_device: int = 1) -> int:
    """Bytes of address space one CPU run may take: its share of the machine's memory
    (RESTUNING_RUN_MEMORY_SHARE, default 0.8, of the machine or its container), so a run asking
    for too much fails alone (with the trainer's out-of-memory message) instead of driving the
    host, and the studio serving it, into swapless exhaustion."""
    return int(memory.host_room().limit / max(1, per_device))


MEMORY_CAP_HINT = ("lower the batch size, the resolution or the validation images, or turn on gradient checkpointing "
                   f"(the Train tab's memory estimate shows what fits; {memory.SHARE_ENV} sets the share of the machine "
                   "a run may take)")


def memory_cap_message(cap: int) -> str:
    return f"ran out of the memory allowed for a run: {cap / 2**30:.1f} GiB"


def default_command(config_path: Path, config: dict, device: str, threads: int | None = None) -> list[str]:
    """`accelerate launch` with explicit settings, so no `accelerate config` file is needed;
    on the CPU with `threads` threads (default: every core of this machine, one for a small U-Net:
    trainers.models.cpu_threads_for)."""
    from ..models import cpu_threads_for

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", str(config.get("mixed_precision") or "no")]
    if device == "cpu":
        threads = threads or cpu_threads_for(str(config.get("pretrained_model_name_or_path") or ""), os.cpu_count() or 1)
        cmd += ["--cpu", "--num_cpu_threads_per_process", str(threads)]
    return cmd + ["-m", "trainers.dreambooth", "--config", str(config_path)]


def detect_devices() -> list[str]:
    """One queue slot group per CUDA device, or the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return ["cpu"]


@dataclass
class RunInfo:
    id: str
    dir: Path
    status: str  # queued | running | done | failed | cancelled | damaged (no readable job.json: it can only be deleted)
    phase: str | None
    label: str = ""
    group: str = ""
    created: float = 0.0
    device: str = ""
    position: int | None = None  # 1-based place in the queue while waiting
    config: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    error: str = ""
    hint: str = ""
    log_tail: list = field(default_factory=list)
    resumable: bool = False
    alive: bool = False  # its process group still runs (also briefly after a final phase, while it exits)
    checkpoint: str | None = None
    owner: str = ""  # the visitor who started it (a shared studio); "" for runs made locally
    published: bool = False  # its owner shares it with every visitor (read-only)
    skipped_events: int = 0  # malformed lines of events.jsonl, left out of `events`
    waiting: str = ""  # why a queued run does not start although it is first (the disk is full)
    imported: bool = False  # a tuner file uploaded, not trained here

    @property
    def method(self) -> str:
        return str(self.config.get("method", ""))

    @property
    def prompt(self) -> str:
        return str(self.config.get("instance_prompt", ""))


def _read_json(path: Path) -> dict:
    """The file's object; {} for a missing, unreadable or non-object file, whatever it holds
    (one run's bad file must not stop the listing or the scheduler: trainers.safe_json)."""
    try:
        return read_object(path)
    except (OSError, Unreadable):
        return {}


def _job(path: Path) -> tuple[dict | None, str]:
    """(job.json's object, "") or (None, why the run folder is damaged)."""
    try:
        return read_object(path / JOB_FILE), ""
    except FileNotFoundError:
        return None, f"its {JOB_FILE} is missing"
    except OSError as exc:
        return None, f"its {JOB_FILE} cannot be read ({exc.strerror or exc})"
    except Unreadable as exc:
        return None, f"its {JOB_FILE} is damaged ({exc})"


def _time(job: dict, key: str) -> float:
    """A time from job.json; 0 for anything else, so one bad file cannot break the sort of all."""
    value = job.get(key, 0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def disk_full_message(runs_dir: Path) -> str:
    try:
        free = f" ({caps.size_text(shutil.disk_usage(runs_dir).free)} free)"
    except OSError:
        free = ""
    return f"the server's disk is full{free}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24].strip("-") or "run"


LAUNCHER_ERROR = re.compile(r"^subprocess\.CalledProcessError: ")
MEMORY_WORDS = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|out of memory", re.I)
SIGNAL_DEATH = re.compile(r"died with <Signals\.(\w+): (\d+)>")
DISK_WORDS = re.compile(r"No space left on device|Disk quota exceeded")


def _log_lines(run_dir: Path) -> list[str]:
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm-style progress rewrites a line with carriage returns: keep what the line ended as
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]


TRACEBACK = "Traceback (most recent call last):"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b.*")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:-])/(?:[^\s'\"`,;:()\[\]{}<>|]+/)*[^\s'\"`,;:()\[\]{}<>|]*")


def redact(text: str, run_dir: Path | None = None) -> str:
    """`text` without the server's paths: one inside the run folder becomes relative to it (the
    folder itself "the run folder"), any other absolute path its last component (what a visitor
    of a shared studio may see)."""
    root = str(Path(run_dir).resolve()) if run_dir is not None else None

    def short(match: re.Match) -> str:
        path = match.group(0)
        if root and (path == root or path.startswith(root + "/")):
            return path[len(root) + 1:] or "the run folder"
        return Path(path).name or path
    return ABSOLUTE_PATH.sub(short, text)


def _summarise_tracebacks(text: list[str]) -> list[str]:
    """Each Python traceback as one line naming its exception: the frames (server paths, code)
    stay in train.log on the server."""
    out, i = [], 0
    if text and text[0].startswith((" ", "\t")) and any(line.lstrip().startswith('File "') for line in text[:50]):
        text = [TRACEBACK, *text]  # the window starts inside a traceback whose first line it cut off
    while i < len(text):
        if not text[i].startswith(TRACEBACK):
            out.append(text[i])
            i += 1
            continue
        end = i + 1
        while end < len(text) and (text[end].startswith((" ", "\t")) or not EXCEPTION_LINE.match(text[end])):
            end += 1
        exception = text[end] if end < len(text) else "(cut off)"
        out.append(f"[a Python traceback of {end - i + 1} lines, in train.log on the server] {exception}")
        i = end + 1
    return out


LAUNCH_LINE = "$ "  # how a launcher writes the command it ran into train.log


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The log's last lines as a visitor may see them: without `accelerate launch`'s own
    traceback (when the trainer fails, the launcher re-raises its exit status as a
    CalledProcessError, which says nothing the trainer did not), every other traceback summarised
    to its exception line, and no server path (`redact`). train.log itself keeps everything."""
    text = _log_lines(run_dir)
    for end in range(len(text) - 1, -1, -1):
        if LAUNCHER_ERROR.match(text[end]):
            start = next((i for i in range(end, -1, -1) if text[i].startswith(TRACEBACK)), end)
            text = text[:start] + text[end + 1:]
            break
    # the launcher's command line (the log's "$ ..." line) names this server's programs and paths
    text = [line for line in text if not line.startswith(LAUNCH_LINE)]
    return [redact(line, run_dir) for line in _summarise_tracebacks(text)][-lines:]


def how_it_ended(run_dir: Path, returncode: int | None) -> str:
    """'killed (signal 9)' for a process killed by a signal, whether the launcher we started or
    the trainer it started (the launcher then exits with 1 and names the signal in its log)."""
    if returncode is not None and returncode < 0:
        return f"killed (signal {-returncode})"
    for line in reversed(_log_lines(run_dir)[-LOG_TAIL_LINES:]):
        found = SIGNAL_DEATH.search(line)
        if found:
            return f"killed (signal {found.group(2)})"
    return f"exit code {returncode}" if returncode is not None else "it was gone when the studio started"


def _status(phase: str | None, alive: bool, *, waiting: bool, damaged: bool) -> str:
    if alive:  # after a final phase too: the process may still be writing (its checkpoint, its weights)
        return "running"
    if damaged:
        return "damaged"
    if phase in FINAL_PHASES:
        return phase
    # started, not alive, no final word: the process died while nobody watched
    return "queued" if waiting else "failed"


def _low_on_disk(folder: Path, floor: int) -> bool:
    try:
        return shutil.disk_usage(folder).free < max(floor, 1 << 20)
    except OSError:
        return False


def _process_alive(record: dict) -> bool:
    """The recorded process group still has a member. `accelerate launch` leads the group and
    may end before the trainer it started (on SIGTERM it exits at once while the trainer is still
    saving its checkpoint), so the leader alone does not decide. A pid reused by an unrelated
    process (other start time) does not count: Linux never reuses a pid that still names a group."""
    try:
        pid = int(record["pid"])
        proc = psutil.Process(pid)
        if abs(proc.create_time() - float(record["create_time"])) >= 1.0:
            return False
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        pass
    except (KeyError, ValueError, TypeError, psutil.Error):
        return False
    try:
        os.killpg(pid, 0)  # no member at all (the usual case for a finished run): no need to walk the table
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _group_has_live_member(pid)


def _group_has_live_member(pgid: int) -> bool:
    """Any process of group `pgid` that is not a zombie (a zombie leader nobody reaped yet does
    not train). Only asked once the leader has ended, so walking the process table is rare."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


class Launcher:
    """Where a run's trainer process runs: the seam between JobRunner (the queue, the run folders
    and every file in them) and what starts, watches and stops the process. A run's record (what
    `launch` returns, kept in process.json) is all a launcher made anew needs to find the run
    again after the studio restarts.

    LocalLauncher: a process group on this machine (the default). trainers.service.cluster.RayLauncher:
    a Ray job on a cluster whose nodes see the runs folder at the same path."""

    devices: list[str]  # where runs go ("cpu", "cuda:0", ...); the first is what the form and the memory estimate assume

    def describe(self) -> str:
        """Where runs go, in a few words (the studio prints it)."""
        raise NotImplementedError

    def room(self, device: str) -> memory.Room | None:
        """What one run may use on `device`; None when it cannot be known here."""
        raise NotImplementedError

    def refusal(self, config: dict) -> str | None:
        """Why no place this launcher knows could ever run `config` (checked before it is queued)."""
        return None

    def next_device(self, held: list[dict]) -> str | None:
        """Where the next queued run may start now, given the records of the runs holding a place."""
        raise NotImplementedError

    def launch(self, run_id: str, path: Path, device: str, cap: int | None) -> dict:
        """Start the trainer on the run folder `path` (its config.json); `cap`: its memory cap in
        bytes. Returns the run's record, with at least `device`."""
        raise NotImplementedError

    def state(self, run_id: str, record: dict) -> str:
        """'waiting' (handed over, not started: it waits for room), 'running', or 'ended'."""
        raise NotImplementedError

    def reap(self) -> list[tuple[str, str | None]]:
        """The runs it watches whose process ended since the last call, each with how it ended;
        None for one that never started and goes back to the queue."""
        raise NotImplementedError

    def adopt(self, run_id: str, path: Path, record: dict) -> None:
        """A run found alive when the studio started: watch it from now on."""

    def how_it_ended(self, path: Path, record: dict) -> str:
        """For a run found ended, without its final word, when the studio started."""
        raise NotImplementedError

    def stop(self, record: dict, force: bool = False) -> None:
        """SIGTERM to the trainer (it saves a checkpoint and ends `cancelled`); force: SIGKILL."""
        raise NotImplementedError

    def watch(self, run_id: str, path: Path, record: dict) -> None:
        """Called on every tick for each running run (the local memory watchdog)."""

    def forget(self, run_id: str) -> None:
        """The run is queued again (resume): its earlier process has ended and is not reported."""


class LocalLauncher(Launcher):
    """Each run a process group on this machine, `per_device` at a time on each device."""

    def __init__(self, devices: list[str] | None = None, per_device: int = 1, command=default_command,
                 niceness: int = 0, memory_limit: int | None = -1):
        self.devices = list(devices) if devices else detect_devices()
        self.per_device = max(1, int(per_device))
        self.memory_limit = default_memory_limit(self.per_device) if memory_limit == -1 else memory_limit
        self.command = command
        self.niceness = niceness
        self._children: dict[str, tuple[subprocess.Popen, Path]] = {}

    def describe(self) -> str:
        return f"this machine ({', '.join(self.devices)})"

    def room(self, device: str) -> memory.Room:
        """Its share of the card, or of the machine divided among the runs a CPU holds at once."""
        room = memory.device_room(device)
        if not device.startswith("cuda") and self.per_device > 1:
            room.limit //= self.per_device
            room.where += f", shared by {self.per_device} runs at once"
        return room

    def next_device(self, held: list[dict]) -> str | None:
        busy: dict[str, int] = {}
        for record in held:
            busy[record.get("device", "")] = busy.get(record.get("device", ""), 0) + 1
        return next((d for d in self.devices if busy.get(d, 0) < self.per_device), None)

    def state(self, run_id: str, record: dict) -> str:
        # A child of ours stays 'running' until reap() has taken it and said how it ended: a run
        # seen 'ended' between its exit and the next tick would show as failed with no reason.
        if run_id in self._children:
            return "running"
        return "running" if record and _process_alive(record) else "ended"

    def reap(self) -> list[tuple[str, str | None]]:
        ended = []
        for run_id, (child, path) in list(self._children.items()):
            record = _read_json(path / PROCESS_FILE)
            ours = record.get("pid") == child.pid
            if child.poll() is not None and not (ours and _process_alive(record)):
                del self._children[run_id]
                if ours:
                    ended.append((run_id, how_it_ended(path, child.returncode)))
        return ended

    def how_it_ended(self, path: Path, record: dict) -> str:
        return how_it_ended(path, None)

    def stop(self, record: dict, force: bool = False) -> None:
        self._signal(record, signal.SIGKILL if force else signal.SIGTERM)

    def watch(self, run_id: str, path: Path, record: dict) -> None:
        self._watch_memory(path, record)

    def forget(self, run_id: str) -> None:
        old = self._children.pop(run_id, None)
        if old is not None:
            old[0].wait()

    def launch(self, run_id: str, path: Path, device: str, cap: int | None) -> dict:
        config_path = path / CONFIG_FILE
        cmd = self.command(config_path, _read_json(config_path), device)
        if self.niceness and shutil.which("nice"):
            # training yields the CPU to other work (the default 0 does not; docs/benchmarks.md)
            cmd = [shutil.which("nice"), "-n", str(self.niceness), *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        if device.startswith("cuda:") and cap:
            env[memory.CUDA_CAP_ENV] = str(cap)  # the trainer holds itself to it on the card
        if device == "cpu":
            # OpenMP (libgomp) threads spin 300,000 rounds at every barrier by default; on cores the
            # trainer shares with the studio and a browser, a partner thread that lost its core makes
            # every barrier wait out that spin. 10,000 rounds keep the idle speed (docs/benchmarks.md).
            env.setdefault("GOMP_SPINCOUNT", "10000")
        with open(path / LOG_FILE, "ab") as log:
            log.write(f"{LAUNCH_LINE}{' '.join(cmd)}\n".encode())
            log.flush()
            # a session of its own: closing the browser or stopping the app does not stop it, and
            # cancel can signal the whole group (accelerate launch and the trainer it starts)
            child = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[run_id] = (child, path)
        limit = self._cap_memory(child.pid) if device == "cpu" else None
        # the watchdog's cap on the resident memory of the run's processes: the run's own on the
        # CPU, the machine's share for a GPU run's host side
        rss_cap = cap if device == "cpu" else int(memory.host_room().limit / max(1, self.per_device))
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:
            create_time = 0.0
        return {"pid": child.pid, "create_time": create_time, "device": device, "started": time.time(),
                "command": cmd, "memory_limit": limit, "memory_cap": cap, "rss_cap": rss_cap}

    def _watch_memory(self, path: Path, record: dict) -> None:
        """Kill a run whose processes hold more resident memory than its cap, and say so: the
        run fails alone, the machine keeps its memory, the studio and the other runs go on."""
        cap = record.get("rss_cap")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
            return
        try:
            leader = psutil.Process(int(record["pid"]))
            used = sum(p.memory_info().rss for p in [leader, *leader.children(recursive=True)])
        except (psutil.Error, KeyError, ValueError, TypeError):
            return
        if used <= cap:
            return
        self._signal(record, signal.SIGKILL)
        if last_phase(read_events(path)) in FINAL_PHASES:
            return  # said already (a process dying slowly is seen over its cap more than once)
        EventLog(path).phase("failed", error=f"{memory_cap_message(cap)} (its processes held {used / 2**30:.1f} GiB)",
                             hint=MEMORY_CAP_HINT)
        with open(path / LOG_FILE, "ab") as log:
            log.write(f"studio: stopped: {memory_cap_message(cap)}; its processes held {used / 2**30:.1f} GiB\n".encode())

    def _cap_memory(self, pid: int) -> int | None:
        """Set the run's address-space limit from outside (prlimit), not in a preexec_fn, which is
        unsafe in a threaded server; it is set while `nice` and the launcher are still starting,
        and the trainer process they start inherits it."""
        if not self.memory_limit:
            return None
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = self.memory_limit if hard == resource.RLIM_INFINITY else min(self.memory_limit, hard)
        try:
            resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
        except (OSError, ValueError):
            return None
        return soft

    @staticmethod
    def _signal(record: dict, sig: int) -> None:
        if not _process_alive(record):
            return
        try:
            os.killpg(int(record["pid"]), sig)
        except (ProcessLookupError, PermissionError):
            pass


class JobRunner:
    def __init__(self, runs_dir: str | os.PathLike, *, devices: list[str] | None = None, per_device: int = 1,
                 command=default_command, poll_seconds: float = 0.5, kill_after: float = 120.0, niceness: int = 0,
                 max_active_per_owner: int | None = None, unguessable_ids: bool = False,
                 memory_limit: int | None = -1, memory_check: bool | None = None, run_memory_cap: int | None = None,
                 launcher: Launcher | None = None, limits: caps.Limits | None = None,
                 disk_check_seconds: float = 10.0):
        """Memory, three ways (trainers/memory.py):
        - before a run is queued its peak is estimated and a run that cannot fit on the device is
          refused (`memory_check`: default on unless RESTUNING_MEMORY_CHECK=off);
        - each run gets a cap, its estimate with headroom and never more than its share of the
          machine or card (RESTUNING_RUN_MEMORY_SHARE): on the CPU a watchdog on the resident
          memory of its process group kills it when over, on a GPU the trainer holds itself to the
          cap (torch.cuda.set_per_process_memory_fraction). `run_memory_cap`: one fixed cap in
          bytes for every run instead;
        - `memory_limit`: bytes of address space per CPU run, a backstop for what the watchdog
          cannot see in time (-1: default_memory_limit, None: none). CUDA runs are not limited
          this way: the CUDA driver reserves address space far beyond any memory it uses.

        `launcher`: where runs go (default: LocalLauncher on this machine, built from `devices`,
        `per_device`, `command`, `niceness` and `memory_limit`, which only it uses).

        `limits` (trainers.service.limits): the caps of a shared studio, per visitor and in all (runs,
        steps, run time, disk, imports); `max_active_per_owner` sets its runs per visitor. Disk
        and run time are checked every `disk_check_seconds`."""
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.launcher = launcher or LocalLauncher(devices=devices, per_device=per_device, command=command,
                                                  niceness=niceness, memory_limit=memory_limit)
        self.memory_check = memory.check_enabled() if memory_check is None else memory_check
        self.run_memory_cap = run_memory_cap
        self.poll_seconds = poll_seconds
        self.kill_after = kill_after
        # a fair queue on a shared server: one visitor's queued + running runs are capped, and all of them
        self.limits = limits or caps.LOCAL
        if max_active_per_owner is not None:
            self.limits = dataclasses.replace(self.limits, runs_per_owner=max_active_per_owner)
        self.disk_check_seconds = disk_check_seconds
        self._last_disk_check = -math.inf
        self._not_before: dict[str, tuple[float, str]] = {}  # run id -> (monotonic time, why it waits)
        # on a shared server a run's files are served by URL: 64 random bits make its id a secret
        self.id_token_bytes = 8 if unguessable_ids else 2
        self._lock = threading.RLock()
        self._cancel_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events_cache: dict[str, tuple[tuple[int, int], tuple[list, int]]] = {}
        self._recover()

    @property
    def devices(self) -> list[str]:
        """Where runs go; the first is what the form and the memory estimate assume."""
        return self.launcher.devices

    @devices.setter
    def devices(self, devices: list[str]) -> None:
        self.launcher.devices = list(devices)

    # ---- paths -------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        """The folder of an existing run; refuses anything that is not a plain child of runs_dir
        with the words webui.visitors uses for a run a visitor may not see (and no server path),
        so a visitor cannot tell another's run from none."""
        if not isinstance(run_id, str) or not RUN_ID.match(run_id):
            raise JobError(f"not a run id: {run_id!r}")
        path = self.runs_dir / run_id
        if run_id in NOT_RUNS or path.is_symlink() or not path.is_dir() or path.resolve().parent != self.runs_dir:
            raise JobError(f"no run {run_id!r}")
        return path

    @property
    def max_active_per_owner(self) -> int | None:
        return self.limits.runs_per_owner

    def run_ids(self) -> list[str]:
        """Every run folder, a damaged one (no readable job.json) too, so it can be seen and
        deleted; a folder still being made is hidden (STAGING) until it is whole, and the shared
        folders that are no runs (NOT_RUNS) are never listed."""
        ids = [p.name for p in self.runs_dir.iterdir()
               if RUN_ID.match(p.name) and p.name not in NOT_RUNS and p.is_dir() and not p.is_symlink()]
        return sorted(ids, key=lambda i: (_time(_read_json(self.runs_dir / i / JOB_FILE), "created"), i))

    # ---- submitting --------------------------------------------------------------------------

    def new_run_dir(self, label: str = "", *, staging: bool = False) -> tuple[str, Path]:
        """A fresh, empty run folder (holding only the marker that lets the trainer write into it)
        with a safe unique id (time, slug of the label, random). `staging`: a hidden folder (not a
        run id) that `_making` renames into place once the run is whole."""
        for _ in range(10):
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(label)}-{secrets.token_hex(self.id_token_bytes)}"
            path = self.runs_dir / (f"{STAGING}{run_id}" if staging else run_id)
            if staging and (self.runs_dir / run_id).exists():
                continue
            try:
                path.mkdir()
            except FileExistsError:
                continue
            try:
                (path / RUN_MARKER).write_text("made by the studio's job runner\n", encoding="utf-8")
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            return run_id, path
        raise JobError("could not create a unique run folder")

    @contextlib.contextmanager
    def _making(self, label: str):
        """(run id, staging folder) to fill; renamed into the runs folder when the block ends
        without error, removed otherwise, so no half-made run is ever listed or started. A full
        disk is a JobError saying so."""
        self.check_free_disk()
        staging = None
        try:
            run_id, staging = self.new_run_dir(label, staging=True)
            yield run_id, staging
            os.rename(staging, self.runs_dir / run_id)
        except BaseException as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if disk_full(exc):
                raise JobError(f"not queued: {disk_full_message(self.runs_dir)}; nothing was kept. "
                               "Delete runs you no longer need, or try again later") from None
            if isinstance(exc, OSError):
                raise JobError(f"not queued: the run folder could not be written ({exc.strerror or exc})") from None
            raise

    def check_free_disk(self) -> None:
        """JobError when the runs folder's disk has less free than a run needs to start."""
        try:
            free = shutil.disk_usage(self.runs_dir).free
        except OSError:
            return
        if free < self.limits.min_free_disk:
            raise JobError(f"not queued: the server's disk has {caps.size_text(free)} free, less than the "
                           f"{caps.size_text(self.limits.min_free_disk)} a run needs; delete runs you no longer need")

    def submit(self, config: dict, images: list[tuple[str | os.PathLike, str]], *, label: str = "",
               group: str = "", owner: str = "", batch: int = 1) -> str:
        """Create a run from checked images [(source path, safe file name)] and queue it.

        The run's own paths (instance_data_dir, output_dir) are filled in here; the other keys of
        `config` are the trainer's options as given, checked against this studio's caps
        (`check_config`). `batch` runs about to be submitted together count against the limits
        at once, so a comparison is queued whole or not at all.
        """
        config = self.check_config(config)
        # checked and queued under one lock: parallel submissions of one visitor cannot all pass
        # the limit before any of them is counted
        verdict = self.check_memory(config)  # before any folder exists: a refused run leaves nothing
        with self._lock:
            self.check_owner_limit(owner, batch)
            with self._making(label or str(config.get("method", ""))) as (run_id, path):
                instance = path / INSTANCE_DIR
                instance.mkdir()
                for src, name in images:
                    if Path(name).name != name or name in ("", ".", ".."):
                        raise JobError(f"unsafe image file name {name!r}")
                    shutil.copyfile(src, instance / name)
                now = time.time()
                job = {"label": label, "group": group, "created": now, "queued_at": now, "owner": owner}
                if verdict.estimate is not None:
                    job["memory_estimate"] = verdict.estimate.total
                _write_json(path / JOB_FILE, job)
                self._write_config(path, dict(config), self.runs_dir / run_id)
                EventLog(path).phase("queued")
        self.tick()
        return run_id

    def check_config(self, config: dict) -> dict:
        """The config with this studio's caps applied (a copy): JobError for steps over the cap
        or more checkpoints kept than allowed; checkpoints_total_limit filled in when unset, so
        checkpoints are rotated by default."""
        config = dict(config)
        steps = config.get("max_train_steps")
        cap = self.limits.max_steps
        if cap is not None and isinstance(steps, int) and steps > cap:
            raise JobError(f"max_train_steps {steps:,} is over the {cap:,} steps a run may take on this shared studio; "
                           "train fewer steps (a tuner learns a concept in a few hundred)")
        kept, default = config.get("checkpoints_total_limit"), self.limits.checkpoints_kept
        if kept is None and default is not None:
            config["checkpoints_total_limit"] = default
        elif self.limits.shared and default is not None and isinstance(kept, int) and kept > default:
            raise JobError(f"checkpoints_total_limit {kept} is over the {default} checkpoints a run may keep on this shared studio")
        return config

    def import_tuner(self, src: str | os.PathLike, config: dict, *, label: str = "", owner: str = "") -> str:
        """A finished run holding an uploaded tuner file (already checked by trainers.service.uploads), so
        it is listed, downloaded and sampled like a trained one."""
        from safetensors import safe_open

        with self._lock:
            self.check_owner(owner)
            caps.check_import(self, owner, Path(src).stat().st_size)
            with self._making(label or "imported") as (run_id, path):
                shutil.copyfile(src, path / "tuner.safetensors")
                with safe_open(str(path / "tuner.safetensors"), framework="pt") as f:
                    params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
                now = time.time()
                _write_json(path / JOB_FILE, {"label": label, "group": "", "created": now, "imported": True, "owner": owner})
                _write_json(path / CONFIG_FILE, dict(config))
                log = EventLog(path)
                log.emit("info", trainable_params=params, method=config.get("method"), imported_from=Path(src).name)
                log.emit("artifact", kind="tuner", path="tuner.safetensors")
                log.phase("done", message=f"imported from {Path(src).name}")
        return run_id

    def memory_room(self, device: str | None = None) -> memory.Room | None:
        """What one run may use on `device` (the first of this runner's): its share of the card,
        or of the machine divided among the runs a CPU holds at once."""
        return self.launcher.room(device or self.devices[0])

    def memory_verdict(self, config: dict) -> memory.Verdict:
        """The estimate of a run of `config` against what a run may use here (trainers.memory)."""
        device = self.devices[0]
        room = self.memory_room(device)
        if room is None:
            return memory.Verdict("unknown", f"memory: {self.launcher.describe()} does not report the memory of its "
                                  "devices; the trainer checks the run where it starts")
        est = memory.estimate_config(config, device)
        facts = memory.model_facts(str(config.get("pretrained_model_name_or_path") or memory.DEMO_MODEL)) if est else None
        return memory.judge(est, room, facts, queued=True)

    def check_memory(self, config: dict) -> memory.Verdict:
        """JobError for a run whose estimate does not fit what a run may use on this device
        (unless the check is off); else the verdict, whose message warns when it is close."""
        refusal = self.launcher.refusal(config)
        if refusal:
            raise JobError(f"not queued: {refusal}")
        verdict = self.memory_verdict(config)
        if verdict.level == "too-big" and self.memory_check:
            raise JobError(f"not queued: {verdict.message}")
        return verdict

    def _write_config(self, path: Path, config: dict, final: Path | None = None) -> None:
        """config.json in `path`, naming the run's own folder (`final`: where a staging folder
        will be) as its data and output folders."""
        final = final or path
        config["instance_data_dir"] = str(final / INSTANCE_DIR)
        config["output_dir"] = str(final)
        _write_json(path / CONFIG_FILE, config)

    # ---- status ------------------------------------------------------------------------------

    def events(self, run_id: str) -> list[dict]:
        """The run's well-formed events (trainers.events.scan_events)."""
        return self.scanned_events(run_id)[0]

    def scanned_events(self, run_id: str) -> tuple[list[dict], int]:
        """(events, malformed lines skipped), re-read only when the file changed (the UI polls
        every second)."""
        path = self.run_dir(run_id) / EVENTS_FILE
        try:
            st = path.stat()
            key = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            return [], 0
        cached = self._events_cache.get(run_id)
        if cached and cached[0] == key:
            return cached[1]
        scanned = scan_events(path.parent)
        self._events_cache[run_id] = (key, scanned)
        return scanned

    def _state(self, run_id: str, path: Path) -> str:
        """'waiting' (handed to the launcher, not started yet), 'running', or 'ended' (or never launched)."""
        record = _read_json(path / PROCESS_FILE)
        return self.launcher.state(run_id, record) if record else "ended"

    def _alive(self, run_id: str, path: Path) -> bool:
        return self._state(run_id, path) != "ended"

    def queue(self) -> list[str]:
        """Waiting runs, first to start first (a damaged folder never starts)."""
        waiting = []
        for run_id in self.run_ids():
            path = self.runs_dir / run_id
            if last_phase(self.events(run_id)) == "queued" and not (path / PROCESS_FILE).exists():
                job, _ = _job(path)
                if job is not None:
                    waiting.append((_time(job, "queued_at"), run_id))
        return [run_id for _, run_id in sorted(waiting)]

    def info(self, run_id: str, *, queue: list[str] | None = None) -> RunInfo:
        """What the studio shows of a run. Its status never runs ahead of its process: a run whose
        trainer has written its final phase is `running` until the process has exited (it may
        still be writing its checkpoint), and only then done, failed or cancelled (and resumable)."""
        path = self.run_dir(run_id)
        job, damage = _job(path)
        events, skipped = self.scanned_events(run_id)
        phase = last_phase(events)
        state = self._state(run_id, path)
        alive = state != "ended"
        # "waiting": handed to the launcher, not started; or in this runner's own queue
        waiting = state == "waiting" or (phase == "queued" and not (path / PROCESS_FILE).exists())
        status = _status(phase, state == "running", waiting=waiting, damaged=job is None)
        job = job or {}
        info = RunInfo(id=run_id, dir=path, status=status, phase=phase, label=str(job.get("label", "")),
                       group=str(job.get("group", "")), created=_time(job, "created"), device=str(job.get("device", "")),
                       config=_read_json(path / CONFIG_FILE), events=events, alive=alive,
                       owner=str(job.get("owner", "")), published=bool(job.get("published", False)),
                       skipped_events=skipped, imported=bool(job.get("imported", False)))
        if status == "queued":
            waiting = self.queue() if queue is None else queue
            info.position = waiting.index(run_id) + 1 if run_id in waiting else None
            info.waiting = self._not_before.get(run_id, (0.0, ""))[1]
        final = next((e for e in reversed(events) if e.get("event") == "phase"), {})
        if status == "damaged":
            info.error, info.hint = f"this run folder is damaged: {damage}", "delete it; its files stay on the disk until then"
        elif status == "failed":
            self._explain_failure(info, final)
        elif status == "cancelled" and job.get("cancel_reason"):
            info.hint = str(job["cancel_reason"])
        # the trainer's own error and hint say what went wrong; the log's last lines are shown when
        # nothing else does (a process that died without a word: the runner's event carries them)
        if status == "cancelled" or (status == "failed" and (final.get("phase") != "failed" or "log_tail" in final)):
            info.log_tail = log_tail(path)
        info.checkpoint = self._last_checkpoint(path, events)
        info.resumable = status in ("failed", "cancelled") and info.checkpoint is not None
        return info

    def _explain_failure(self, info: RunInfo, final: dict) -> None:
        info.error = redact(str(final.get("error") or "the training process stopped without reporting why"), info.dir)
        info.hint = redact(str(final.get("hint") or ""), info.dir)
        if not final.get("error") and _low_on_disk(self.runs_dir, 0):
            info.hint = f"{disk_full_message(self.runs_dir)}: it may have stopped for lack of space"
        record = _read_json(info.dir / PROCESS_FILE)
        # on a GPU the trainer's own cap on the card; on the CPU the address-space limit (the
        # watchdog's kill says its cap in the error already)
        limit = record.get("memory_cap") if str(record.get("device", "")).startswith("cuda") else record.get("memory_limit")
        if (isinstance(limit, int) and "allowed for a run" not in info.error
                and MEMORY_WORDS.search(info.error + "\n" + "\n".join(log_tail(info.dir, 5)))):
            info.hint = f"{memory_cap_message(limit)}; " + (info.hint or MEMORY_CAP_HINT)

    def list_runs(self) -> list[RunInfo]:
        waiting = self.queue()
        return [self.info(run_id, queue=waiting) for run_id in reversed(self.run_ids())]

    @staticmethod
    def _last_checkpoint(path: Path, events: list[dict]) -> str | None:
        """The newest checkpoint that looks whole on disk (trainers.checkpoints; the trainer
        verifies it further when it resumes, and falls back to an older one)."""
        for event in reversed(events):
            if event.get("event") == "checkpoint" and event.get("path"):
                target = (path / event["path"]).resolve()
                if target.is_relative_to(path.resolve()) and checkpoints.problem(target) is None:
                    return event["path"]
        return None

    def check_owner(self, owner: str) -> None:
        """On a shared studio every run belongs to a visitor: one without an id (an API client
        that skipped the page's load event) could neither see nor cancel its runs, and no
        per-visitor limit would hold it."""
        if self.max_active_per_owner is not None and not owner:
            raise JobError("this studio is shared and every run belongs to a visitor: open the studio's page "
                           "(an API client calls the page's load endpoint first, in the same session)")

    def check_owner_limit(self, owner: str, batch: int = 1) -> None:
        """JobError when `batch` more runs would take this visitor, or all visitors together, past
        this studio's caps (trainers.service.limits: runs queued or running, disk held)."""
        self.check_owner(owner)
        caps.check_new_runs(self, owner, batch)

    # ---- actions -----------------------------------------------------------------------------

    def publish(self, run_id: str, published: bool = True) -> None:
        """Share a run with every visitor of a shared studio (read-only for them), or stop sharing."""
        with self._lock:
            path = self.run_dir(run_id)
            job = _read_json(path / JOB_FILE)
            job["published"] = bool(published)
            _write_json(path / JOB_FILE, job)

    def cancel(self, run_id: str, reason: str = "") -> str:
        """Queued: leaves the queue. Running: SIGTERM to its process group; the trainer saves a
        checkpoint and reports `cancelled` (SIGKILL follows after `kill_after` seconds).
        `reason`: why the studio stopped it (a cap), shown with the cancelled run."""
        with self._lock:
            info = self.info(run_id)
            if info.status == "queued" and not info.alive:
                EventLog(info.dir).phase("cancelled", message=reason or "removed from the queue before it started")
                return "removed from the queue"
            if info.status not in ("queued", "running"):
                raise JobError(f"run {run_id} is {info.status}; only queued or running runs can be cancelled")
            if info.phase in FINAL_PHASES or run_id in self._cancel_at:
                return "stopping already: it ends once its last files are written"
            record = _read_json(info.dir / PROCESS_FILE)
            self.launcher.stop(record)  # first: a full disk must not keep a run going
            self._cancel_at[run_id] = time.monotonic()
            job = _read_json(info.dir / JOB_FILE)
            job["cancel_requested"] = time.time()
            if reason:
                job["cancel_reason"] = reason
            try:
                _write_json(info.dir / JOB_FILE, job)
            except OSError:
                pass  # the trainer reports `cancelled` itself; only the reason is lost
            return "stopping: the trainer saves a checkpoint, then ends"

    def _settled(self, info: RunInfo, action: str) -> None:
        if info.status == "running" and info.phase in FINAL_PHASES:
            raise JobError(f"run {info.id} is still stopping; {action} it in a moment")

    def resume(self, run_id: str) -> str:
        """Queue a failed or cancelled run again, continuing from its last checkpoint (once its
        process has exited: the status says so only then)."""
        with self._lock:
            info = self.info(run_id)
            self._settled(info, "resume")
            if info.status not in ("failed", "cancelled"):
                raise JobError(f"run {run_id} is {info.status}; only failed or cancelled runs can be resumed")
            if not info.resumable:
                raise JobError(f"run {run_id} saved no checkpoint to resume from; start a new run instead")
            self.check_owner_limit(info.owner)
            self.check_free_disk()
            config = self.check_config(dict(info.config))
            config["resume_from_checkpoint"] = "latest"
            self._write_config(info.dir, config)
            job = _read_json(info.dir / JOB_FILE)
            job.pop("cancel_requested", None)
            job.pop("cancel_reason", None)
            job["queued_at"] = time.time()
            _write_json(info.dir / JOB_FILE, job)
            (info.dir / PROCESS_FILE).unlink(missing_ok=True)
            # the earlier process has ended (not alive): forget it, so its end is not reported again
            self._cancel_at.pop(run_id, None)
            self.launcher.forget(run_id)
            EventLog(info.dir).phase("queued", message=f"resuming from {info.checkpoint}")
        self.tick()
        return f"queued again; it resumes from {info.checkpoint}"

    def delete(self, run_id: str) -> None:
        """Remove a run folder (a damaged one too); a queued or running run must be cancelled first."""
        with self._lock:
            info = self.info(run_id)
            self._settled(info, "delete")
            if info.status in ("queued", "running"):
                raise JobError(f"run {run_id} is {info.status}; cancel it before deleting")
            shutil.rmtree(info.dir)
            self._events_cache.pop(run_id, None)
            self._not_before.pop(run_id, None)

    # ---- the scheduler -----------------------------------------------------------------------

    def start(self) -> "JobRunner":
        """Run `tick` in a daemon thread every `poll_seconds`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="restuning-jobs", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop scheduling (running processes keep going; a new runner adopts them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception as exc:  # the scheduler must outlive one bad run folder
                print(f"jobs: {type(exc).__name__}: {exc}", file=sys.stderr)

    def tick(self) -> None:
        """Reap ended processes, escalate overdue cancels, hold running runs to the caps, start
        queued runs where the launcher has room."""
        with self._lock:
            self._reap()
            if time.monotonic() - self._last_disk_check >= self.disk_check_seconds:
                self._last_disk_check = time.monotonic()
                self._enforce_caps()
            self._start_queued()

    def _reap(self) -> None:
        for run_id, how in self.launcher.reap():
            if how is None:
                self._requeue(run_id)
            else:
                self._finish(run_id, how)
        for run_id, since in list(self._cancel_at.items()):
            path = self.runs_dir / run_id
            record = _read_json(path / PROCESS_FILE)
            if not record or self.launcher.state(run_id, record) == "ended":
                self._cancel_at.pop(run_id)
                if record:
                    self._finish(run_id, "stopped")  # a no-op once the process or the reaping said more
            elif time.monotonic() - since > self.kill_after:
                self.launcher.stop(record, force=True)

    def _start_queued(self) -> None:
        held = self._held()
        for run_id in self.queue():
            if time.monotonic() < self._not_before.get(run_id, (0.0, ""))[0]:
                continue
            device = self.launcher.next_device(held)
            if device is None:
                break
            if _low_on_disk(self.runs_dir, self.limits.min_free_disk):
                # started now, it would fail at its first checkpoint: it waits, saying why
                self._not_before[run_id] = (time.monotonic() + 5, f"waiting for disk space: {disk_full_message(self.runs_dir)}")
                break
            try:
                held.append(self._launch(run_id, device))
            except (OSError, ValueError, TypeError) as exc:
                self._launch_failed(run_id, exc)
                continue
            self._not_before.pop(run_id, None)

    def _launch_failed(self, run_id: str, exc: Exception) -> None:
        """A run that could not start: with a full disk it stays queued and says so (it starts
        once there is room); otherwise its folder is damaged and it fails alone, the queue goes on."""
        if disk_full(exc):
            self._not_before[run_id] = (time.monotonic() + 30, f"waiting: {disk_full_message(self.runs_dir)}")
            return
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            EventLog(self.runs_dir / run_id).phase("failed", error=f"the run could not start: {why}",
                                                   hint="start a new run; this one's folder is damaged")
        except OSError:
            self._not_before[run_id] = (time.monotonic() + 30, "waiting: its folder cannot be written")

    def _enforce_caps(self) -> None:
        """Stop, with a checkpoint, a running run past the run time a run may take at a time, or
        whose visitor (or the whole runs folder) holds more disk than allowed. A stopped run can
        be resumed: it goes to the back of the queue."""
        lim = self.limits
        if lim.max_run_seconds is None and lim.disk_total is None and lim.disk_per_owner is None:
            return
        runs = self.list_runs()
        running = [r for r in runs if r.status == "running" and r.phase not in FINAL_PHASES and r.id not in self._cancel_at]
        total = caps.folder_bytes(self.runs_dir) if lim.disk_total is not None and running else 0
        for info in running:
            started = _time(_read_json(info.dir / PROCESS_FILE), "started")
            reason = ""
            if lim.max_run_seconds is not None and started and time.time() - started > lim.max_run_seconds:
                reason = (f"it trained for the {lim.max_run_seconds / 60:.0f} minutes a run may take at a time on this "
                          "shared studio; resume it to continue (it goes to the back of the queue)")
            elif lim.disk_total is not None and total > lim.disk_total:
                reason = (f"the studio's runs hold {caps.size_text(total)}, over its {caps.size_text(lim.disk_total)} cap; "
                          "delete runs you no longer need, then resume it")
            elif (lim.disk_per_owner is not None and info.owner
                  and caps.owner_bytes(self, info.owner, runs) > lim.disk_per_owner):
                reason = (f"your runs hold more than the {caps.size_text(lim.disk_per_owner)} a visitor may keep here; "
                          "delete runs you no longer need, then resume it")
            if reason:
                self.cancel(info.id, reason=f"stopped by the studio: {reason}")

    def _held(self) -> list[dict]:
        """The records of the runs that hold a place (a run still exiting after its final phase
        holds its device too); each running one is shown to the launcher's watchdog."""
        held = []
        for run_id in self.run_ids():
            path = self.runs_dir / run_id
            record = _read_json(path / PROCESS_FILE)
            state = self.launcher.state(run_id, record) if record else "ended"
            if state != "ended":
                held.append(record)
            if state == "running":
                self.launcher.watch(run_id, path, record)
        return held

    def _launch(self, run_id: str, device: str) -> dict:
        path = self.runs_dir / run_id
        record = self.launcher.launch(run_id, path, device, self._run_cap(path, device))
        try:
            _write_json(path / PROCESS_FILE, record)
            job = _read_json(path / JOB_FILE)
            job["device"] = str(record.get("device", device))
            _write_json(path / JOB_FILE, job)
        except BaseException:
            self._abandon(run_id, record)
            raise
        return record

    def _abandon(self, run_id: str, record: dict) -> None:
        """A run started whose record could not be written (its process.json: the disk filled):
        it is stopped at once, so no trainer runs on that the studio does not know of, and the run
        is queued as before."""
        self.launcher.stop(record, force=True)
        self.launcher.forget(run_id)
        (self.runs_dir / run_id / PROCESS_FILE).unlink(missing_ok=True)

    def _requeue(self, run_id: str) -> None:
        """A run the launcher handed back without starting it (a cluster that found no room in
        time): it waits again at its old place in the queue."""
        path = self.runs_dir / run_id
        (path / PROCESS_FILE).unlink(missing_ok=True)
        with open(path / LOG_FILE, "ab") as log:
            log.write(b"studio: the cluster had no room for this run in time; it waits in the queue again\n")

    def _run_cap(self, path: Path, device: str) -> int | None:
        """A run's memory cap: its estimate (from job.json) with headroom, never more than its
        share of the device (trainers.memory.run_cap); `run_memory_cap` when the runner has one."""
        if self.run_memory_cap:
            return int(self.run_memory_cap)
        estimate = _read_json(path / JOB_FILE).get("memory_estimate")
        room = self.memory_room(device)
        if room is None:
            return None
        limit = room.limit
        if isinstance(estimate, int) and not isinstance(estimate, bool) and estimate > 0:
            return memory.run_cap(memory.Estimate(estimate, {}, device, {}), limit)
        return limit

    def _finish(self, run_id: str, how: str) -> None:
        """A process ended: if the trainer did not write a final phase, write one for it (with a
        full disk that may fail too: the run then shows `failed` from its files alone, saying the
        disk is full)."""
        path = self.runs_dir / run_id
        if not path.is_dir() or last_phase(read_events(path)) in FINAL_PHASES:
            return
        try:
            if _read_json(path / JOB_FILE).get("cancel_requested"):
                EventLog(path).phase("cancelled", message=f"cancelled; the process ended ({how}) without reporting")
                return
            tail = log_tail(path, 10)
            if _low_on_disk(self.runs_dir, 0) or any(DISK_WORDS.search(line) for line in tail):
                EventLog(path).phase("failed", error=f"the training process ended ({how}): {disk_full_message(self.runs_dir)}",
                                     hint="free space (delete runs you no longer need), then resume it", log_tail=tail)
                return
            EventLog(path).phase("failed", error=f"the training process ended ({how}) without finishing",
                                 hint="the last lines of train.log show why" if tail else "train.log is empty",
                                 log_tail=tail)
        except OSError:
            pass

    def _recover(self) -> None:
        """At start-up: runs whose process died while the app was away are marked failed; live
        ones are adopted (the launcher finds them by their record), queued ones wait as before; run folders left half-made
        by a studio that stopped while making them are removed."""
        for staging in self.runs_dir.glob(f"{STAGING}*"):
            # an hour old: not one another studio on the same folder is making right now
            if staging.is_dir() and not staging.is_symlink() and time.time() - staging.stat().st_mtime > 3600:
                shutil.rmtree(staging, ignore_errors=True)
        for run_id in self.run_ids():
            path = self.runs_dir / run_id
            record = _read_json(path / PROCESS_FILE)
            if not record:
                continue
            phase = last_phase(read_events(path))
            alive = self.launcher.state(run_id, record) != "ended"
            if phase not in FINAL_PHASES and not alive:
                self._finish(run_id, self.launcher.how_it_ended(path, record))
            elif alive:
                self.launcher.adopt(run_id, path, record)
                if _read_json(path / JOB_FILE).get("cancel_requested"):
                    self._cancel_at[run_id] = time.monotonic()
