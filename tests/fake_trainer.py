"""A stand-in for `trainers.dreambooth` that obeys the same contract without torch: reads
`--config`, appends events.jsonl through trainers.events, writes checkpoints and a sample, and on
SIGTERM checkpoints, writes `cancelled` and exits. Extra config keys steer it in tests:
fake_step_seconds (pace), fake_crash_at (step at which it dies without a word), fake_save_seconds
(time the checkpoint on SIGTERM takes), fake_report_env (environment variables it reports in its
info event), fake_reserve_mb (address space it reserves at start, untouched), fake_touch_mb (memory it
fills at start: resident, as a training step's tensors are), fake_fail_with (an error it reports as
the real trainer does, then exits 1), fake_exit_when (a file: after its final phase it exits only
once the file exists). Its info event carries its pid."""

import argparse
import json
import mmap
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy  # noqa: E402

from trainers.events import EventLog  # noqa: E402

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = json.loads(Path(parser.parse_args().config).read_text())
    out = Path(config["output_dir"])
    log = EventLog(out)
    total = int(config.get("max_train_steps", 5))
    pace = float(config.get("fake_step_seconds", 0.05))
    crash_at = config.get("fake_crash_at")
    every = int(config.get("checkpointing_steps", 2))
    step = 0
    if config.get("resume_from_checkpoint") == "latest":
        done = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        step = int(done[-1].name.split("-")[1]) if done else 0

    def checkpoint():
        from safetensors.numpy import save_file

        path = out / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "state.json").write_text(json.dumps({"step": step}))
        save_file({"w": numpy.full((2,), float(step), dtype=numpy.float32)}, str(path / "tuner_state.safetensors"))
        log.emit("checkpoint", step=step, path=str(path.relative_to(out)))

    def hold_exit():
        # the test decides when this process exits after its final phase (a file it creates)
        release = config.get("fake_exit_when")
        while release and not Path(release).exists():
            time.sleep(0.01)

    stop = []  # like the real trainer: the signal sets a flag, the loop stops between steps
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    log.phase("loading")
    print("fake trainer: loading", flush=True)
    log.emit("info", trainable_params=1234, method=config.get("method"), pid=os.getpid(),
             env={name: os.environ.get(name) for name in config.get("fake_report_env", [])})
    if config.get("fake_reserve_mb"):
        mmap.mmap(-1, int(config["fake_reserve_mb"]) * 2**20)
    held = b"\x01" * (int(config.get("fake_touch_mb", 0)) * 2**20)  # noqa: F841 - resident until the end
    if config.get("fake_fail_with"):
        print(f"error: {config['fake_fail_with']}", file=sys.stderr, flush=True)
        log.phase("failed", error=config["fake_fail_with"], hint="fix the input and start again")
        sys.exit(1)
    log.phase("training")
    while step < total:
        time.sleep(pace)
        if stop:
            time.sleep(float(config.get("fake_save_seconds", 0)))
            checkpoint()
            (out / "cancelled").write_text("")
            log.phase("cancelled", message=f"stopped at step {step}")
            hold_exit()
            return
        step += 1
        print(f"fake trainer: step {step}/{total}", flush=True)
        if crash_at is not None and step >= int(crash_at):
            print("fake trainer: something went badly wrong", flush=True)
            os._exit(3)
        log.emit("step", step=step, total=total, loss=1.0 / step, lr=1e-4, sec_per_step=pace, eta_sec=pace * (total - step))
        if step % every == 0:
            checkpoint()
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / f"step-{step}-0.png").write_bytes(PNG)
    log.emit("sample", step=step, prompt=config.get("validation_prompt", ""), paths=[f"samples/step-{step}-0.png"])
    log.phase("saving")
    (out / "tuner.safetensors").write_bytes(b"not really")
    log.emit("artifact", kind="tuner", path="tuner.safetensors")
    log.phase("done")
    hold_exit()


if __name__ == "__main__":
    main()
