"""Issue 26, item 9: the form refuses what the trainer would, before anything is queued, with the
trainer's own check; no traceback or server path reaches a visitor; and each message the issue
lists says what is true. Issue 39, item 11: messages reach API clients as plain text, and say
nothing of which run ids exist."""

import json

import pytest

from tests.test_jobs import make_runner, wait_for
from tests.test_webui import config as form_config
from trainers import dreambooth
from trainers.service import jobs
from trainers.options import OptionError
from trainers.service.uploads import UploadError, lora_as_tuner_file
from webui import live, runs_tab
from webui.model import describe
from webui.train_tab import memory_line, queue_runs


@pytest.mark.parametrize("method, options, message", [
    ("bypass", {"m_depth": 100}, "bypass depth 100: this U-Net has only 3 up blocks"),
    ("lora", {"m_targets": "nothing_here"}, "no layers named nothing_here"),
    ("res-tuning", {"m_tuners": "attn1=adapter,attn1=prefix"}, "attn1 is given twice"),
    ("res-tuning", {"m_dim": 2.5}, "Tuner size must be a whole number; got 2.5"),
])
def test_the_form_refuses_what_the_trainer_would_before_anything_is_queued(method, options, message, tmp_path):
    with pytest.raises(OptionError, match=message):
        form_config(method=method, **options)
    runner = make_runner(tmp_path / "runs")
    if method in ("bypass", "lora"):  # and the estimate line says why, instead of Gradio's bare "Error"
        line = memory_line(runner, describe(None).source, method, {"resolution": 64},
                           {k[2:]: v for k, v in options.items()})
        assert "do not fit this base model" in line
    assert runner.run_ids() == []


def test_a_comparison_over_the_visitors_limit_says_so(tmp_path, images):
    runner = make_runner(tmp_path / "runs", max_active_per_owner=2)
    configs = [(m, {"method": m, "max_train_steps": 2}) for m in ("res-tuning", "bypass", "lora", "adapter", "prefix",
                                                                    "prompt", "full")]
    with pytest.raises(jobs.JobError) as refused:
        queue_runs(runner, configs, images, "f" * 64)
    assert "7 runs at once are more than the 2 a visitor may have queued or running" in str(refused.value)
    assert "you have 0 run(s)" not in str(refused.value) and runner.run_ids() == []


def test_no_traceback_and_no_server_path_reaches_a_visitor(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 2}, images)
    info = wait_for(runner, run_id, {"done"})
    with open(info.dir / "train.log", "a") as log:
        log.write("Traceback (most recent call last):\n"
                  f'  File "{jobs.REPO_ROOT}/trainers/dreambooth.py", line 400, in train\n'
                  "    secret_code_line()\n"
                  f"ValueError: cannot read {info.dir}/instance/a.png nor /home/operator/.cache/x.bin\n"
                  "a line after it\n")
    info = runner.info(run_id)
    shown = live.log_text(info) + runs_tab._details(info) + "\n".join(jobs.log_tail(info.dir))
    for leak in ("Traceback", "secret_code_line", 'File "', str(jobs.REPO_ROOT), str(info.dir), "/home/operator"):
        assert leak not in shown, leak
    assert "ValueError: cannot read instance/a.png nor x.bin" in shown and "a line after it" in shown


def test_cancelling_before_a_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    from tests.test_trainer import argv, build_tiny, make_images
    from trainers.events import read_events

    model, images, out = build_tiny(tmp_path / "tiny"), make_images(tmp_path / "images"), tmp_path / "run"

    class Stopped(dreambooth.StopFlag):
        def agreed(self, accelerator=None):
            return True  # SIGTERM arrived while loading

    real = dreambooth.StopFlag
    dreambooth.StopFlag = Stopped
    try:
        assert dreambooth.main(argv(model, images, out, "--max_train_steps", 5)) == 0
    finally:
        dreambooth.StopFlag = real
    final = read_events(out)[-1]
    assert final["phase"] == "cancelled" and "nothing to resume" in final["message"], final
    assert "resume with" not in final["message"]


def crafted_lora(tmp_path, name, tensors, metadata=None):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_crafted_lora_files_get_a_message(tmp_path, tiny_unet):
    import torch

    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    layer = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = [
        crafted_lora(tmp_path, "no-r.safetensors", {f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up},
                     {"unet.lora_adapter_metadata": json.dumps({"lora_alpha": 4})}),
        crafted_lora(tmp_path, "odd-alpha.safetensors",
                     {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                      "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
                      "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.zeros(3)}),
        crafted_lora(tmp_path, "flat.safetensors", {f"{layer}.lora_A.weight": torch.zeros(2), f"{layer}.lora_B.weight": torch.zeros(2)}),
    ]
    for path in cases:
        with pytest.raises(UploadError, match=path.name):
            lora_as_tuner_file(path, tiny_unet, None, workdir=tmp_path)


def raised_message(fn) -> str:
    """The message a handler wrapped in webui.errors.friendly sends (to the page and API clients alike)."""
    import gradio as gr
    from gradio.utils import error_payload

    from webui.errors import friendly

    with pytest.raises(gr.Error) as raised:
        friendly(fn)()
    return error_payload(raised.value, False)["error"]


def test_an_api_client_reads_a_message_as_plain_text():
    """Issue 39, item 11: no `studio&#x27;s`, no `<br>`; what a browser would take for markup
    (a crafted file name) is all that is escaped."""
    def refuse(message):
        def handler():
            raise jobs.JobError(message)
        return handler

    plain = "the studio's queue is full: 8 runs are queued or running\na run -> 2 < 3 & \"quoted\"; R&D 100%"
    assert raised_message(refuse(plain)) == plain
    crafted = "x<img src=//example.com/a>.safetensors: not a safetensors file\n&amp;</b><!-- &#60; &copy &lt"
    assert raised_message(refuse(crafted)) == ("x&lt;img src=//example.com/a>.safetensors: not a safetensors file\n"
                                               "&amp;amp;&lt;/b>&lt;!-- &amp;#60; &amp;copy &amp;lt")


def test_another_visitors_run_and_a_run_that_does_not_exist_read_the_same(tmp_path):
    """Issue 39, item 11: the message for a run a visitor may not see, and for the same id once no
    run has it, are one and the same and name no server path: an id cannot be probed."""
    import torch
    from safetensors.torch import save_file

    from webui import visitors

    runner = make_runner(tmp_path / "runs", max_active_per_owner=2, unguessable_ids=True)
    alice, bob = "a" * 64, "b" * 64
    tuner = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(1)}, str(tuner))
    run_id = runner.import_tuner(tuner, {"method": "lora"}, owner=alice)
    hidden = raised_message(lambda: visitors.seen(runner, run_id, bob))
    runner.delete(run_id)
    for who in (bob, alice):
        assert raised_message(lambda: visitors.seen(runner, run_id, who)) == hidden
    assert hidden == f"no run {run_id!r}" and "/" not in hidden
