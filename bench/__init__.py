"""Benchmarks that print tables and write their results to bench/results/."""

import json
from pathlib import Path


def write_results(out_dir: Path, stem: str, result, table: str) -> None:
    """<stem>.json (the figures) and <stem>.md (the table) in `out_dir`, and the table printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out_dir / stem}.json and .md")




# Issue 11's steps from the first Res-Tuning-Bypass design (v1) to the default: +1 zero-conv
# output, +2 Convpass tuners, +3 text tuners, all at the paper's injection point (depth 0, the
# head); then width, learning rate and depth; the default is +1+2+3 at depth 2. Entries are
# (case, label, options); options are BypassConfig fields, or trainer options (learning_rate) that
# bench.quality passes on and bench.train_cost ignores. bench.quality, bench.train_cost and
# bench.bypass_ablation read it.
BYPASS_DEFAULT = ("bypass", "Res-Tuning-Bypass", {})
BYPASS_ABLATION = [
    ("bypass-v1", "Bypass v1 (gate output)",
     {"horizontal": "adapter", "vertical": "adapter", "dim": 128, "text": False, "output": "gate", "depth": 0}),
    ("bypass+1", "Bypass +1 (zero-conv output)", {"horizontal": "adapter", "vertical": "adapter", "dim": 128, "text": False, "depth": 0}),
    ("bypass+1+2", "Bypass +1+2 (Convpass)", {"text": False, "depth": 0}),
    ("bypass+1+2+3", "Bypass +1+2+3 (text tuners)", {"depth": 0}),
    ("bypass-dim64", "Bypass +1+2+3 dim 64", {"dim": 64, "depth": 0}),
    ("bypass-lr3e-2", "Bypass +1+2+3 lr 3e-2", {"learning_rate": 0.03, "depth": 0}),
    ("bypass-depth1", "Bypass +1+2+3 at depth 1", {"depth": 1}),
    ("bypass-depth1-lr3e-2", "Bypass +1+2+3 at depth 1 lr 3e-2", {"depth": 1, "learning_rate": 0.03}),
]


def bypass_config_options(options: dict) -> dict:
    """The BypassConfig fields among an ablation entry's options (the rest are trainer options)."""
    import dataclasses

    from restuning.methods.bypass import BypassConfig

    fields = {f.name for f in dataclasses.fields(BypassConfig)}
    return {k: v for k, v in options.items() if k in fields}
