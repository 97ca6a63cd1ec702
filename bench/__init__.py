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




# What makes Res-Tuning learn a concept (issue 41), from the paper's form to the default, one step
# a row: the paper's Dual layout on the mid and up blocks at a constant rate (the former default and
# its swept recipe); the Tri layout on every block with a cosine schedule; + the identifier's
# embedding trained with the tuners; + the off-concept loss; the default adds convolutional
# Res-Adapters beside the ResNet blocks; and the default at a constant rate. Entries are (case,
# label, options): ResTuningConfig fields or trainer options, which bench.quality passes on.
TRI = {"attn1": "adapter", "ff": "adapter", "block": "adapter"}
RES_TUNING_ABLATION = [
    ("paper-dual", "Res-Tuning (paper's Dual on mid + up at a constant rate)",
     {"tuners": {"attn1": "adapter", "ff": "adapter"}, "blocks": ["mid", "up"], "dim": 10, "identifier": "", "off_concept_loss": 0,
      "learning_rate": 0.003, "lr_scheduler": "constant", "lr_warmup_steps": 0}),
    ("tri-cosine", "Res-Tuning (Tri on all blocks with cosine)", {"tuners": TRI, "identifier": "", "off_concept_loss": 0}),
    ("tri+identifier", "Res-Tuning (Tri + identifier)", {"tuners": TRI, "off_concept_loss": 0}),
    ("tri+identifier+off", "Res-Tuning (Tri + identifier + off-concept loss)", {"tuners": TRI}),
    ("default-constant", "Res-Tuning (default at a constant rate)", {"lr_scheduler": "constant", "lr_warmup_steps": 0}),
]


# The design ablation of Res-Tuning-Bypass (issues 11 and 25). The default's depth is the model's:
# BypassConfig's 2 on SD v1.5, 3 on the demo model (its recipe); the depth rows name theirs.
# From the first design (v1) to the chain every row shares: +1 zero-conv output, +2 Convpass
# tuners, +3 text tuners, at the paper's injection point (depth 0, the head); then what was tried to make a correction at the head
# learn (time conditioning, a wider output stage, read-outs from every stage, other outputs,
# rates, steps), and to make depth 2 (the default) cheap (gradient checkpointing, gradients that
# skip the frozen blocks' activations). Entries are (case, label, options); options are
# BypassConfig fields, or trainer options (learning_rate, max_train_steps, gradient_checkpointing)
# that bench.quality passes on; bench.train_cost measures a row whose BypassConfig fields or
# gradient checkpointing differ from another's. bench.quality, bench.train_cost and
# bench.bypass_ablation read it.
BYPASS_DEFAULT = ("bypass", "Res-Tuning-Bypass", {})
HEAD = {"depth": 0}
BYPASS_ABLATION = [
    ("bypass-v1", "Bypass v1 (gate output)",
     {"horizontal": "adapter", "vertical": "adapter", "dim": 128, "text": False, "output": "gate", **HEAD}),
    ("bypass+1", "Bypass +1 (zero-conv output)", {"horizontal": "adapter", "vertical": "adapter", "dim": 128, "text": False, **HEAD}),
    ("bypass+1+2", "Bypass +1+2 (Convpass)", {"text": False, **HEAD}),
    ("bypass+1+2+3", "Bypass +1+2+3 (text tuners)", {**HEAD}),
    ("bypass-dim64", "Bypass +1+2+3 dim 64", {"dim": 64, **HEAD}),
    ("bypass-lr3e-2", "Bypass +1+2+3 lr 3e-2", {"learning_rate": 0.03, **HEAD}),
    ("bypass-lr3e-3", "Bypass +1+2+3 lr 3e-3", {"learning_rate": 0.003, **HEAD}),
    ("bypass-1800", "Bypass +1+2+3 1800 steps", {"max_train_steps": 1800, **HEAD}),
    ("bypass-film", "Bypass +1+2+3 time FiLM", {"time": "all", **HEAD}),
    ("bypass-refine", "Bypass +1+2+3 time FiLM 2 refine blocks", {"time": "all", "refine": 2, **HEAD}),
    ("bypass-readouts", "Bypass +1+2+3 read-outs", {"readouts": True, **HEAD}),
    ("bypass-noise", "Bypass +1+2+3 into the noise", {"into": "noise", **HEAD}),
    ("bypass-modulate", "Bypass +1+2+3 modulating x_L", {"output": "modulate", **HEAD}),
    ("bypass-rearrange", "Bypass +1+2+3 rearranging x_L", {"output": "rearrange", **HEAD}),
    ("bypass-depth1", "Bypass +1+2+3 at depth 1", {"depth": 1}),
    ("bypass-depth1-lr3e-2", "Bypass +1+2+3 at depth 1 lr 3e-2", {"depth": 1, "learning_rate": 0.03}),
    ("bypass-ckpt", "Bypass at depth 2 checkpointed", {"depth": 2, "gradient_checkpointing": True}),
    ("bypass-skip-attention", "Bypass at depth 2 skip-attention", {"depth": 2, "gradient": "skip-attention"}),
    ("bypass-skip-path", "Bypass at depth 2 skip-path", {"depth": 2, "gradient": "skip-path"}),
    ("bypass-trigger", "Bypass at depth 2 token gate", {"depth": 2, "trigger": True}),
    ("bypass-prior2", "Bypass at depth 2 prior weight 2", {"depth": 2, "prior_loss_weight": 2.0}),
    ("bypass-off-concept", "Bypass at depth 2 off-concept loss 0.01", {"depth": 2, "off_concept_loss": 0.01}),
    ("bypass-depth2", "Bypass at depth 2", {"depth": 2}),
    ("bypass-depth3", "Bypass at depth 3", {"depth": 3}),
    ("bypass-depth3-lr3e-3", "Bypass at depth 3 lr 3e-3", {"depth": 3, "learning_rate": 0.003}),
    ("bypass-depth3-lr2e-3", "Bypass at depth 3 lr 2e-3", {"depth": 3, "learning_rate": 0.002}),
    ("bypass-depth3-lr1.5e-3", "Bypass at depth 3 lr 1.5e-3", {"depth": 3, "learning_rate": 0.0015}),
]


def bypass_config_options(options: dict) -> dict:
    """The BypassConfig fields among an ablation entry's options (the rest are trainer options)."""
    import dataclasses

    from restuning.methods.bypass import BypassConfig

    fields = {f.name for f in dataclasses.fields(BypassConfig)}
    return {k: v for k, v in options.items() if k in fields}
