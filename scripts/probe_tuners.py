"""Why a Res-Tuner kind learns or not: gradient flow, output size and update speed per tuner kind,
through the trainer's own loop (prior preservation, min-SNR) on the demo model (issue #12 part 1).

    python -m scripts.probe_tuners --layout attn1=adapter --steps 60
    python -m scripts.probe_tuners --layout attn1=prefix,ff=prompt --steps 60 --lr 1e-2

Per tuner kind and parameter group (summed over the blocks), at chosen steps:
- grad: the gradient's norm (after the loss's backward, before clipping);
- weight: the parameter's norm, and how far it has moved from its initial value;
and at the end, on a fixed batch: the tuner's output norm relative to its OP's output norm (the
residual it adds, |R(x)| / |OP(x)|, averaged over the blocks), and the zero-initialised output
layer's norm. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="attn1=adapter")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--blocks", default="mid,up")
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from trainers import dreambooth, options as opts
    from trainers.events import EventLog

    work = Path(tempfile.mkdtemp(prefix="probe-"))
    argv_t = ["--pretrained_model_name_or_path", str(ROOT / "assets" / "demo-model"),
              "--instance_data_dir", str(ROOT / "assets" / "concepts" / "star"), "--instance_prompt", "a sks shape",
              "--class_prompt", "a shape", "--with_prior_preservation", "--num_class_images", "32",
              "--class_data_dir", str(ROOT / "runs" / "probe-class-images"),
              "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", str(args.steps),
              "--learning_rate", str(args.lr), "--snr_gamma", "5", "--checkpointing_steps", str(args.steps + 1),
              "--seed", str(args.seed), "--output_dir", str(work / "run"), "--method", "res-tuning",
              "--tuners", args.layout, "--dim", str(args.dim), "--blocks", args.blocks]
    options = opts.parse(argv_t)
    record: dict = {"layout": args.layout, "lr": args.lr, "dim": args.dim, "steps": args.steps, "trace": []}
    state: dict = {}

    def on_attached(pipe, handle):
        groups = defaultdict(list)  # (kind, param name) -> [params]
        kinds = {}
        for path, tuner in handle.modules.items():
            kind = type(tuner).__name__
            kinds[path] = kind
            for name, param in tuner.named_parameters():
                groups[(kind, name)].append(param)
        state.update(groups=groups, initial={k: [q.detach().clone() for q in v] for k, v in groups.items()}, step=[0],
                     handle=handle, pipe=pipe)
        grads = defaultdict(float)
        state["grads"] = grads
        for key, params in groups.items():
            for param in params:
                def hook(t, key=key):
                    grads[key] += float(t.grad.detach().pow(2).sum())
                param.register_post_accumulate_grad_hook(hook)
        optimizer_step_hook(state, record, args.every)

    def optimizer_step_hook(state, record, every):
        # The loss's backward fills `grads`; read them once per optimizer step (first param's hook
        # of the next backward would mix steps, so snapshot on a forward pre-hook of the U-Net).
        unet = state["pipe"].unet

        def pre(module, inputs):
            if not torch.is_grad_enabled():
                return
            step = state["step"][0]
            if step > 0 and (step in (1, 2, 3) or step % every == 0):
                snapshot(state, record, step)
            state["grads"].clear()
            state["step"][0] += 1

        unet.register_forward_pre_hook(pre)

    dreambooth.train(options, EventLog(work / "run"), dreambooth.StopFlag(), on_attached=on_attached)
    snapshot(state, record, state["step"][0], final=True)
    record["output_ratio"] = output_ratio(state)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    show(record)
    return record


def snapshot(state, record, step, final=False):
    row = {"step": step, "groups": {}}
    for key, params in state["groups"].items():
        kind, name = key
        weight = sum(float(q.detach().pow(2).sum()) for q in params) ** 0.5
        moved = sum(float((q.detach() - q0).pow(2).sum()) for q, q0 in zip(params, state["initial"][key])) ** 0.5
        row["groups"][f"{kind}.{name}"] = {"grad": state["grads"].get(key, 0.0) ** 0.5, "weight": weight, "moved": moved}
    record["trace"].append(row)


@torch.no_grad()
def output_ratio(state) -> dict:
    """|R(x)| / |OP(x)| per tuner kind on one batch of noisy latents of the concept prompt."""
    pipe, handle = state["pipe"], state["handle"]
    unet = pipe.unet
    ratios = defaultdict(list)
    hooks = []
    from restuning.core import op_module

    for path, tuner in handle.modules.items():
        block_path, op_name = path.rsplit(".", 1)
        block = unet.get_submodule(block_path)
        op = op_module(block, op_name)
        seen = {}

        def op_hook(module, args, kwargs, output, seen=seen):
            out = output[0] if isinstance(output, tuple) else output
            seen["op"] = float(out.float().norm())

        def tuner_hook(module, args, output, seen=seen, kind=type(tuner).__name__):
            ratios[kind].append(float(output.float().norm()) / max(seen.get("op", 0.0), 1e-12))

        hooks.append(op.register_forward_hook(op_hook, with_kwargs=True, prepend=True))
        hooks.append(tuner.register_forward_hook(tuner_hook))
    gen = torch.Generator().manual_seed(0)
    device = next(unet.parameters()).device
    latents = torch.randn((4, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), generator=gen).to(device)
    tokens = pipe.tokenizer(["a red sks shape on a blue background"] * 4, padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    emb = pipe.text_encoder(tokens.input_ids.to(device))[0]
    for t in (999, 700, 400):
        unet(latents, torch.full((4,), t, device=device), emb)
    for h in hooks:
        h.remove()
    return {k: {"mean": statistics.mean(v), "max": max(v), "n": len(v)} for k, v in ratios.items()}


def show(record):
    print(f"layout {record['layout']} lr {record['lr']:g} dim {record['dim']}")
    names = list(record["trace"][0]["groups"]) if record["trace"] else []
    print("step  " + "  ".join(f"{n:>34}" for n in names))
    for row in record["trace"]:
        print(f"{row['step']:>4}  " + "  ".join(
            f"{'g%.2e w%.2e d%.2e' % (row['groups'][n]['grad'], row['groups'][n]['weight'], row['groups'][n]['moved']):>34}" for n in names))
    for kind, r in record.get("output_ratio", {}).items():
        print(f"{kind}: |R(x)|/|OP(x)| mean {r['mean']:.3g} max {r['max']:.3g} over {r['n']} OP calls")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
