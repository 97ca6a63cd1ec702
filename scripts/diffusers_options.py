"""The option names of diffusers' DreamBooth scripts, read from a diffusers git checkout into
tests/data/diffusers_dreambooth_options.json with the commit they came from. The trainer's option
test compares trainers/options.py against that file: each is an option of the trainer, accepted
and not used (options.IGNORED), or refused with the reason (options.REFUSED).

    python -m scripts.diffusers_options PATH    # PATH: a diffusers clone (bare or not); reads its HEAD

The names are taken from the scripts' `add_argument("--name", ...)` calls by parsing them (ast), not
by running them: the scripts import torchvision and check diffusers' version on import.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "diffusers_dreambooth_options.json"
SCRIPTS = ("examples/dreambooth/train_dreambooth.py", "examples/dreambooth/train_dreambooth_lora.py")


def option_names(source: str) -> list[str]:
    """The long option names (without dashes) of every add_argument call in `source`, in order."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    names.append(arg.value[2:].replace("-", "_"))
    return names


def snapshot(repo: Path) -> dict:
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", "HEAD").strip()
    return {
        "source": "https://github.com/huggingface/diffusers",
        "commit": commit,
        "commit_date": git("log", "-1", "--format=%cs", commit).strip(),
        "scripts": {Path(s).name: sorted(set(option_names(git("show", f"{commit}:{s}")))) for s in SCRIPTS},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a diffusers git clone")
    args = parser.parse_args(argv)
    result = snapshot(args.repo)
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(result, indent=1) + "\n")
    counts = ", ".join(f"{name}: {len(names)}" for name, names in result["scripts"].items())
    print(f"{SNAPSHOT.relative_to(ROOT)}: diffusers {result['commit'][:12]} ({result['commit_date']}), {counts} options")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
