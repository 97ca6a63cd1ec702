"""Mutation check of the library's math, the trainer's loss and the web studio's rules (file
routes, visitors, caps, uploads): apply one small wrong change at a time to a temporary copy of
the project's code, run its tests on it, and report every change the tests let through.

    python -m scripts.mutate                     # every mutation; exit status 1 if any survives
    python -m scripts.mutate --only NAME,NAME    # a subset (tests/test_mutations.py runs a few)
    python -m scripts.mutate --list
    python -m scripts.mutate --write             # also bench/results/mutations.{json,md}, with the run's time and load

Each mutation names the test (a file, or one test's node id) most likely to catch it; that runs
first, alone, and pytest stops at the first failure, so a caught mutation costs seconds. A survivor has
passed all of its class's test files (`tests`: LIBRARY_TESTS for the library, LOSS_TESTS for the
trainer's loss, WEB_RULE_TESTS for the studio's rules). The unmutated copy must pass the same tests first, or a "caught" would mean nothing.
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
                 "tests/test_restuning.py", "tests/test_io.py", "tests/test_library.py", "tests/test_contracts.py",
                 "tests/test_golden.py")
LOSS_TESTS = ("tests/test_loss_reference.py",)
OFF_CONCEPT_TESTS = ("tests/test_off_concept.py",)
LORA_TESTS = ("tests/test_lora_import.py",)
BYPASS_TESTS = ("tests/test_bypass.py", "tests/test_bypass_contracts.py", "tests/test_bypass_designs.py")
# One test of tests/test_bypass_contracts.py, by its name.
BYPASS_CASE = "tests/test_bypass_contracts.py::{}"
# One golden file's test, by the file's stem.
GOLDEN_CASE = "tests/test_golden.py::test_a_golden_file_renders_as_the_library_that_wrote_it[{}]"
# A test of tests/test_lora_import.py that loads a LoRA of the text encoder too, by its node id.
LORA_TEXT_CASE = "tests/test_lora_import.py::test_a_lora_of_the_text_encoder_too_loads_and_renders_as_diffusers_loader_does[{}]"
# One case of tests/test_loss_reference.py, by its node id.
LOSS_CASE = "tests/test_loss_reference.py::test_losses_and_gradients_equal_the_reference[{}]"
# The run side's rules (issue 40): job states and resume, checkpoints, cluster, LoRA keys, option
# bounds, the memory estimate, the Bypass's FiLM, the training step's graph.
RUN_RULE_TESTS = ("tests/rules/test_job_states.py", "tests/rules/test_checkpoints_rules.py", "tests/rules/test_cluster_rules.py",
                  "tests/rules/test_lora_keys_rules.py", "tests/rules/test_option_bounds.py", "tests/rules/test_memory_rules.py",
                  "tests/rules/test_bypass_film.py", "tests/rules/test_step_graph.py")
JOBS = "tests/rules/test_job_states.py::{}"
CKPT = "tests/rules/test_checkpoints_rules.py::{}"
RAY = "tests/rules/test_cluster_rules.py::{}"
# The web studio's rules (webui.files, webui.visitors, trainers.service.limits, trainers.service.uploads): the rules'
# tables first, then the tests that reach them over HTTP or through the job runner.
FILES_RULES, VISITORS_RULES = "tests/rules/test_files_rules.py", "tests/rules/test_visitors_rules.py"
LIMITS_RULES, UPLOADS_RULES = "tests/rules/test_limits_rules.py", "tests/rules/test_uploads_rules.py"
WEB_RULE_TESTS = (FILES_RULES, VISITORS_RULES, LIMITS_RULES, UPLOADS_RULES, "tests/test_visitors.py", "tests/test_uploads.py",
                  "tests/security/test_routes.py", "tests/security/test_uploads.py", "tests/security/test_visitors.py",
                  "tests/security/test_caps.py")
# What a tuner file may hold (issue 39, items 8 and 10): weights and a LoRA's update within what renders.
IMPORT_TESTS = ("tests/security/test_imports.py",)
IMPORTS = "tests/security/test_imports.py::{}"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    first: str  # the test file (or node id) run first
    tests: tuple = LIBRARY_TESTS  # what a survivor has passed


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
    Mutation("adapter-relu", "restuning/tuners.py", "return self.up(F.gelu(self.down(x)))", "return self.up(F.relu(self.down(x)))", "tests/test_tuner_math.py"),
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
    Mutation("bypass-lambda-swapped", "restuning/methods/bypass/layer.py", "out = lam * across + (1 - lam) * (",
             "out = (1 - lam) * across + lam * (", "tests/test_bypass.py"),
    Mutation("bypass-text-reads-state", "restuning/methods/bypass/layer.py", "across = across + self.text(feature, text)",
             "across = across + self.text(state, text)", "tests/test_bypass.py"),
    Mutation("bypass-output-reads-backbone", "restuning/methods/bypass/layer.py", "x = self.out[0](state)",
             "x = self.out[0](features[-1])", "tests/test_bypass.py"),
    Mutation("bypass-gate-on-state", "restuning/methods/bypass/layer.py", "* (state - features[-1])", "* state",
             "tests/test_bypass.py"),
    # -- the Bypass's wiring and initialisation (tests/test_bypass_contracts.py)
    Mutation("bypass-x0-from-tap-output", "restuning/methods/bypass/model.py", "x0 = call.inputs[bypass.paths[0]]",
             "x0 = call.outputs[bypass.paths[0]]", BYPASS_CASE.format("test_the_network_reads_x0_and_each_tap_where_the_docstring_says"),
             BYPASS_TESTS),
    Mutation("bypass-resample-nearest", "restuning/methods/bypass/layer.py",
             'x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)', 'x = F.interpolate(x, size=size, mode="nearest")',
             BYPASS_CASE.format("test_resampling_keeps_a_constant_field_constant_and_is_bilinear_up_and_mean_pooled_down"),
             BYPASS_TESTS),
    Mutation("bypass-channel-groups-summed", "restuning/methods/bypass/layer.py", ".float() / group", ".float()",
             BYPASS_CASE.format("test_a_channel_map_averages_groups_down_and_repeats_them_up"), BYPASS_TESTS),
    Mutation("bypass-prefix-gain-inverted", "restuning/methods/bypass/layer.py", "torch.eye(layer.out.in_features) / layer.gain",
             "torch.eye(layer.out.in_features) * layer.gain",
             BYPASS_CASE.format("test_behind_z_res_prefix_wakes_to_pass_its_mixture_as_it_is"), BYPASS_TESTS),
    Mutation("bypass-kernel-threshold-off-by-one", "restuning/methods/bypass/layer.py", "kernel = 3 if last <= DENSE_3X3_MAX else 1",
             "kernel = 3 if last < DENSE_3X3_MAX else 1", BYPASS_CASE.format("test_sd15_size_is_pinned_and_z_is_3x3_up_to_320_channels"),
             BYPASS_TESTS),
    Mutation("bypass-strength-squared", "restuning/methods/bypass/model.py", "delta = delta * bypass.handle.scale",
             "delta = delta * bypass.handle.scale ** 2",
             BYPASS_CASE.format("test_strength_s_gives_the_input_of_the_injection_point_base_plus_s_times_the_change"), BYPASS_TESTS),
    # -- strength at the point where the correction enters (tests/test_contracts.py)
    Mutation("strength-bound-scales-the-whole-attention", "restuning/methods/attention.py", "out = base + strength * (out - base)",
             "out = strength * out", "tests/test_contracts.py::test_bound_prefix_and_prompt_strength_is_their_unbound_form"),
    Mutation("strength-bound-squared", "restuning/methods/attention.py", "out = base + strength * (out - base)",
             "out = base + strength * strength * (out - base)",
             "tests/test_contracts.py::test_bound_prefix_and_prompt_strength_is_their_unbound_form"),
    Mutation("strength-bound-adapter-ignored", "restuning/methods/adapter/model.py",
             "adapter(output.to(dtype)), handle.name, handle.scale)", "adapter(output.to(dtype)), handle.name, 1.0)",
             "tests/test_contracts.py::test_bound_adapter_strength_is_its_parallel_form"),
    Mutation("strength-lora-squared", "restuning/methods/lora/model.py", "module.set_scale(self.name, self.scale)",
             "module.set_scale(self.name, self.scale ** 2)",
             "tests/test_contracts.py::test_lora_strength_scales_the_low_rank_update_of_each_layer"),
    Mutation("strength-lora-text-encoder-unscaled", "restuning/methods/lora/model.py", "for model, _ in self._models():",
             "for model in [self.unet]:",
             "tests/test_contracts.py::test_lora_strength_scales_the_low_rank_update_of_each_layer"),
    # -- tuner files: format versions, fingerprint, key names (tests/test_golden.py, tests/test_io.py)
    Mutation("io-newer-version-accepted", "restuning/io.py", "if version > FORMAT_VERSION:", "if version > FORMAT_VERSION + 1:",
             "tests/test_golden.py::test_a_file_of_a_newer_format_version_is_refused_saying_to_upgrade"),
    Mutation("io-fingerprint-without-text-width", "restuning/arch.py", '    "cross_attention_dim",\n', "",
             "tests/test_golden.py::test_a_file_for_another_text_width_is_refused"),
    Mutation("io-fingerprint-missing-field-passes", "restuning/arch.py", "if field not in saved or saved[field] != current[field]",
             "if field in saved and saved[field] != current[field]",
             "tests/test_golden.py::test_a_fingerprint_missing_any_field_is_refused"),
    Mutation("io-version-2-res-prefix-accepted", "restuning/io.py", 'if "prefix" in kinds:\n        return 3, _PREFIX_OUT',
             'if "prefix" in kinds:\n        return 2, _PREFIX_OUT', "tests/test_io.py"),
    Mutation("io-res-tuning-keys-renamed", "restuning/methods/res_tuning/model.py", 'handle.modules[key] = tuner',
             'handle.modules[f"{key}.tuner"] = tuner', GOLDEN_CASE.format("res-tuning-v1")),
    Mutation("io-lora-text-encoder-keys-renamed", "restuning/methods/lora/model.py", 'TEXT_ENCODER_PREFIX = "text_encoder."',
             'TEXT_ENCODER_PREFIX = "text_encoder.lora."', GOLDEN_CASE.format("lora-text-encoder-v2")),
    # -- LoRA files from elsewhere (tests/test_lora_import.py)
    Mutation("lora-import-text-model-level-kept", "restuning/methods/lora/convert.py",
             'state = {k.removeprefix("text_model."): v for k, v in state.items()}', "pass",
             LORA_TEXT_CASE.format("diffusers text_model."),
             LORA_TESTS),
    Mutation("lora-import-alpha-is-rank", "restuning/methods/lora/convert.py", 'rank, alpha = kwargs["r"], kwargs["lora_alpha"]',
             'rank, alpha = kwargs["r"], kwargs["r"]', LORA_TEXT_CASE.format("kohya"), LORA_TESTS),
    Mutation("lora-import-text-encoder-alphas-dropped", "restuning/methods/lora/convert.py",
             "return state, _peft_kwargs(state, alphas, metadata, is_unet=False)",
             "return state, _peft_kwargs(state, None, metadata, is_unet=False)", LORA_TEXT_CASE.format("kohya"), LORA_TESTS),
    Mutation("lora-import-old-diffusers-keys-unconverted", "restuning/methods/lora/convert.py", 'if "lora_A" not in next(iter(state)):',
             "if False:", LORA_TEXT_CASE.format("diffusers"), LORA_TESTS),
    # -- the trainer's loss (tests/test_loss_reference.py)
    Mutation("loss-latents-unscaled", "trainers/dreambooth.py", "(posterior.sample(generator=generator) * scaling_factor).float()",
             "posterior.sample(generator=generator).float()", LOSS_CASE.format("epsilon"), LOSS_TESTS),
    Mutation("loss-latents-in-half-precision", "trainers/dreambooth.py", "(posterior.sample(generator=generator) * scaling_factor).float()",
             "posterior.sample(generator=generator) * scaling_factor", LOSS_CASE.format("bf16 autocast"), LOSS_TESTS),
    Mutation("loss-v-target-swapped", "trainers/dreambooth.py", "get_velocity(latents, noise, timesteps)",
             "get_velocity(noise, latents, timesteps)", LOSS_CASE.format("v-prediction min-SNR"), LOSS_TESTS),
    Mutation("loss-min-snr-v-weight-of-epsilon", "trainers/dreambooth.py", '/ (snr + 1 if prediction == "v_prediction" else snr)',
             "/ snr", LOSS_CASE.format("v-prediction min-SNR"), LOSS_TESTS),
    Mutation("loss-min-snr-clamped-below", "trainers/dreambooth.py", "torch.clamp(snr, max=args.snr_gamma)",
             "torch.clamp(snr, min=args.snr_gamma)", LOSS_CASE.format("epsilon min-SNR"), LOSS_TESTS),
    Mutation("loss-prior-weight-ignored", "trainers/dreambooth.py", "total = instance + args.prior_loss_weight * prior",
             "total = instance + prior", LOSS_CASE.format("prior preservation"), LOSS_TESTS),
    Mutation("loss-instance-mean-over-class-images", "trainers/dreambooth.py", "instance = per_sample[:num_instance].mean()",
             "instance = per_sample.mean()", LOSS_CASE.format("prior preservation"), LOSS_TESTS),
    Mutation("loss-noise-offset-per-pixel", "trainers/dreambooth.py", "torch.randn((b, c, 1, 1), generator=generator)",
             "torch.randn(latents.shape, generator=generator)", LOSS_CASE.format("noise offset"), LOSS_TESTS),
    Mutation("loss-micro-batches-same-images", "trainers/dreambooth.py", "dataset.batch(((step * accum + micro) * world + rank) * bs, bs)",
             "dataset.batch((step * accum * world + rank) * bs, bs)", LOSS_CASE.format("gradient accumulation"), LOSS_TESTS),
    Mutation("loss-micro-batches-same-draws", "trainers/dreambooth.py", "step_generator(args.seed, step, micro, rank)",
             "step_generator(args.seed, step, 0, rank)", LOSS_CASE.format("gradient accumulation"), LOSS_TESTS),
    Mutation("loss-generator-ignores-micro-batch", "trainers/dreambooth.py", "hash((seed, step, micro, process))",
             "hash((seed, step, process))", LOSS_CASE.format("gradient accumulation"), LOSS_TESTS),
    Mutation("loss-tuners-in-half-precision", "trainers/dreambooth.py", "cast_training_params(model, dtype=torch.float32)",
             "pass", LOSS_CASE.format("bf16 autocast"), LOSS_TESTS),
    Mutation("off-concept-first-rows", "trainers/dreambooth.py", "rows = slice(b - k, b)", "rows = slice(0, k)",
             "tests/test_off_concept.py", OFF_CONCEPT_TESTS),
    Mutation("off-concept-weight-ignored", "trainers/dreambooth.py", "total = total + off_concept.weight * F.mse_loss(",
             "total = total + F.mse_loss(", "tests/test_off_concept.py", OFF_CONCEPT_TESTS),
    Mutation("off-concept-teacher-tuned", "trainers/dreambooth.py", "restuning.set_scale(unet, 0.0, name=name)",
             "restuning.set_scale(unet, 1.0, name=name)", "tests/test_off_concept.py", OFF_CONCEPT_TESTS),
    Mutation("identifier-every-token", "restuning/identifier.py", "hits = (input_ids.unsqueeze(-1) == ids)",
             "hits = (input_ids.unsqueeze(-1) >= 0)", "tests/test_identifier.py", ("tests/test_identifier.py",)),
    # run rules: job states, checkpoints, cluster, LoRA keys, options, memory (issue 40)
    Mutation("jobs-resume-skips-run-caps", "trainers/service/jobs.py", "            self.check_owner_limit(info.owner)\n            self.check_free_disk()",
             "            self.check_free_disk()", JOBS.format("test_a_resume_counts_against_the_visitors_run_cap"), RUN_RULE_TESTS),
    Mutation("jobs-resume-skips-free-disk", "trainers/service/jobs.py", "            self.check_owner_limit(info.owner)\n            self.check_free_disk()",
             "            self.check_owner_limit(info.owner)",
             JOBS.format("test_a_resume_is_refused_without_free_disk_and_over_the_step_cap"), RUN_RULE_TESTS),
    Mutation("jobs-resume-skips-step-cap", "trainers/service/jobs.py", "config = self.check_config(dict(info.config))", "config = dict(info.config)",
             JOBS.format("test_a_resume_is_refused_without_free_disk_and_over_the_step_cap"), RUN_RULE_TESTS),
    Mutation("jobs-resume-keeps-its-queue-place", "trainers/service/jobs.py", '            job["queued_at"] = time.time()\n', "",
             JOBS.format("test_a_resumed_run_goes_to_the_back_of_the_queue"), RUN_RULE_TESTS),
    Mutation("jobs-resume-keeps-the-old-cancel", "trainers/service/jobs.py", 'job.pop("cancel_requested", None)', "pass",
             JOBS.format("test_a_resumed_run_that_dies_fails_rather_than_showing_its_old_cancel"), RUN_RULE_TESTS),
    Mutation("jobs-reused-pid-counts", "trainers/service/jobs.py", 'if abs(proc.create_time() - float(record["create_time"])) >= 1.0:',
             "if False:", JOBS.format("test_a_pid_counts_only_with_its_start_time"), RUN_RULE_TESTS),
    Mutation("jobs-pid-start-time-loose", "trainers/service/jobs.py", 'float(record["create_time"])) >= 1.0:', 'float(record["create_time"])) >= 2.0:',
             JOBS.format("test_a_pid_counts_only_with_its_start_time"), RUN_RULE_TESTS),
    Mutation("jobs-final-phase-ahead-of-process", "trainers/service/jobs.py", "    if alive:  # after a final phase too:",
             "    if alive and phase not in FINAL_PHASES:  #", JOBS.format("test_status_table"), RUN_RULE_TESTS),
    Mutation("jobs-dead-run-shows-queued", "trainers/service/jobs.py", 'return "queued" if waiting else "failed"', 'return "queued"',
             JOBS.format("test_status_table"), RUN_RULE_TESTS),
    Mutation("jobs-second-cancel-signals-again", "trainers/service/jobs.py", "if info.phase in FINAL_PHASES or run_id in self._cancel_at:",
             "if info.phase in FINAL_PHASES:", JOBS.format("test_a_second_cancel_signals_nothing_more"), RUN_RULE_TESTS),
    Mutation("jobs-cancel-never-forced", "trainers/service/jobs.py", "elif time.monotonic() - since > self.kill_after:", "elif False:",
             JOBS.format("test_a_cancel_the_trainer_ignores_is_forced_after_kill_after"), RUN_RULE_TESTS),
    Mutation("jobs-silent-end-after-cancel-fails", "trainers/service/jobs.py",
             'if _read_json(path / JOB_FILE).get("cancel_requested"):\n                EventLog(path).phase("cancelled"',
             'if False:\n                EventLog(path).phase("cancelled"', JOBS.format("test_a_process_that_ends_gets_a_final_status_once"),
             RUN_RULE_TESTS),
    Mutation("jobs-restart-drops-a-pending-cancel", "trainers/service/jobs.py",
             'if _read_json(path / JOB_FILE).get("cancel_requested"):\n                    self._cancel_at[run_id]',
             'if False:\n                    self._cancel_at[run_id]',
             JOBS.format("test_a_restarted_studio_adopts_live_runs_fails_dead_ones_and_keeps_a_pending_cancel"), RUN_RULE_TESTS),
    Mutation("jobs-running-run-deletable", "trainers/service/jobs.py", 'if info.status in ("queued", "running"):\n                raise JobError(f"run {run_id} is {info.status}; cancel it before deleting")',
             'if info.status == "queued":\n                raise JobError(f"run {run_id} is {info.status}; cancel it before deleting")',
             JOBS.format("test_every_action_on_every_status"), RUN_RULE_TESTS),
    Mutation("jobs-stopping-run-not-settled", "trainers/service/jobs.py", 'if info.status == "running" and info.phase in FINAL_PHASES:', "if False:",
             JOBS.format("test_every_action_on_every_status"), RUN_RULE_TESTS),
    Mutation("jobs-resumable-without-checkpoint", "trainers/service/jobs.py",
             'info.resumable = status in ("failed", "cancelled") and info.checkpoint is not None',
             'info.resumable = status in ("failed", "cancelled")', JOBS.format("test_each_status_is_derived_from_the_files_and_the_process"),
             RUN_RULE_TESTS),
    Mutation("jobs-done-resumable", "trainers/service/jobs.py", 'info.resumable = status in ("failed", "cancelled") and',
             'info.resumable = status in ("failed", "cancelled", "done") and',
             JOBS.format("test_each_status_is_derived_from_the_files_and_the_process"), RUN_RULE_TESTS),
    Mutation("ckpt-non-ascii-digits-a-step", "trainers/checkpoints.py", "or not digits.isascii() or not digits.isdigit():",
             "or not digits.isdigit():", CKPT.format("test_step_of_reads_only_checkpoint_dash_ascii_digits"), RUN_RULE_TESTS),
    Mutation("ckpt-ordered-by-name", "trainers/checkpoints.py", "key=lambda p: (step_of(p), p.name))", "key=lambda p: p.name)",
             CKPT.format("test_ordered_is_by_step_number_not_by_name_and_leaves_odd_names_out"), RUN_RULE_TESTS),
    Mutation("ckpt-found-oldest-first", "trainers/checkpoints.py", "if p.is_dir() and not p.is_symlink())[::-1]",
             "if p.is_dir() and not p.is_symlink())", CKPT.format("test_latest_is_the_highest_step"), RUN_RULE_TESTS),
    Mutation("ckpt-found-follows-symlinks", "trainers/checkpoints.py", "if p.is_dir() and not p.is_symlink())[::-1]",
             "if p.is_dir())[::-1]", CKPT.format("test_found_skips_odd_names_files_and_symlinks"), RUN_RULE_TESTS),
    Mutation("ckpt-fallback-tries-newer", "trainers/checkpoints.py", "if step_of(p) < step_of(first) and problem(p) is None]",
             "if step_of(p) != step_of(first) and problem(p) is None]",
             CKPT.format("test_the_resume_fallback_tries_only_older_checkpoints_newest_first"), RUN_RULE_TESTS),
    Mutation("ckpt-rotation-by-name", "trainers/dreambooth.py", "for old in saved.found(output_dir)[limit:]:",
             "for old in sorted(saved.found(output_dir), key=lambda p: p.name, reverse=True)[limit:]:",
             CKPT.format("test_rotation_keeps_the_newest_by_step_and_never_touches_odd_names"), RUN_RULE_TESTS),
    Mutation("ckpt-rotation-keeps-one-more", "trainers/dreambooth.py", "for old in saved.found(output_dir)[limit:]:",
             "for old in saved.found(output_dir)[limit + 1:]:",
             CKPT.format("test_rotation_keeps_the_newest_by_step_and_never_touches_odd_names"), RUN_RULE_TESTS),
    Mutation("ckpt-named-odd-name-accepted", "trainers/dreambooth.py", "if not (path.is_dir() and saved.step_of(path) >= 0):",
             "if not path.is_dir():", CKPT.format("test_a_named_checkpoint_must_be_a_checkpoint_name_and_the_error_lists_them_by_step"),
             RUN_RULE_TESTS),
    Mutation("ray-memory-not-asked", "trainers/service/cluster.py", 'resources["entrypoint_memory"] = int(memory_bytes)', "pass",
             RAY.format("test_a_job_asks_ray_for_its_cpus_gpu_and_memory"), RUN_RULE_TESTS),
    Mutation("ray-cpu-run-without-its-cap", "trainers/service/cluster.py", 'memory_bytes=cap if device == "cpu" else None', "memory_bytes=None",
             RAY.format("test_a_run_asks_for_its_memory_cap_on_the_cpu_and_a_gpu_on_a_card"), RUN_RULE_TESTS),
    Mutation("ray-grace-rounded-down", "trainers/service/cluster.py", "str(math.ceil(kill_after))", "str(int(kill_after))",
             RAY.format("test_a_cancel_gives_the_trainer_at_least_kill_after_seconds_before_sigkill"), RUN_RULE_TESTS),
    Mutation("ray-grace-not-the-launchers", "trainers/service/cluster.py", "kill_after=self.kill_after, metadata=", "kill_after=120.0, metadata=",
             RAY.format("test_a_run_asks_for_its_memory_cap_on_the_cpu_and_a_gpu_on_a_card"), RUN_RULE_TESTS),
    Mutation("ray-node-needs-more-cpus", "trainers/service/cluster.py", 'n.resources_total.get("CPU", 0) >= self.cpus_per_run',
             'n.resources_total.get("CPU", 0) > self.cpus_per_run', RAY.format("test_a_node_takes_a_run_with_at_least_its_cpus"),
             RUN_RULE_TESTS),
    Mutation("ray-one-run-too-many-handed-over", "trainers/service/cluster.py", "if waiting < max(1, width) else None",
             "if waiting <= max(1, width) else None",
             RAY.format("test_runs_are_handed_to_ray_while_fewer_wait_than_nodes_can_take_one"), RUN_RULE_TESTS),
    Mutation("ray-unknown-job-running", "trainers/service/cluster.py", "info, state = None, ENDED", "info, state = None, RUNNING",
             RAY.format("test_a_cluster_that_cannot_say_declares_nothing_dead"), RUN_RULE_TESTS),
    Mutation("ray-unplaced-run-fails", "trainers/service/cluster.py", 'None if getattr(info, "error_type", None) == START_TIMEOUT else',
             "None if False else", RAY.format("test_how_a_job_ended_and_one_never_placed_goes_back_to_the_queue"), RUN_RULE_TESTS),
    Mutation("ray-gpu-run-uncapped", "trainers/service/cluster.py", "env[memory.CUDA_CAP_ENV] = str(cap)", "pass",
             RAY.format("test_a_run_asks_for_its_memory_cap_on_the_cpu_and_a_gpu_on_a_card"), RUN_RULE_TESTS),
    Mutation("ray-whole-environment-sent", "trainers/service/cluster.py",
             "env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}", "env = dict(os.environ)",
             RAY.format("test_a_run_asks_for_its_memory_cap_on_the_cpu_and_a_gpu_on_a_card"), RUN_RULE_TESTS),
    Mutation("lora-strength-0-first-encoder-only", "restuning/methods/lora/model.py", "for _, model in self.text_encoders():\n            _activate_all(model, owner=self.unet)",
             "for _, model in self.text_encoders()[:1]:\n            _activate_all(model, owner=self.unet)",
             "tests/rules/test_lora_keys_rules.py::test_strength_0_takes_the_lora_out_of_every_tuned_model_so_a_non_finite_one_is_not_computed",
             RUN_RULE_TESTS),
    Mutation("lora-second-encoder-on-sd1", "restuning/methods/lora/convert.py", "if second and not xl:", "if False:",
             "tests/rules/test_lora_keys_rules.py::test_a_second_text_encoders_keys_are_refused_on_a_model_with_one", RUN_RULE_TESTS),
    Mutation("lora-mixed-file-read-as-kohya", "restuning/methods/lora/convert.py", "if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):",
             "if keys and any(k.startswith(KOHYA_PREFIXES) for k in keys):", "tests/rules/test_lora_keys_rules.py::test_a_files_key_layout",
             RUN_RULE_TESTS),
    Mutation("lora-layouts-mixed-across-parts", "restuning/methods/lora/convert.py",
             'part = "unet" if key.startswith(("unet.", "lora_unet_")) else "text encoder"', 'part = "unet"',
             "tests/rules/test_lora_keys_rules.py::test_a_file_mixing_layouts_within_a_part_is_named", RUN_RULE_TESTS),
    Mutation("lora-second-encoder-keys-to-the-unet", "restuning/methods/lora/model.py",
             "(TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX) if key.startswith(p)), \"\")", "(TEXT_ENCODER_PREFIX,) if key.startswith(p)), \"\")",
             "tests/rules/test_lora_keys_rules.py::test_a_handle_state_key_belongs_to_one_model", RUN_RULE_TESTS),
    Mutation("sgm-upsampler-slot", "restuning/methods/lora/export.py", "{2 if 'CrossAttn' in config['up_block_types'][b] else 1}", "1",
             "tests/rules/test_lora_keys_rules.py::test_sdxl_layers_get_kohyas_sgm_names", RUN_RULE_TESTS),
    Mutation("sgm-input-block-off-by-one", "restuning/methods/lora/export.py", 'return f"input_blocks.{b * per + j + 1}.',
             'return f"input_blocks.{b * per + j}.', "tests/rules/test_lora_keys_rules.py::test_sdxl_layers_get_kohyas_sgm_names",
             RUN_RULE_TESTS),
    Mutation("options-lowest-always-allowed", "trainers/options.py", "(value >= low if low_ok else value > low)", "value >= low",
             "tests/rules/test_option_bounds.py::test_each_option_at_its_edges", RUN_RULE_TESTS),
    Mutation("options-highest-refused", "trainers/options.py", "and value <= high", "and value < high",
             "tests/rules/test_option_bounds.py::test_each_option_at_its_edges", RUN_RULE_TESTS),
    Mutation("options-epochs-bound-widened", "trainers/options.py", '"num_train_epochs": (1, 100_000, True)',
             '"num_train_epochs": (1, 1_000_000, True)', "tests/rules/test_option_bounds.py::test_each_option_at_its_edges", RUN_RULE_TESTS),
    Mutation("memory-class-images-not-counted", "trainers/memory.py", "images = max(validation_images, class_batch)",
             "images = validation_images", "tests/rules/test_memory_rules.py", RUN_RULE_TESTS),
    Mutation("memory-class-images-without-prior", "trainers/memory.py",
             "class_batch=args.sample_batch_size if args.with_prior_preservation else 0", "class_batch=args.sample_batch_size",
             "tests/rules/test_memory_rules.py::test_the_estimate_reads_the_class_image_phase_from_the_options", RUN_RULE_TESTS),
    Mutation("memory-prior-rows-not-doubled", "trainers/memory.py", "(batch * (2 if prior else 1) + extra_rows)", "(batch + extra_rows)",
             "tests/rules/test_memory_rules.py", RUN_RULE_TESTS),
    Mutation("memory-peak-sums-step-and-sampling", "trainers/memory.py", "total = overhead + weights + optimizer + max(grads + activations, sampling)",
             "total = overhead + weights + optimizer + grads + activations + sampling", "tests/rules/test_memory_rules.py", RUN_RULE_TESTS),
    Mutation("film-without-one-plus", "restuning/methods/bypass/variants.py", "return x * (1 + scale) + shift", "return x * scale + shift",
             "tests/rules/test_bypass_film.py", RUN_RULE_TESTS),
    Mutation("film-gamma-beta-swapped", "restuning/methods/bypass/variants.py", "scale, shift = self.up(self.down(F.silu(temb)))",
             "shift, scale = self.up(self.down(F.silu(temb)))", "tests/rules/test_bypass_film.py", RUN_RULE_TESTS),
    Mutation("film-without-silu", "restuning/methods/bypass/variants.py", "self.up(self.down(F.silu(temb)))", "self.up(self.down(temb))",
             "tests/rules/test_bypass_film.py", RUN_RULE_TESTS),
    Mutation("film-output-not-woken", "restuning/methods/bypass/layer.py",
             "if self.out_film is not None and self.arrange is None:\n            self.out_film.wake()", "if False:\n            self.out_film.wake()",
             "tests/rules/test_bypass_film.py", RUN_RULE_TESTS),
    Mutation("step-graph-kept-with-the-loss", "trainers/dreambooth.py",
             "step_loss += torch.stack([loss.detach(), instance_loss.detach()]).float() / accum",
             "step_loss += torch.stack([loss, instance_loss]).float() / accum", "tests/rules/test_step_graph.py", RUN_RULE_TESTS),
    # web rules: routes, visitors, caps, uploads (issue 40)
    Mutation("route-root-by-string-prefix", "webui/files.py", "return any(path == root or path.is_relative_to(root) for root in roots)",
             "return any(str(path).startswith(str(root)) for root in roots)", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-symlinks-unresolved", "webui/files.py", "real = Path(os.path.realpath(gradio_utils.abspath(target)))",
             "real = Path(gradio_utils.abspath(target))", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-runs-folder-served", "webui/files.py", "if inside(real, [self.private]) or not inside(",
             "if not inside(", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-runs-folder-itself-served", "webui/files.py", "if inside(real, [self.private]) or not inside(",
             "if (real != self.private and inside(real, [self.private])) or not inside(", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-runs-folder-unresolved", "webui/files.py", "self.private = Path(os.path.realpath(private))",
             "self.private = Path(private)", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-roots-unresolved", "webui/files.py", "return [Path(os.path.realpath(gradio_utils.abspath(r))) for r in roots]",
             "return [Path(gradio_utils.abspath(r)) for r in roots]", FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-some-urls-fetched", "webui/files.py", 'if "://" in target or target.startswith(("http:", "https:", "//")):',
             'if target.startswith(("http://", "https://")):', FILES_RULES, WEB_RULE_TESTS),
    Mutation("route-unclassified-path-route-passes", "webui/files.py", '            return "not served by this studio"',
             "            return None", FILES_RULES, WEB_RULE_TESTS),
    Mutation("quota-window-a-minute", "webui/files.py", "WINDOW_SECONDS = 3600.0", "WINDOW_SECONDS = 60.0", UPLOADS_RULES,
             WEB_RULE_TESTS),
    Mutation("quota-window-edge", "webui/files.py", "now - self._sent[0][0] > WINDOW_SECONDS", "now - self._sent[0][0] >= WINDOW_SECONDS",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-per-client-at-cap-refused", "webui/files.py", "mine + size > self.per_client", "mine + size >= self.per_client",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-total-at-cap-refused", "webui/files.py", "everyone + size > self.total", "everyone + size >= self.total",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-everyone-counted-as-mine", "webui/files.py", "mine = sum(n for _, who, n in self._sent if who == client)",
             "mine = sum(n for _, who, n in self._sent)", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-upload-route-only", "webui/files.py", 'if scope["type"] == "http":\n            size = declared_body(scope)',
             'if scope["type"] == "http" and scope.get("path", "").rstrip("/") == "/gradio_api/upload":\n'
             "            size = declared_body(scope)", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-post-only", "webui/files.py", 'if scope["type"] == "http":\n            size = declared_body(scope)',
             'if scope["type"] == "http" and scope.get("method") == "POST":\n            size = declared_body(scope)',
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-chunked-body-free", "webui/files.py",
             'if any(name == b"transfer-encoding" for name, _ in scope.get("headers", [])):\n        return None',
             'if any(name == b"transfer-encoding" for name, _ in scope.get("headers", [])):\n        return 0',
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-client-claim-trusted", "webui/files.py", "return entries[-hops]", "return entries[0]", UPLOADS_RULES,
             WEB_RULE_TESTS),
    Mutation("quota-uvicorn-trusts-loopback", "webui/files.py", 'env["FORWARDED_ALLOW_IPS"] = ""',
             'env.setdefault("FORWARDED_ALLOW_IPS", "127.0.0.1")', UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-installed-only-with-both-caps", "webui/files.py",
             "limits.upload_per_client is not None or limits.upload_total is not None",
             "limits.upload_per_client is not None and limits.upload_total is not None", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-proxy-hops-dropped", "webui/files.py", "total=limits.upload_total, hops=hops))", "total=limits.upload_total))",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("quota-on-a-local-studio", "webui/__init__.py", "runner.limits if shared else None, proxy_hops)",
             "runner.limits, proxy_hops)", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-without-id-sees-unowned-runs", "webui/visitors.py",
             "return owner is None or (bool(owner) and info.owner == owner) or info.published",
             "return owner is None or info.owner == owner or info.published", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-without-id-sees-every-run", "webui/visitors.py",
             "return owner is None or (bool(owner) and info.owner == owner) or info.published",
             "return not owner or (bool(owner) and info.owner == owner) or info.published", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-controls-published-runs", "webui/visitors.py",
             "-> bool:\n    return owner is None or (bool(owner) and info.owner == owner)\n",
             "-> bool:\n    return owner is None or (bool(owner) and info.owner == owner) or info.published\n",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-without-id-controls-unowned-runs", "webui/visitors.py",
             "-> bool:\n    return owner is None or (bool(owner) and info.owner == owner)\n",
             "-> bool:\n    return owner is None or info.owner == owner\n", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-unknown-run-answered-apart", "webui/visitors.py", "    except JobError:\n        info = None",
             "    except JobError:\n        raise", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-without-id-gets-a-folder", "webui/visitors.py", "if owner is not None and not OWNER.fullmatch(owner):",
             "if owner and not OWNER.fullmatch(owner):", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-owner-id-prefix-match", "webui/visitors.py", "not OWNER.fullmatch(owner)", "not OWNER.match(owner)",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("visitor-secret-prefix-match", "webui/visitors.py", "SECRET.fullmatch(value)", "SECRET.match(value)",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("scratch-never-pruned", "webui/visitors.py", "    prune(path)\n    return path", "    return path",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("scratch-keeps-one-more", "webui/visitors.py", "if i >= keep or now - mtime > age:", "if i > keep or now - mtime > age:",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("scratch-age-edge", "webui/visitors.py", "if i >= keep or now - mtime > age:", "if i >= keep or now - mtime >= age:",
             VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("scratch-kept-an-hour", "webui/visitors.py", "SCRATCH_KEEP, SCRATCH_AGE = 200, 86400",
             "SCRATCH_KEEP, SCRATCH_AGE = 200, 3600", VISITORS_RULES, WEB_RULE_TESTS),
    Mutation("caps-shared-runs-per-visitor-may-be-off", "trainers/service/limits.py", 'if shared and values["runs_per_owner"] is None:',
             'if shared and "runs_per_owner" not in values:', LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-zero-is-a-cap-of-zero", "trainers/service/limits.py",
             '(None if name != "min_free_disk" else 0) if number == 0 else int(number * unit)', "int(number * unit)",
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-flag-zero-is-a-cap-of-zero", "trainers/service/limits.py",
             'values[name] = (None if name != "min_free_disk" else 0) if value == 0 else value', "values[name] = value",
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-off-not-understood", "trainers/service/limits.py", 'if text in ("off", "none"):', 'if text in ("none",):',
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-negative-accepted", "trainers/service/limits.py", "if not (number >= 0 and number * unit < 2**62):",
             "if not (number * unit < 2**62):", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-run-minutes-read-as-seconds", "trainers/service/limits.py", '"max_run_seconds": ("RESTUNING_MAX_RUN_MINUTES", 60),',
             '"max_run_seconds": ("RESTUNING_MAX_RUN_MINUTES", 1),', LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-local-studio-gets-runs-per-visitor", "trainers/service/limits.py", '    if not shared:\n        values["runs_per_owner"] = None\n',
             "", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-comparison-counts-as-one", "trainers/service/limits.py", "if mine + batch > lim.runs_per_owner:",
             "if mine + 1 > lim.runs_per_owner:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-runs-per-visitor-at-cap-refused", "trainers/service/limits.py", "if mine + batch > lim.runs_per_owner:",
             "if mine + batch >= lim.runs_per_owner:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-oversized-comparison-not-named", "trainers/service/limits.py", "if batch > lim.runs_per_owner:",
             "if batch > lim.runs_per_owner + 1:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-queued-runs-not-counted", "trainers/service/limits.py", 'if r.status in ("queued", "running")]',
             'if r.status in ("running",)]', LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-others-runs-counted-as-mine", "trainers/service/limits.py", "mine = sum(1 for r in active if r.owner == owner)",
             "mine = len(active)", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-comparison-counts-as-one-in-all", "trainers/service/limits.py", "len(active) + batch > lim.queued_total",
             "len(active) + 1 > lim.queued_total", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-disk-in-all-at-cap-passes", "trainers/service/limits.py", "if used >= lim.disk_total:", "if used > lim.disk_total:",
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-disk-per-visitor-at-cap-passes", "trainers/service/limits.py", "if used >= lim.disk_per_owner:",
             "if used > lim.disk_per_owner:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-rendered-pictures-not-counted", "trainers/service/limits.py", " + (folder_bytes(scratch) if scratch.is_dir() else 0)", "",
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-imported-size-not-counted", "trainers/service/limits.py", "owner_bytes(runner, owner, runs) + size > lim.disk_per_owner",
             "owner_bytes(runner, owner, runs) > lim.disk_per_owner", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-imported-size-at-cap-refused", "trainers/service/limits.py",
             "owner_bytes(runner, owner, runs) + size > lim.disk_per_owner",
             "owner_bytes(runner, owner, runs) + size >= lim.disk_per_owner", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-imports-in-all-one-more", "trainers/service/limits.py", "len(imported) >= lim.imports_total:",
             "len(imported) > lim.imports_total:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-imports-per-visitor-one-more", "trainers/service/limits.py", "if mine >= lim.imports_per_owner:",
             "if mine > lim.imports_per_owner:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-trained-runs-counted-as-imports", "trainers/service/limits.py", "imported = [r for r in runs if r.imported]",
             "imported = runs", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-disk-follows-links", "trainers/service/limits.py", "if entry.is_dir(follow_symlinks=False):", "if entry.is_dir():",
             LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-step-cap-at-cap-refused", "trainers/service/jobs.py", "isinstance(steps, int) and steps > cap:",
             "isinstance(steps, int) and steps >= cap:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-checkpoints-capped-locally", "trainers/service/jobs.py", "elif self.limits.shared and default is not None",
             "elif default is not None", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("caps-free-disk-floor-at-floor-refused", "trainers/service/jobs.py", "if free < self.limits.min_free_disk:",
             "if free <= self.limits.min_free_disk:", LIMITS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-fifty-images-refused", "trainers/service/uploads.py", "if len(paths) > max_files:", "if len(paths) >= max_files:",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-image-at-limit-refused", "trainers/service/uploads.py", "if size > max_bytes:", "if size >= max_bytes:",
             UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-tuner-at-limit-refused", "trainers/service/uploads.py", "if path.stat().st_size > max_bytes:",
             "if path.stat().st_size >= max_bytes:", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-name-at-limit-refused", "trainers/service/uploads.py", "if len(name) > MAX_NAME_CHARS:",
             "if len(name) >= MAX_NAME_CHARS:", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-dot-names-accepted", "trainers/service/uploads.py", 'if name in (".", "..") or name.startswith("."):',
             'if name in (".", ".."):', UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-discard-by-string-prefix", "trainers/service/uploads.py", "if path.resolve().is_relative_to(root) and",
             "if str(path.resolve()).startswith(str(root)) and", UPLOADS_RULES, WEB_RULE_TESTS),
    Mutation("uploads-discard-unresolved", "trainers/service/uploads.py", "if path.resolve().is_relative_to(root) and",
             "if path.is_relative_to(root) and", UPLOADS_RULES, WEB_RULE_TESTS),
    # -- what an imported tuner may hold (tests/security/test_imports.py)
    Mutation("weight-bound-exclusive", "restuning/io.py", "> MAX_WEIGHT).sum())", ">= MAX_WEIGHT).sum())",
             IMPORTS.format("test_weights_beyond_half_precision_are_refused"), IMPORT_TESTS),
    Mutation("lora-update-unchecked-on-upload", "trainers/service/uploads.py", "check_updates(config, f.keys(), f.get_tensor, label)",
             "None", IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"), IMPORT_TESTS),
    Mutation("lora-update-unchecked-on-load", "restuning/api.py", "check_updates(config, state, state.__getitem__, path.name)",
             "None", IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"), IMPORT_TESTS),
    Mutation("lora-update-unchecked-on-convert", "restuning/methods/lora/convert.py",
             "check_updates(config, state, state.__getitem__, Path(path).name)", "None",
             IMPORTS.format("test_a_kohya_lora_with_a_huge_alpha_is_refused_naming_the_users_file"), IMPORT_TESTS),
    Mutation("lora-update-unscaled", "restuning/methods/lora/model.py", "float((up @ down).abs().max()) * scale",
             "float((up @ down).abs().max())", IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"),
             IMPORT_TESTS),
    Mutation("lora-update-shortcut-unscaled", "restuning/methods/lora/model.py",
             "float(up.norm(dim=1).max() * down.norm(dim=0).max()) * scale <= MAX_WEIGHT",
             "float(up.norm(dim=1).max() * down.norm(dim=0).max()) <= MAX_WEIGHT",
             IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"), IMPORT_TESTS),
    Mutation("lora-update-bound-exclusive", "restuning/methods/lora/model.py", "if not largest <= MAX_WEIGHT:",
             "if not largest < MAX_WEIGHT:", IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"),
             IMPORT_TESTS),
    Mutation("lora-update-from-each-factors-largest", "restuning/methods/lora/model.py", "float((up @ down).abs().max())",
             "float(up.abs().max() * down.abs().max())",
             IMPORTS.format("test_a_lora_whose_update_is_beyond_half_precision_is_refused"), IMPORT_TESTS),
    Mutation("lora-alpha-float-bound-exclusive", "restuning/methods/lora/config.py", "if self.alpha > sys.float_info.max:",
             "if self.alpha >= sys.float_info.max:",
             IMPORTS.format("test_a_lora_alpha_beyond_any_float_is_refused_by_its_config"), IMPORT_TESTS),
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
    for folder in ("restuning", "trainers", "webui", "tests", "scripts", "bench"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "app.py"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "assets").symlink_to(ROOT / "assets")  # the demo model and example concepts, only read: not copied


def _pytest(copy: Path, files: list[str]) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files],
                          cwd=copy, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, (lines[0] if lines else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:])


def run(mutations: list[Mutation], tests=None, record: list | None = None) -> list[str]:
    """Apply each mutation alone to a fresh copy; return the names of those no test caught.
    `tests`: the files every mutation runs against (default: each mutation's own class);
    `record`: a list that gets {"name", "caught", "seconds", "detail"} per mutation, the baseline first."""
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
        every = list(dict.fromkeys(f for m in mutations for f in (tests or m.tests)))
        ok, detail = _pytest(copy, every)
        if not ok:
            raise SystemExit(f"the unmutated code fails its own tests: {detail}")
        print(f"baseline: {len(every)} test files pass ({time.time() - started:.0f}s)", flush=True)
        if record is not None:
            record.append({"name": "baseline", "caught": None, "seconds": round(time.time() - started, 1), "detail": ", ".join(every)})
        for m in mutations:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            started = time.time()
            try:
                # alone first: pytest runs a file given beside one of its node ids in the file's order
                passed, detail = _pytest(copy, [m.first])
                rest = [t for t in (tests or m.tests) if t != m.first]
                if passed and rest:
                    passed, detail = _pytest(copy, rest)
            finally:
                target.write_text(original)
            verdict = "SURVIVED" if passed else "caught"
            print(f"{verdict:8} {m.name:34} {time.time() - started:5.0f}s  {'' if passed else detail}", flush=True)
            if record is not None:
                record.append({"name": m.name, "caught": not passed, "seconds": round(time.time() - started, 1),
                               "detail": "" if passed else detail})
            if passed:
                survivors.append(m.name)
    return survivors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--write", action="store_true", help=f"write the run to {RESULTS.relative_to(ROOT)}.{{json,md}}")
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
    record, load_before, started = [], os.getloadavg(), time.time()
    survivors = run(chosen, record=record)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations caught; survivors: {', '.join(survivors) or 'none'}")
    if args.write:
        write_results(record, time.time() - started, load_before, os.getloadavg())
    return 1 if survivors else 0


RESULTS = ROOT / "bench" / "results" / "mutations"


def write_results(record: list[dict], seconds: float, load_before, load_after) -> None:
    """The run as JSON and Markdown: each mutation's verdict and time, the whole run's time, and the
    machine's load average (1, 5, 15 min) at its start and end: a time taken while others used the
    machine says so."""
    import json

    result = {"date": time.strftime("%Y-%m-%d"), "seconds": round(seconds), "cpus": os.cpu_count(),
              "load_average_start": [round(x, 1) for x in load_before], "load_average_end": [round(x, 1) for x in load_after],
              "mutations": record}
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [r for r in record if r["name"] != "baseline"]
    caught = sum(bool(r["caught"]) for r in rows)
    lines = [(f"`python -m scripts.mutate --write`, {result['date']}: {caught} of {len(rows)} mutations caught, "
              f"{seconds / 60:.1f} min on {result['cpus']} CPUs (load average {load_before[0]:.1f} at the start, "
              f"{load_after[0]:.1f} at the end; above {result['cpus']} means other work shared the machine)."), "",
             "| mutation | verdict | seconds | first failure |", "|---|---|---:|---|"]
    lines += [f"| {r['name']} | {'-' if r['caught'] is None else 'caught' if r['caught'] else '**survived**'} | {r['seconds']:.0f} | "
              f"{r['detail'].replace('|', '/')} |" for r in record]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
