"""Upload checks: each bad input gets its own clear message; good ones get safe distinct names."""

import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import restuning
from restuning.arch import build_unet
from trainers.service.uploads import UploadError, check_images, check_name, check_tuner_file


def png(path, size=(64, 64), color="red", fmt="PNG"):
    Image.new("RGB", size, color).save(path, fmt)
    return path


def test_good_images_get_numbered_names_with_the_extension_of_their_content(tmp_path):
    (tmp_path / "x").mkdir()
    a = png(tmp_path / "dog.png")
    b = png(tmp_path / "x" / "dog.png", fmt="JPEG")  # same name, and a JPEG behind a .png name
    c = png(tmp_path / "my photo (1).webp", fmt="WEBP")
    checked = check_images([a, b, c])
    assert [name for _, name in checked] == ["00-dog.png", "01-dog.jpg", "02-my_photo_1.webp"]
    assert [p for p, _ in checked] == [a, b, c]


@pytest.mark.parametrize("files", [None, []])
def test_no_images(files):
    with pytest.raises(UploadError, match="no images"):
        check_images(files)


def test_too_many_files(tmp_path):
    files = [png(tmp_path / f"{i}.png") for i in range(4)]
    with pytest.raises(UploadError, match="at most 3 images"):
        check_images(files, max_files=3)


def test_each_bad_file_is_named_with_its_reason(tmp_path):
    good = png(tmp_path / "good.png")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    full = png(tmp_path / "full.png", size=(128, 128)).read_bytes()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(full[: len(full) // 2])
    tiny = png(tmp_path / "tiny.png", size=(16, 16))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP, a few kB on disk
    big = tmp_path / "big.png"
    Image.effect_noise((256, 256), 64).save(big)  # noise does not compress: about 65 kB
    windows = png(tmp_path / "C:\\Users\\me\\evil.png")
    with pytest.raises(UploadError) as err:
        check_images([good, text, truncated, tiny, bomb, big, windows], max_bytes=50_000)
    lines = str(err.value).splitlines()
    assert lines[0] == "6 of 7 files cannot be used:"
    by_file = {line.split(":")[0]: line for line in lines[1:]}
    assert "not an image" in by_file["notes.png"]
    assert "truncated" in by_file["cut.png"]
    assert "too small" in by_file["tiny.png"]
    assert "too large" in by_file["bomb.png"]
    assert "is over the 48.8 kB limit" in by_file["big.png"]
    assert any("path separator" in line and "evil.png" in line for line in lines)
    assert "good.png" not in by_file


@pytest.mark.parametrize("name", ["a/b", "..\\x", "..", ".hidden", "", "   ", "a\x00b", "x" * 500])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UploadError):
        check_name(name)


def test_plain_names_pass():
    assert check_name("  sks dog v2 ") == "sks dog v2"


@pytest.fixture
def tuner_file(tmp_path, tiny_unet):
    restuning.attach(tiny_unet, restuning.ResTuningConfig(dim=4))
    path = tmp_path / "tuner.safetensors"
    restuning.save(tiny_unet, path)
    restuning.detach(tiny_unet)
    return path


def test_a_tuner_for_the_base_model_is_accepted(tuner_file, tiny_unet):
    config, header = check_tuner_file(tuner_file, tiny_unet)
    assert config.method == "res-tuning" and config.dim == 4
    assert header["format"] == "restuning"


def test_a_tuner_for_another_architecture_is_refused(tuner_file):
    sd15 = build_unet("sd15", device="meta")
    with pytest.raises(UploadError, match="another U-Net.*cross_attention_dim"):
        check_tuner_file(tuner_file, sd15)


def test_pickles_and_foreign_files_are_refused_without_loading_them(tmp_path, tiny_unet):
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(UploadError, match="pickle"):
        check_tuner_file(pickled, tiny_unet)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UploadError, match="pickle"):
        check_tuner_file(raw, tiny_unet)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, certainly not safetensors")
    with pytest.raises(UploadError, match="not a safetensors file"):
        check_tuner_file(junk, tiny_unet)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.x": torch.zeros(2)}, lora)
    with pytest.raises(UploadError, match="not a restuning tuner file"):
        check_tuner_file(lora, tiny_unet)
    assert str(tmp_path) not in _message(lambda: check_tuner_file(junk, tiny_unet))


@pytest.mark.parametrize("low_bytes", [b"\x80\x02", b"PK"])
def test_a_safetensors_file_whose_header_length_reads_like_a_pickle_is_not_refused_as_one(tmp_path, low_bytes):
    """The 8-byte header length of a safetensors file may start with 0x80 or "PK" (pickle and zip
    magic); the check reads past it ("{") instead of refusing a genuine file."""
    from trainers.service.uploads import _check_file

    wanted = int.from_bytes(low_bytes + b"\x00" * (8 - len(low_bytes)), "little")
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"p": ""})
    start = max(0, wanted - int.from_bytes(path.read_bytes()[:8], "little") - 8)  # one character of metadata per byte
    for pad in range(start, wanted + 1):  # the metadata's length steers the header's (padded to 8 bytes)
        save_file({"w": torch.zeros(1)}, path, metadata={"p": "x" * pad})
        if path.read_bytes()[:8] == wanted.to_bytes(8, "little"):
            break
    assert path.read_bytes()[:len(low_bytes)] == low_bytes
    assert _check_file(path, 10**9) == "t.safetensors"
    forged = tmp_path / "forged.safetensors"  # the same opening bytes without a header after them
    forged.write_bytes(low_bytes + b"\x00" * 20)
    with pytest.raises(UploadError, match="pickle"):
        _check_file(forged, 10**9)


def _message(fn):
    try:
        fn()
    except UploadError as exc:
        return str(exc)
    raise AssertionError("no error")


def test_a_res_tuning_tuner_with_its_identifier_is_checked_with_the_base_model_s_tokenizer(tmp_path):
    """A tuner the studio trained (identifier rows in the text encoder) imports back: its rows are
    found with the base model's tokenizer; without one the check says why."""
    import copy

    import restuning
    from tests.tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    restuning.attach(pipe, restuning.ResTuningConfig(tuners={"ff": "adapter"}, dim=4, identifier="sks"))
    path = restuning.save(pipe, tmp_path / "with-identifier.safetensors")
    restuning.detach(pipe.unet)
    with torch.device("meta"):
        text_encoder = copy.deepcopy(pipe.text_encoder).to("meta")
    config, _ = check_tuner_file(path, pipe.unet, base_text_encoder=text_encoder, tokenizers={"tokenizer": pipe.tokenizer})
    assert config.identifier == "sks"
    with pytest.raises(UploadError, match="cannot be attached.*tokenizer"):
        check_tuner_file(path, pipe.unet, base_text_encoder=text_encoder)
