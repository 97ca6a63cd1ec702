"""Res-Tuning Studio: `python app.py` serves http://127.0.0.1:7860 on the bundled demo model.

    python app.py [--model HUB_ID|FOLDER|FILE.safetensors] [--runs-dir DIR] [--host H] [--port P]
                  [--jobs-per-device N]

The runs folder is also read from RESTUNING_RUNS_DIR (default ./runs). Only wiring lives here:
the UI is webui/, the job runner trainers/jobs.py, training trainers/dreambooth.py.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Res-Tuning Studio: train concept tuners for Stable Diffusion in the browser.")
    p.add_argument("--model", default=None,
                   help="base model: a hub id, a diffusers folder or an SD 1.x .safetensors file (default: assets/demo-model)")
    p.add_argument("--runs-dir", default=os.environ.get("RESTUNING_RUNS_DIR", "runs"),
                   help="where runs live (env RESTUNING_RUNS_DIR; default ./runs)")
    p.add_argument("--host", default=os.environ.get("RESTUNING_HOST", "127.0.0.1"), help="address to serve on")
    p.add_argument("--port", type=int, default=int(os.environ.get("RESTUNING_PORT", "7860")))
    p.add_argument("--jobs-per-device", type=int, default=1, help="runs training at once on each device")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import webui
    from trainers.jobs import JobRunner, detect_devices
    from webui.model import describe
    from webui.presets import detect_preset

    try:
        base = describe(args.model)
    except ValueError as exc:
        sys.exit(f"app.py: {exc}")
    devices = detect_devices()
    preset, detected = detect_preset()
    runner = JobRunner(args.runs_dir, devices=devices, per_device=args.jobs_per_device).start()
    demo = webui.build(runner, base, device=devices[0].split(":")[0], preset=preset, detected=detected)
    print(f"Res-Tuning Studio: base model {base.name}, runs in {runner.runs_dir}, devices {', '.join(devices)}")
    demo.launch(**webui.launch_options(runner, args.host, args.port))


if __name__ == "__main__":
    main()
