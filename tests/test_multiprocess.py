"""One run across several processes with the configs in configs/accelerate/ (docs/cluster.md):
two "machines" on the loopback address (two `accelerate launch` with machine ranks 0 and 1) train
one run, and the FSDP config for full fine-tuning runs the trainer on two processes. CPU only,
gloo: what these tests show, and what they cannot (FSDP's sharding needs GPUs), is in each."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trainers.events import read_events

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
DEMO = ROOT / "assets" / "demo-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *args: str, extra=(), env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *extra, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trainer_args(out: Path, method: str) -> list[str]:
    return ["-m", "trainers.dreambooth", "--method", method, "--instance_data_dir", str(ROOT / "assets" / "concepts" / "star"),
            "--instance_prompt", "a sks shape", "--resolution", "64", "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--output_dir", str(out)]


def finish(*procs: subprocess.Popen) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_machines_on_loopback_train_one_run(tmp_path):
    out = tmp_path / "run"
    port = ["--main_process_port", str(free_port())]
    nodes = [launch("multi-node.yaml", *trainer_args(out, "bypass"), extra=["--machine_rank", str(rank), *port]) for rank in (0, 1)]
    finish(*nodes)
    events = read_events(out)
    assert [e["phase"] for e in events if e["event"] == "phase"] == ["loading", "training", "saving", "done"], "one writer"
    assert next(e for e in events if e["event"] == "info")["num_processes"] == 2
    assert [e["step"] for e in events if e["event"] == "step"][-1] == 3
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"], "both machines' processes took part"
    assert (out / "tuner.safetensors").is_file()


def test_the_fsdp_config_trains_a_full_fine_tune_on_two_processes(tmp_path):
    out = tmp_path / "run"
    finish(launch("fsdp-full.yaml", *trainer_args(out, "full"), extra=["--num_processes", "2", "--main_process_port", str(free_port())]))
    events = read_events(out)
    assert events[-1]["phase"] == "done" and next(e for e in events if e["event"] == "info")["num_processes"] == 2
    base, tuned = load_file(DEMO / "unet" / "diffusion_pytorch_model.safetensors"), load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == base.keys() and all(tuned[k].shape == base[k].shape for k in base), "the whole U-Net, not a shard"
    assert sum(not tuned[k].equal(base[k]) for k in base) > 0.9 * len(base), "trained"


def test_without_gpus_accelerate_runs_the_fsdp_config_as_plain_data_parallel(tmp_path):
    """What the CPU test above does not show: accelerate shards only on accelerators. On CPUs
    (ACCELERATE_USE_CPU) it runs the FSDP config as MULTI_CPU data parallel, every process holding
    every parameter. When this fails, accelerate shards on CPUs too: docs/cluster.md should say so."""
    finish(launch("fsdp-full.yaml", str(ROOT / "tests" / "accelerate_probe.py"), str(tmp_path),
                  extra=["--num_processes", "2", "--main_process_port", str(free_port())]))
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report-*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {(r["distributed_type"], r["wrapper"], r["held"] == r["total"]) for r in reports} == {("MULTI_CPU", "DistributedDataParallel", True)}
