"""Browser tests: the studio (`python app.py`) served on a free port with a fresh runs folder,
driven through Playwright by the system's Chromium (Debian's `chromium`; never `playwright
install`, which downloads a browser)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "assets" / "demo-model"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium found (install Debian's `chromium`; .ci/run does) - the browser tests need it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_runs(runs_dir: Path) -> None:
    """Training processes live in their own sessions (they outlive the app by design): end the
    ones this test started, by their recorded process group."""
    for record in runs_dir.glob("*/process.json"):
        try:
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError, KeyError):
            pass


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(url, runs folder) of a running `python app.py` on the bundled demo model."""
    runs = tmp_path_factory.mktemp("studio") / "runs"
    port = free_port()
    yield from serve(runs, ["--port", str(port)], {"RESTUNING_RUNS_DIR": str(runs)}, port)


def serve(runs: Path, args: list[str], extra_env: dict, port: int):
    """Run `python app.py *args` with extra_env until the generator is closed; yields (url, runs)."""
    if not (DEMO_MODEL / "model_index.json").exists():
        pytest.skip("assets/demo-model is missing (scripts/build_demo_model.py builds it)")
    runs.parent.mkdir(parents=True, exist_ok=True)
    log = open(runs.parent / "app.log", "wb")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", **extra_env)
    proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the studio did not start:\n" + (runs.parent / "app.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, runs
    proc.terminate()
    proc.wait(timeout=30)
    stop_runs(runs)
    log.close()


@pytest.fixture
def page(browser, studio):
    context = browser.new_context(viewport={"width": 1400, "height": 1200}, accept_downloads=True)
    page = context.new_page()
    page.goto(studio[0])
    page.wait_for_selector("#train", timeout=30_000)
    yield page
    context.close()
