"""Hostile text is text (issue 13, items 6-7): prompts, names and tuner headers are shown escaped,
and the model card quotes the prompt so that its code runs and its Markdown holds."""

import ast
import json
import re
from types import SimpleNamespace

from tests.test_jobs import make_runner, wait_for
from trainers.artifacts import write_model_card
from webui import runs_tab

HOSTILE = 'a sks star\n```\n# pwned\n![x](https://evil.example/p.png) <img src=x onerror=alert(1)> """ \'\'\' ``` `'


def test_a_prompt_shows_as_text_in_the_runs_details(tmp_path, images):
    runner = make_runner(tmp_path / "runs")
    run_id = runner.submit({"max_train_steps": 1, "instance_prompt": HOSTILE, "method": "<b>lora</b>"}, images, group="g<i>")
    shown = runs_tab._details(wait_for(runner, run_id, {"done"}))
    assert "<img" not in shown and "<b>lora" not in shown and "<i>" not in shown
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown
    # shown as HTML, not Markdown: the image link is characters on the page, never fetched
    assert "![x](https://evil.example/p.png)" in shown


def card(tmp_path, prompt, kinds=("tuner", "lora-diffusers", "unet")):
    args = SimpleNamespace(pretrained_model_name_or_path='stable-diffusion-v1-5/"sd"', instance_prompt=prompt,
                           with_prior_preservation=False, validation_prompt=[prompt], seed=0, resolution=64)
    options = SimpleNamespace(args=args, method_config=SimpleNamespace(to_json=lambda: "{}"))
    method = SimpleNamespace(name="lora", label="LoRA", summary="low-rank.")
    written = [(kind, tmp_path / f"weights ``` {kind}.safetensors") for kind in kinds]
    path = write_model_card(tmp_path, options, method, SimpleNamespace(kind="hub", family="sd1"), 10, [], written)
    return path.read_text(encoding="utf-8")


def test_the_model_card_quotes_the_prompt_in_its_code_and_fences_it_safely(tmp_path):
    text = card(tmp_path, HOSTILE)
    blocks = re.findall(r"^(`{3,})python\n(.*?)^\1$", text, flags=re.S | re.M)
    assert len(blocks) == 3, "each code block ends where it should, not at the prompt's backticks"
    for _, code in blocks:
        tree = ast.parse(code)  # a quote in the prompt no longer breaks the snippet
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert HOSTILE in strings and 'stable-diffusion-v1-5/"sd"' in strings
    outside = re.sub(r"^(`{3,})python\n.*?^\1$", "", text, flags=re.S | re.M)
    assert not re.search(r"^(`{3}|# pwned|!\[x\])", outside, flags=re.M), "the prompt added no Markdown of its own"
    header = text.split("---")[1]
    assert json.loads(re.search(r"^instance_prompt: (.*)$", header, flags=re.M).group(1)) == HOSTILE
