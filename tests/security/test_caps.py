"""Issue 26, items 3 and 4: identities are free on a shared studio, so every per-visitor cap has a
global twin (trainers.service.limits): runs queued, steps and run time per run, disk per visitor and in
all with checkpoints rotated by default, imports, prompt length, the upload route per client; and
sampling shares the device: one visitor's grid does not hold another's Generate for its length."""

import dataclasses
import json
import threading
import time

import pytest

import webui
from tests.test_jobs import make_runner, wait_for, wait_step
from trainers.service import limits
from trainers.service.jobs import JobError
from trainers.sampling import Column, Sampler, Settings
from webui import files

SLOW = {"method": "res-tuning", "max_train_steps": 400, "fake_step_seconds": 0.05}
SHARED = dataclasses.replace(limits.SHARED, queued_total=4, min_free_disk=0)


def visitors(n):
    return [webui.identify(None)[1] for _ in range(n)]


def stop_all(runner):
    for run in runner.list_runs():
        if run.status in ("queued", "running"):
            runner.cancel(run.id)


def test_twenty_sessions_cannot_queue_twenty_runs(tmp_path, images):
    runner = make_runner(tmp_path / "runs", limits=SHARED)
    queued, refused = [], []
    try:
        for owner in visitors(20):
            try:
                queued.append(runner.submit(SLOW, images, owner=owner))
            except JobError as exc:
                refused.append(str(exc))
        assert len(queued) == 4 and len(refused) == 16
        assert "the studio's queue is full: 4 runs are queued or running, 4 at most" in refused[0]
    finally:
        stop_all(runner)


def test_a_run_of_a_million_steps_is_refused_and_a_long_one_stopped_at_its_time(tmp_path, images):
    runner = make_runner(tmp_path / "runs", limits=dataclasses.replace(SHARED, max_run_seconds=600), disk_check_seconds=0)
    owner = visitors(1)[0]
    with pytest.raises(JobError, match="max_train_steps 1,000,000 is over the 3,000 steps a run may take"):
        runner.submit({**SLOW, "max_train_steps": 1_000_000}, images, owner=owner)
    run_id = runner.submit(SLOW, images, owner=owner)
    wait_step(runner, run_id, 1)
    record = runner.run_dir(run_id) / "process.json"
    started = json.loads(record.read_text())
    started["started"] -= 3600  # as if it had trained for an hour: no waiting on the clock
    record.write_text(json.dumps(started))
    info = wait_for(runner, run_id, {"cancelled"}, timeout=60)
    assert "trained for the 10 minutes a run may take at a time" in info.hint and info.resumable
    assert "resume it to continue" in webui.live.log_text(info)


def test_checkpoints_are_rotated_by_default_and_their_number_capped(tmp_path, images):
    runner = make_runner(tmp_path / "runs", limits=SHARED)
    owner = visitors(1)[0]
    run_id = runner.submit({"max_train_steps": 8, "checkpointing_steps": 1}, images, owner=owner)
    info = wait_for(runner, run_id, {"done"})
    assert info.config["checkpoints_total_limit"] == SHARED.checkpoints_kept == 2
    with pytest.raises(JobError, match="checkpoints_total_limit 50 is over the 2 checkpoints"):
        runner.submit({"max_train_steps": 8, "checkpoints_total_limit": 50}, images, owner=owner)
    assert make_runner(tmp_path / "local").check_config({})["checkpoints_total_limit"] == limits.LOCAL.checkpoints_kept


def test_disk_is_capped_per_visitor_and_in_all(tmp_path, images):
    alice, bob = visitors(2)
    runner = make_runner(tmp_path / "runs", limits=dataclasses.replace(SHARED, disk_per_owner=1 << 20, disk_total=8 << 20))
    first = wait_for(runner, runner.submit({"max_train_steps": 1}, images, owner=alice), {"done"})
    (first.dir / "big.bin").write_bytes(b"\0" * (1 << 20))  # alice's runs now hold her share
    with pytest.raises(JobError, match="your runs and pictures hold 1.0 MB"):
        runner.submit({"max_train_steps": 1}, images, owner=alice)
    assert wait_for(runner, runner.submit({"max_train_steps": 1}, images, owner=bob), {"done"}).status == "done"
    (first.dir / "bigger.bin").write_bytes(b"\0" * (8 << 20))
    with pytest.raises(JobError, match="the studio's runs hold .* its cap is 8.0 MB"):
        runner.submit({"max_train_steps": 1}, images, owner=bob)


def test_a_running_run_past_its_visitors_disk_is_stopped(tmp_path, images):
    owner = visitors(1)[0]
    runner = make_runner(tmp_path / "runs", limits=dataclasses.replace(SHARED, disk_per_owner=4 << 20), disk_check_seconds=0)
    run_id = runner.submit(SLOW, images, owner=owner)
    wait_step(runner, run_id, 1)
    (runner.run_dir(run_id) / "growing.bin").write_bytes(b"\0" * (5 << 20))  # its checkpoints grew
    info = wait_for(runner, run_id, {"cancelled"}, timeout=60)
    assert "your runs hold more than the 4.0 MB a visitor may keep" in info.hint


def test_imports_are_capped(tmp_path):
    owner = visitors(1)[0]
    runner = make_runner(tmp_path / "runs", limits=dataclasses.replace(SHARED, imports_per_owner=2, imports_total=3))
    tuner = tmp_path / "t.safetensors"
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"w": np.zeros(4, dtype=np.float32)}, str(tuner))
    for _ in range(2):
        runner.import_tuner(tuner, {"method": "lora"}, owner=owner)
    with pytest.raises(JobError, match="you have imported 2 tuners, the 2 a visitor may keep"):
        runner.import_tuner(tuner, {"method": "lora"}, owner=owner)
    runner.import_tuner(tuner, {"method": "lora"}, owner=visitors(1)[0])
    with pytest.raises(JobError, match="holds 3 imported tuners"):
        runner.import_tuner(tuner, {"method": "lora"}, owner=visitors(1)[0])


def test_a_long_prompt_is_refused_by_the_form_and_the_trainer_alike():
    from tests.test_webui import config as form_config
    from trainers.options import OptionError

    with pytest.raises(OptionError, match="--instance_prompt is 1,000,000 characters long"):
        form_config(instance_prompt="a" * 1_000_000)
    from webui.compare_tab import plan_rows

    with pytest.raises(webui.gr.Error, match="at most 1,000"):
        plan_rows("a" * 5000, "", "", "0", 10, 3.0, "DDIM", 64, 64)


def test_the_upload_route_has_a_quota_per_client_and_in_all():
    clock = [0.0]
    quota = files.UploadQuota(None, per_client=10 << 20, total=25 << 20, hops=1, clock=lambda: clock[0])
    assert quota.charge("1.2.3.4", 8 << 20) is None
    assert "this address has uploaded 8 MB in the last hour" in quota.charge("1.2.3.4", 4 << 20)
    assert quota.charge("5.6.7.8", 9 << 20) is None and quota.charge("9.9.9.9", 7 << 20) is None
    assert "all the uploads it takes in an hour" in quota.charge("8.8.8.8", 2 << 20)
    clock[0] = 3601
    assert quota.charge("1.2.3.4", 8 << 20) is None, "an hour later the window has moved"
    spoofed = {"headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4")], "client": ("10.0.0.1", 1)}
    assert files.client_address(spoofed, 1) == "1.2.3.4", "the address the trusted proxy saw, not the client's claim"
    assert files.client_address(spoofed, 0) == "10.0.0.1"


def test_the_shared_studios_upload_route_refuses_a_client_over_its_quota(tmp_path):
    import urllib.error
    import urllib.request

    from tests.security.conftest import serve_shared

    runner = make_runner(tmp_path / "runs", limits=dataclasses.replace(SHARED, upload_per_client=64 << 10))
    url, demo = serve_shared(runner)
    try:
        def upload(size):
            boundary = "xyz"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.bin\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
            request = urllib.request.Request(f"{url}/gradio_api/upload", data=body, method="POST",
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code
        assert upload(40 << 10) == 200
        assert upload(40 << 10) == 429, "without a page, without a session: the address's quota holds"
    finally:
        demo.close()


class SlowPipe:
    """A stand-in for the pipeline whose every call waits until the test lets it finish, and
    records who called: the order of calls is the test's, never the clock's."""

    def __init__(self):
        from diffusers import DDIMScheduler
        from torch import nn

        self.unet, self.text_encoder, self.scheduler = nn.Module(), None, DDIMScheduler()
        self.calls, self.started, self.release = [], threading.Semaphore(0), threading.Semaphore(0)

    def __call__(self, prompt, **kwargs):
        from PIL import Image

        self.calls.append(prompt[0])
        self.started.release()
        assert self.release.acquire(timeout=60), "the test never let the call finish"
        return type("Out", (), {"images": [Image.new("RGB", (8, 8))] * len(prompt)})()


def test_a_long_grid_yields_the_device_between_its_rows():
    pipe = SlowPipe()
    sampler = Sampler(pipe)
    grid = [Settings(f"grid row {r}", seed=r, steps=1) for r in range(4)]
    threads = [threading.Thread(target=sampler.render, args=([Column("base")], grid))]
    threads[0].start()
    assert pipe.started.acquire(timeout=60)  # the grid's first row is on the device
    threads.append(threading.Thread(target=sampler.render, args=([Column("base")], [Settings("generate", steps=1)])))
    threads[1].start()
    deadline = time.monotonic() + 60
    while sampler.turns.waiting < 1:  # the Generate asks for its turn
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(5):
        pipe.release.release()
    for t in threads:
        t.join(timeout=60)
    assert pipe.calls == ["grid row 0", "generate", "grid row 1", "grid row 2", "grid row 3"]
