"""A shared studio (the Space mode) served in this process on a free port, over a job runner
whose trainer is tests/fake_trainer.py: what a hostile visitor reaches over HTTP."""

import pytest

from tests.e2e.conftest import free_port
from tests.test_jobs import images, make_runner  # noqa: F401 (images is a fixture)


def serve_shared(runner, **launch):
    """(url, demo) of a shared studio over `runner`, launched in this process."""
    import webui
    from webui.model import describe

    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test", shared=True)
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **{**webui.launch_options(runner, "127.0.0.1", port, shared=True), **launch})
    return f"http://127.0.0.1:{port}", demo


@pytest.fixture
def shared_demo(tmp_path):
    """(url, runner, demo) of a shared studio: each visitor sees only their own and published runs."""
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2, unguessable_ids=True)
    url, demo = serve_shared(runner)
    yield url, runner, demo
    demo.close()


@pytest.fixture
def shared_studio(shared_demo):
    """(url, runner) of a shared studio."""
    url, runner, _ = shared_demo
    return url, runner
