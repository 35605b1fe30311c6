"""Tiny checkpoints of the three architectures load unchanged through the Auto classes."""

import json

import pytest
import torch
from PIL import Image

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.errors import ModelError
from mmrlsd.model.load import load_model

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_classes_load_and_run(arch, tiny_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_model(arch)
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == CLASSES[arch]
    tok = proc.tokenizer
    for t in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|endoftext|>",
    ):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = chat_text(proc, "how many red shapes?", 1)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>how many")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    enc = encode(proc, [text], [[Image.new("RGB", (56, 56), "red")]])
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    thw = enc["image_grid_thw"][0]
    merge = proc.image_processor.merge_size
    assert n_img == int(thw.prod()) // merge**2  # placeholders expanded to the merged patch count
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(out.logits).all()
    meta = json.loads((path / "mmrlsd_tiny.json").read_text())
    assert meta["arch"] == arch and meta["params"] == sum(p.numel() for p in model.parameters())


def test_load_model_errors(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="model directory not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="'llama' is not a supported vision-language model"):
        load_model(str(tmp_path / "llm"))
    model, proc = load_model(str(tiny_model("qwen2_5_vl")), max_pixels=56 * 56)
    assert proc.tokenizer.padding_side == "left" and proc.image_processor.size["longest_edge"] == 56 * 56
    import warnings

    from PIL import Image

    from mmrlsd.data.encoding import chat_text, encode

    with (
        warnings.catch_warnings()
    ):  # the budget is set through `size`, not the deprecated min/max_pixels kwargs
        warnings.simplefilter("error", FutureWarning)
        enc = encode(proc, [chat_text(proc, "hi", 1)], [[Image.new("RGB", (300, 200))]])
    assert (
        int(enc["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56
    )  # the 300x200 image was shrunk to the budget


def test_make_tiny_cli(tmp_path):
    from mmrlsd.cli import main

    assert main(["make-tiny", "--arch", "qwen2_vl", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
