"""Wheels for a bare GPU machine that has PyTorch but no package registry (bench.gpu_check).

    python scripts/gpu_wheels.py                # .whl/: diffusers, xformers, bitsandbytes for CUDA 13.0, Python 3.12
    python scripts/gpu_wheels.py --cuda 128 --python 3.11

On the GPU machine:
    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site python3 -m bench.gpu_check

Versions come from requirements-base.txt and requirements-gpu.txt, so the check runs what the
project pins. bitsandbytes' wheel carries a native library per CUDA release (43 MB in all); only the one
matching the target's CUDA is kept, so the wheels fit in what travels with a working tree.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusers", "xformers", "bitsandbytes")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pins() -> dict[str, str]:
    found = {}
    for name in ("requirements-base.txt", "requirements-gpu.txt"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
            if m:
                found[m.group(1).lower()] = m.group(2)
    return found


def thin_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Rewrite the wheel without the native libraries of other CUDA releases."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda})\.so$")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if re.search(r"libbitsandbytes_\w+\.so$", item.filename) and not keep.search(item.filename):
                continue
            dst.writestr(item, src.read(item.filename))
    tmp.replace(wheel)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", default="130", help="the target's CUDA release as bitsandbytes names it (default 130: CUDA 13.0)")
    p.add_argument("--python", default="3.12", help="the target's Python (default 3.12)")
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = p.parse_args(argv)
    versions = pins()
    missing = [name for name in PACKAGES if name not in versions]
    if missing:
        p.error(f"no pinned version of {missing} in requirements-base.txt / requirements-gpu.txt")
    args.dest.mkdir(exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    platform_flags = [flag for plat in PLATFORMS for flag in ("--platform", plat)]
    for name in PACKAGES:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", args.python, "--implementation", "cp", *platform_flags,
                        "-d", str(args.dest), f"{name}=={versions[name]}"], check=True)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        thin_bitsandbytes(wheel, args.cuda)
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")


if __name__ == "__main__":
    main()
