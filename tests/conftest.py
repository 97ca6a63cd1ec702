import json
import os
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

# One OpenMP thread, before torch loads: the tests' models are tiny, and on a busy 2-core machine a
# second thread only waits on the first (tests/test_bypass_designs.py: 8.6 s with one, 284 s with the
# default at load 2-4). Trainer subprocesses the tests start inherit it, as the job launcher sets it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*xFormers.*")

# Everything the tests and the processes they start put in "the system temp folder" (tempfile,
# Gradio's upload cache, torch's elastic launcher) goes into one folder that goes when the run ends.
_TEMP_ROOT = tempfile.mkdtemp(prefix="restuning-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _TEMP_ROOT
os.environ["GRADIO_TEMP_DIR"] = os.path.join(_TEMP_ROOT, "gradio")  # its own folder, as /tmp/gradio is


def _started_here() -> list[int]:
    """Every other live process whose environment has this run's TMPDIR: each one a test started,
    and theirs (Linux's /proc; elsewhere none are found)."""
    marker = f"TMPDIR={_TEMP_ROOT}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and marker in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                found.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return found


def _alive(proc: Path) -> bool:
    try:
        return proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def pytest_unconfigure(config):
    # Trainers live in sessions of their own (they outlive the studio by design): end those a test
    # left running, by their recorded process group, and every process started from this run (one
    # whose record was not written yet wrote its run into the temp folder after it had gone),
    # before their folders go.
    for record in Path(_TEMP_ROOT).rglob("process.json"):
        try:
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for pid in _started_here():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while _started_here() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutil.rmtree(_TEMP_ROOT, ignore_errors=True)


@pytest.fixture
def arch():
    """The architecture `tiny_unet` and `unet_inputs` are built for: a test runs on every family
    with @pytest.mark.parametrize("arch", restuning.arch.TINY_ARCHS)."""
    return "tiny"


@pytest.fixture
def tiny_unet(arch):
    from restuning.arch import build_unet

    return build_unet(arch, seed=0).eval()


class UNetInputs(tuple):
    """(sample, timesteps, text) for `unet(*inputs)`, and in `.kwargs` what else the U-Net's
    family needs (SDXL's added_cond_kwargs); call it with `forward(unet, inputs)`."""

    kwargs: dict


def make_inputs(arch: str, batch: int = 2, tokens: int = 7) -> UNetInputs:
    from restuning.arch import ARCHS, added_cond_kwargs

    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700] * (batch // 2) + [10] * (batch % 2))
    text = torch.randn(batch, tokens, ARCHS[arch]["cross_attention_dim"], generator=g)
    kwargs = {}
    if ARCHS[arch].get("addition_embed_type"):
        kwargs = {"added_cond_kwargs": added_cond_kwargs(ARCHS[arch], batch, size=64, generator=g)}
    return _rebuild((sample, timesteps, text), kwargs)


@pytest.fixture
def unet_inputs(arch):
    return make_inputs(arch)


def cast(inputs: UNetInputs, dtype) -> UNetInputs:
    """The inputs with every floating-point tensor in `dtype`, the added conditioning too."""
    def to(t):
        return t.to(dtype) if t.is_floating_point() else t

    return _rebuild((to(t) for t in inputs), {k: {n: to(t) for n, t in v.items()} for k, v in inputs.kwargs.items()})


def _rebuild(parts, kwargs) -> UNetInputs:
    out = UNetInputs(parts)
    out.kwargs = kwargs
    return out


def with_text(inputs: UNetInputs, text) -> UNetInputs:
    """The same call with other text embeddings."""
    return _rebuild((inputs[0], inputs[1], text), inputs.kwargs)


def repeat(inputs: UNetInputs, times: int) -> UNetInputs:
    """The batch repeated `times` over (as classifier-free guidance doubles it), conditioning too."""
    def rep(t):
        return torch.cat([t] * times)

    return _rebuild((rep(t) for t in inputs), {k: {n: rep(t) for n, t in v.items()} for k, v in inputs.kwargs.items()})


def forward(unet, inputs):
    return unet(*inputs, **getattr(inputs, "kwargs", {}))


def run(unet, inputs):
    with torch.no_grad():
        return forward(unet, inputs).sample


def frozen_run(unet, inputs):
    """run() with the backbone's weights frozen, as attach leaves them (their requires_grad flags
    restored after): the reference a tuner that starts as the identity must reproduce exactly. On
    some CPUs PyTorch folds a 3-D input of a linear layer whose weight requires grad into another
    matmul than one whose weight does not (SDXL's linear proj_in), and the outputs differ in their
    last bits with no tuner attached."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        return run(unet, inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
