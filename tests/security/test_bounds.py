"""Resources have upper bounds (issue 13, items 4 and 10): sizes that would take the machine down,
seeds that crash later and infinite guidance are refused by the same checks the form, the API
and the command line go through."""

import pytest

from tests.test_webui import config as form_config
from trainers.options import OptionError, parse

BASE = ["--instance_data_dir", "imgs", "--instance_prompt", "a sks star"]


@pytest.mark.parametrize("flags, message", [
    (["--train_batch_size", "1000000"], "--train_batch_size is at most 64"),
    (["--resolution", "65536"], "--resolution must be a multiple of 8 and at least 64, at most 2048"),
    (["--num_validation_images", "100000"], "--num_validation_images is at most 16"),
    (["--num_class_images", "10000000"], "--num_class_images is at most"),
    (["--gradient_accumulation_steps", "100000"], "--gradient_accumulation_steps is at most"),
    (["--num_inference_steps", "100000"], "--num_inference_steps is at most"),
    (["--dim", "3000000"], "--dim is at most 4096"),
    (["--method", "lora", "--rank", "3000000"], "--rank is at most 4096"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
    (["--seed", str(2**40)], "--seed must be a whole number from 0"),
    (["--guidance_scale", "inf"], "--guidance_scale must be a finite number"),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
])
def test_the_command_line_refuses_sizes_beyond_any_machine(flags, message, tmp_path):
    with pytest.raises(OptionError, match=message):
        parse(BASE + ["--output_dir", str(tmp_path / "run"), *flags])


@pytest.mark.parametrize("changes, message", [
    ({"train_batch_size": 1e6}, "train_batch_size"),
    ({"resolution": 65536}, "resolution"),
    ({"num_validation_images": 1e5}, "num_validation_images"),
    ({"m_dim": 3e6}, "dim"),
    ({"seed": -1}, "seed"),
])
def test_the_form_refuses_them_too(changes, message):
    with pytest.raises(OptionError, match=message):
        form_config(**changes)


def test_an_output_dir_that_cannot_be_a_folder_is_a_message_not_a_traceback(tmp_path, capsys):
    from trainers import dreambooth

    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "run"):
        with pytest.raises(OptionError, match="--output_dir"):
            parse(BASE + ["--output_dir", str(out)])
        assert dreambooth.main(BASE + ["--output_dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"--output_dir {out}" in err
    assert taken.read_text() == "a file"
