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
