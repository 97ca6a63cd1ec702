"""Mutation check of the library's math: apply one small wrong change at a time to a temporary copy
of the library, run the library's tests on it, and report every change the tests let through.

    python -m scripts.mutate                     # every mutation; exit status 1 if any survives
    python -m scripts.mutate --only NAME,NAME    # a subset (tests/test_mutations.py runs one)
    python -m scripts.mutate --list

Each mutation names the test file most likely to catch it; that file runs first and pytest stops
at the first failure, so a caught mutation costs seconds. A survivor has passed all of LIBRARY_TESTS.
The unmutated copy must pass the same tests first, or a "caught" would mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_TESTS = ("tests/test_tuner_math.py", "tests/test_equivalence.py", "tests/test_bypass.py",
                 "tests/test_restuning.py", "tests/test_io.py", "tests/test_library.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    first: str  # the test file run first


MUTATIONS = [
    Mutation("res-prefix-no-layer-norm", "restuning/tuners.py",
             "x_hat = F.layer_norm(x, (x.shape[-1],))\n        return self.out(_attend(x_hat",
             "x_hat = x\n        return self.out(_attend(x_hat",
             "tests/test_tuner_math.py"),
    Mutation("res-prompt-no-layer-norm", "restuning/tuners.py",
             "x_hat = F.layer_norm(x, (x.shape[-1],))\n        return self.out(_attend(self.query",
             "x_hat = x\n        return self.out(_attend(self.query",
             "tests/test_tuner_math.py"),
    Mutation("res-attention-no-logit-scale", "restuning/tuners.py", " / math.sqrt(d)", "", "tests/test_tuner_math.py"),
    Mutation("res-prompt-values-are-keys", "restuning/tuners.py", "self.value(self.tokens)", "self.key(self.tokens)",
             "tests/test_tuner_math.py"),
    Mutation("res-prefix-no-gain", "restuning/tuners.py", "self.value.to(x.dtype), self.heads) * self.gain)",
             "self.value.to(x.dtype), self.heads))", "tests/test_tuner_math.py"),
    Mutation("res-prompt-no-gain", "restuning/tuners.py", "self.value(self.tokens), self.heads) * self.gain)",
             "self.value(self.tokens), self.heads))", "tests/test_tuner_math.py"),
    Mutation("res-prompt-default-init", "restuning/tuners.py", "nn.init.normal_(self.query.weight, std=dim ** -0.5)",
             "pass", "tests/test_tuner_math.py"),
    Mutation("res-prefix-zero-values", "restuning/tuners.py", "self.value = nn.Parameter(torch.randn(length, dim))",
             "self.value = nn.Parameter(torch.zeros(length, dim))", "tests/test_tuner_math.py"),
    Mutation("res-prefix-one-head", "restuning/tuners.py", "self.heads = _heads_for(dim, heads)", "self.heads = 1",
             "tests/test_tuner_math.py"),
    Mutation("adapter-relu", "restuning/tuners.py", "F.gelu(self.down(x))", "F.relu(self.down(x))", "tests/test_tuner_math.py"),
    Mutation("hook-reads-op-output", "restuning/methods/res_tuning/model.py", "tuner(x.to(dtype))", "tuner(output.to(dtype))",
             "tests/test_tuner_math.py"),
    Mutation("strength-squared", "restuning/core.py", "residual = residual * scale", "residual = residual * scale * scale",
             "tests/test_tuner_math.py"),
    Mutation("bound-adapter-reads-op-input", "restuning/methods/adapter/model.py", "adapter(output.to(dtype))",
             "adapter(args[0].to(dtype))", "tests/test_equivalence.py"),
    Mutation("lambda-prefix-logits-unscaled", "restuning/unbinding.py", "torch.logsumexp((q @ k_extra.transpose(-1, -2)) * scale",
             "torch.logsumexp((q @ k_extra.transpose(-1, -2))", "tests/test_equivalence.py"),
    Mutation("unbound-strength-squared", "restuning/unbinding.py", "mixing_weight(q, k, k_extra, scale) * strength",
             "mixing_weight(q, k, k_extra, scale) * strength * strength", "tests/test_equivalence.py"),
    Mutation("bound-prompt-keys-through-w-v", "restuning/methods/prompt/layer.py", "return split_heads(attn, attn.to_k(prompt))",
             "return split_heads(attn, attn.to_v(prompt))", "tests/test_equivalence.py"),
    Mutation("bypass-tap-outputs-attached", "restuning/methods/bypass/model.py", "call.outputs[path] = output.detach()",
             "call.outputs[path] = output", "tests/test_bypass.py"),
    Mutation("bypass-tap-input-attached", "restuning/methods/bypass/model.py",
             "call.inputs[path] = _hidden(args, kwargs).detach()", "call.inputs[path] = _hidden(args, kwargs)", "tests/test_bypass.py"),
    Mutation("bypass-text-attached", "restuning/methods/bypass/model.py", "call.text = None if text is None else text.detach()",
             "call.text = text", "tests/test_bypass.py"),
    Mutation("bypass-vertical-reads-backbone", "restuning/methods/bypass/layer.py", "(state + apply_tuner(self.vertical, state))",
             "(state + apply_tuner(self.vertical, feature))", "tests/test_bypass.py"),
    Mutation("bypass-lambda-swapped", "restuning/methods/bypass/layer.py", "return lam * across + (1 - lam) * (",
             "return (1 - lam) * across + lam * (", "tests/test_bypass.py"),
    Mutation("bypass-text-reads-state", "restuning/methods/bypass/layer.py", "across = across + self.text(feature, text)",
             "across = across + self.text(state, text)", "tests/test_bypass.py"),
    Mutation("bypass-output-reads-backbone", "restuning/methods/bypass/layer.py", "return self.out(state)",
             "return self.out(features[-1])", "tests/test_bypass.py"),
    Mutation("bypass-gate-on-state", "restuning/methods/bypass/layer.py", "* (state - features[-1])", "* state",
             "tests/test_bypass.py"),
]


def check_targets(mutations=MUTATIONS, root: Path = ROOT) -> list[str]:
    """Problems with the list itself: a mutation whose text is not in its file exactly once."""
    problems = []
    for m in mutations:
        count = (root / m.path).read_text().count(m.old)
        if count != 1 or m.old == m.new:
            problems.append(f"{m.name}: {m.path} contains its text {count} times (must be exactly once)")
    return problems


def _copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for folder in ("restuning", "tests", "scripts"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _pytest(copy: Path, files: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, (lines[0] if lines else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:])


def run(mutations: list[Mutation], tests=LIBRARY_TESTS) -> list[str]:
    """Apply each mutation alone to a fresh copy; return the names of those no test caught."""
    problems = check_targets(mutations)
    if problems:
        raise SystemExit("\n".join(problems))
    survivors = []
    with tempfile.TemporaryDirectory(prefix="restuning-mutate-") as tmp:
        copy = Path(tmp)
        _copy(copy)
        probe = subprocess.run([sys.executable, "-c", "import restuning; print(restuning.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's restuning is not the one imported: {probe.stdout or probe.stderr}")
        started = time.time()
        ok, detail = _pytest(copy, list(tests))
        if not ok:
            raise SystemExit(f"the unmutated library fails its own tests: {detail}")
        print(f"baseline: {len(tests)} test files pass ({time.time() - started:.0f}s)", flush=True)
        for m in mutations:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            started = time.time()
            try:
                passed, detail = _pytest(copy, [m.first, *(t for t in tests if t != m.first)])
            finally:
                target.write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            print(f"{verdict:8} {m.name:34} {time.time() - started:5.0f}s  {'' if passed else detail}", flush=True)
            if passed:
                survivors.append(m.name)
    return survivors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.path}: {m.old!r} -> {m.new!r}")
        return 0
    chosen = MUTATIONS
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s) {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.name in names]
    survivors = run(chosen)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught; survivors: {', '.join(survivors) or 'none'}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
