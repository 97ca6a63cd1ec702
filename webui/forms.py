"""Form fields generated from option metadata, and the config a form's values turn into.

Two sources, each the single place its options are described:
- the trainer's options (`trainers.options.build_parser()`: names, types, defaults, help, choices),
- each method's config dataclass in the registry (`restuning.methods.METHODS`: `option(...)`
  fields with help and choices).
A config built here goes through `trainers.options.from_dict`, the trainer's own checks, before
a run folder is made, so the form refuses exactly what the trainer would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing

import gradio as gr

from restuning.core import OPS
from restuning.methods import METHODS
from restuning.tuners import TUNER_KINDS
from trainers.options import check_method_fits
from trainers.options import COMPAT_GROUP, DEFAULT_STEPS, OptionError, build_parser, from_dict, parse_value

from . import wording
from .model import PHOTO_PROMPTS

# The paper's two forms first, then the baselines; the first is preselected: on the demo model it
# learns the examples best for their time (docs/benchmarks.md, "Which method the studio preselects").
FIRST_METHODS = ("res-tuning", "bypass")

# Filled by the studio itself (paths of the run folder, the base model, resuming), never by the form.
STUDIO_SET = {"help", "config", "method", "pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "overwrite_output_dir",
              "output_dir", "resume_from_checkpoint"}
# Shown in the main form rather than under "Advanced".
MAIN = ("instance_prompt", "class_prompt", "with_prior_preservation", "max_train_steps", "learning_rate")
# Short runs are what a studio user starts first: sample and checkpoint more often than the
# trainer's command-line defaults (100 and 500 steps), so the live view shows images early.
STUDIO_DEFAULTS = {"validation_steps": 50, "num_validation_images": 2, "checkpointing_steps": 100, "max_train_steps": DEFAULT_STEPS}
# What an empty optional box means, where it is not simply "not set".
PLACEHOLDERS = {"learning_rate": "the method's own recipe (e.g. 1e-4; full fine-tuning 5e-6)"}


# What a newcomer reads; the option's own name is in docs/trainer.md, for the command line and users
# of diffusers' scripts. Names not listed read as their words.
LABELS = {
    "with_prior_preservation": "Prior preservation", "num_class_images": "Class images", "prior_loss_weight":
    "Prior loss weight", "train_batch_size": "Batch size", "gradient_accumulation_steps": "Gradient accumulation steps",
    "max_train_steps": "Training steps", "learning_rate": "Learning rate", "lr_scheduler": "Learning-rate schedule",
    "lr_warmup_steps": "Warm-up steps", "adam_beta1": "Adam beta 1", "adam_beta2": "Adam beta 2",
    "adam_weight_decay": "Adam weight decay", "adam_epsilon": "Adam epsilon", "max_grad_norm": "Gradient clipping norm",
    "snr_gamma": "Min-SNR gamma", "use_8bit_adam": "8-bit Adam",
    "enable_xformers_memory_efficient_attention": "xFormers attention", "validation_prompt": "Validation prompts",
    "num_validation_images": "Validation images per prompt", "validation_steps": "Steps between validation samples",
    "num_inference_steps": "Sampling steps", "checkpointing_steps": "Steps between checkpoints",
    "checkpoints_total_limit": "Checkpoints kept", "dim": "Tuner size (dim)", "ops": "OPs", "taps": "Taps",
}


def label_and_info(name: str, help_text: str | None) -> tuple[str, str]:
    """A trainer option's label and what it does for the run (webui.wording)."""
    label = LABELS.get(name) or name.replace("_", " ").capitalize()
    return label, wording.TRAINER.get(name) or help_text or ""


def option_label(name: str) -> str:
    """The form's label of a trainer or method option (for a method option, its label under the
    first method that has it)."""
    if name in LABELS or name not in _method_option_names():
        return label_and_info(name, None)[0]
    method = next(m for m in method_names() if name in {f.name for f in dataclasses.fields(METHODS[m].config)})
    return wording.method_option(method, name)[0]


def _method_option_names() -> set[str]:
    return {f.name for m in METHODS.values() for f in dataclasses.fields(m.config)}


FLAG = re.compile(r"--([a-z][a-z0-9_]*)\b")


def plain(message: str) -> str:
    """A trainer's message in the studio's words: each option it names (--max_train_steps) as the
    form's label of it (Training steps). The trainer words its messages for the command line, where
    the option's name is what a user types; the form shows labels."""
    known = set(trainer_actions()) | _method_option_names() | STUDIO_SET
    return FLAG.sub(lambda m: option_label(m.group(1)) if m.group(1) in known else m.group(0), message)


def method_names() -> list[str]:
    first = [m for m in FIRST_METHODS if m in METHODS]
    return first + [m for m in METHODS if m not in first]


def method_choices() -> list[tuple[str, str]]:
    return [(METHODS[m].label, m) for m in method_names()]


def method_summary(method: str) -> str:
    summary = wording.SUMMARIES.get(method) or METHODS[method].summary
    return f"{summary}<br><small>{wording.PRESELECTED}</small>" if method == method_names()[0] else summary


def trainer_actions() -> dict[str, argparse.Action]:
    """The trainer's common options by name (method options come from the registry instead)."""
    parser = build_parser()
    # Method options come from the registry; diffusers' script options are for command lines.
    groups = [g for g in parser._action_groups if g.title in ("method options", COMPAT_GROUP)]
    skip = {a.dest for g in groups for a in g._group_actions} | STUDIO_SET
    return {a.dest: a for a in parser._actions if a.dest not in skip}


def component_for_action(action: argparse.Action, value=None):
    """A Gradio input for one trainer option; an empty Number/Textbox means "not given"."""
    (label, info), elem_id = label_and_info(action.dest, action.help), f"opt-{action.dest}"
    default = STUDIO_DEFAULTS.get(action.dest, action.default) if value is None else value
    if isinstance(action, argparse.BooleanOptionalAction):
        return gr.Checkbox(value=bool(default), label=label, info=info, elem_id=elem_id)
    if action.choices and default is None:  # optional: "" is "not given", the method's recipe decides
        choices = [("the method's recipe", "")] + [(str(c), c) for c in action.choices]
        return gr.Dropdown(choices=choices, value="", label=label, info=info, elem_id=elem_id)
    if action.choices:
        return gr.Dropdown(choices=list(action.choices), value=default, label=label, info=info, elem_id=elem_id)
    if action.type in (int, float) and default is None:  # optional: an empty box means "not given"
        return gr.Textbox(value="", label=label, info=info, placeholder=PLACEHOLDERS.get(action.dest, "not set"), elem_id=elem_id)
    if action.type in (int, float):
        # no precision=0 for whole numbers: Gradio would round 2.5 to 2 before the trainer's
        # conversion (trainer_value) could refuse it
        return gr.Number(value=default, label=label, info=info, elem_id=elem_id)
    if action.nargs == "+":
        return gr.Textbox(value="\n".join(default or []), label=label, info=(info or "") + " (one per line)", lines=2, elem_id=elem_id)
    return gr.Textbox(value=default or "", label=label, info=info, elem_id=elem_id)


def trainer_value(action: argparse.Action, value):
    """A form value as the trainer's option takes it; None for an empty box. OptionError naming the
    field by its label for a value the option cannot take."""
    label = option_label(action.dest)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if action.nargs == "+":
        lines = [line.strip() for line in str(value).splitlines() if line.strip()]
        return lines or None
    if isinstance(value, str) and action.type in (int, float):
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise OptionError(f"{label} must be a number; got {value[:40]!r}") from None
    if action.type in (int, float) and not math.isfinite(float(value)):
        raise OptionError(f"{label} must be a finite number; got {value}")
    if action.type is int:
        if float(value) != int(float(value)):
            raise OptionError(f"{label} must be a whole number; got {value}")
        return int(float(value))
    if action.type is float:
        return float(value)
    return value.strip() if isinstance(value, str) else value


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def component_for_field(method: str, f: dataclasses.Field, recipe: dict | None = None):
    """A Gradio input for one field of a method's config dataclass, showing the value `recipe`
    (the base model's, trainers.options.method_recipe) sets for it where it sets one, else the
    field's default."""
    kind = str(typing.get_type_hints(METHODS[method].config)[f.name])
    recipe = recipe or {}
    default = parse_value(METHODS[method].config, f.name, recipe[f.name]) if f.name in recipe else _default(f)
    (label, info), elem_id = wording.method_option(method, f.name), f"opt-{method}-{f.name}"
    choices = f.metadata.get("choices")
    if "tuple" in kind or "list" in kind:
        return gr.CheckboxGroup(choices=[(wording.choice_label(c), c) for c in choices or default], value=list(default),
                                label=label, info=info, elem_id=elem_id)
    if choices:
        return gr.Dropdown(choices=[(wording.choice_label(c), c) for c in choices], value=default, label=label, info=info,
                           elem_id=elem_id)
    if "dict" in kind:  # the Res-Tuning layout: one (place, kind) pair per choice
        pairs = [(p, k) for p in OPS for k in TUNER_KINDS if p != "resnet" or k == "adapter"]  # beside a ResNet: conv adapter only
        return gr.Dropdown(choices=wording.layout_choices(pairs), value=[f"{k}={v}" for k, v in default.items()],
                           multiselect=True, label=label, info=info, elem_id=elem_id)
    if "bool" in kind:
        return gr.Checkbox(value=bool(default), label=label, info=info, elem_id=elem_id)
    if "int" in kind or "float" in kind:
        return gr.Number(value=default, label=label, info=info, elem_id=elem_id)  # method_value checks whole numbers
    return gr.Textbox(value=str(default), label=label, info=info, elem_id=elem_id)


def method_value(method: str, name: str, value):
    """Form value -> the JSON value the config file holds (the trainer parses the rest)."""
    kind = str(typing.get_type_hints(METHODS[method].config)[name])
    label = wording.method_option(method, name)[0]
    if "dict" in kind:
        pairs = value if isinstance(value, (list, tuple)) else [value or ""]  # the layout's choices, or its text
        return parse_value(METHODS[method].config, name, ",".join(str(p) for p in pairs))
    if "tuple" in kind or "list" in kind:
        if not value:
            raise OptionError(f"{label}: choose at least one")
        return list(value)
    if "int" in kind:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise OptionError(f"{label} must be a whole number; got {value!r}") from None
        if not (math.isfinite(number) and number.is_integer()):
            raise OptionError(f"{label} must be a whole number; got {value}")
        return int(number)
    return value


def build_config(method: str, trainer_values: dict, method_values: dict, *, model: str, device: str,
                 examples: tuple[str, str] = PHOTO_PROMPTS) -> dict:
    """The config.json of a run: trainer options + the method's own, checked by the trainer's
    own `from_dict` (its errors name the option) and against the base model as the trainer
    checks it before loading (trainers.options.check_method_fits). Raises OptionError.
    `examples`: (instance, class) prompts in the base model's words, for the message of an empty one."""
    actions = trainer_actions()
    config = {"method": method, "pretrained_model_name_or_path": model}
    for name, value in trainer_values.items():
        converted = trainer_value(actions[name], value)
        if converted is not None:
            config[name] = converted
    if not (config.get("instance_prompt") or "").strip():
        raise OptionError(f"the instance prompt is empty: describe the concept with a rare token, e.g. '{examples[0]}'")
    if config.get("with_prior_preservation") and not (config.get("class_prompt") or "").strip():
        raise OptionError(f"prior preservation needs a class prompt: the concept's class without the rare token, "
                          f"e.g. '{examples[1]}'")
    if not config.get("validation_prompt"):
        config["validation_prompt"] = [config["instance_prompt"]]
    for name, value in method_values.items():
        config[name] = method_value(method, name, value)
    if config.get("mixed_precision") == "fp16" and device == "cpu":
        raise OptionError(f"{option_label('mixed_precision')} fp16 does not run on the CPU; choose 'no' (or bf16), or the "
                          "CPU demo preset")
    # instance_data_dir is the run's own folder, filled in by the job runner; the check needs a value
    options = from_dict({**config, "instance_data_dir": "instance", "output_dir": "run"})
    check_method_fits(options.method_config, model)  # what the trainer's attach would refuse, refused now
    return config
