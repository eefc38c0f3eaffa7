"""The tiny random Qwen2.5-VL checkpoint loads and runs through the real transformers code paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
)

from triptych.models import tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.generate_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Any:
    loaded: Any = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    m, info = loaded
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return m.eval()


def _tokenizer(ckpt: Path) -> Any:
    return AutoTokenizer.from_pretrained(ckpt)


def _image_inputs(ckpt: Path, text: str = "Describe this.") -> dict[str, torch.Tensor]:
    tok = _tokenizer(ckpt)
    auto_processor: Any = AutoImageProcessor  # transformers leaves from_pretrained untyped
    proc = auto_processor.from_pretrained(ckpt)
    pixels = proc(images=[Image.new("RGB", (84, 56), (200, 40, 90))], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6]]  # 56x84 px -> 4x6 patches of 14 px
    n_pads = int(grid.prod()) // 4  # 2x2 spatial merge
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_pads)
    enc = tok(prompt, return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc.input_ids == image_id).sum()) == n_pads
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": grid,
        "mm_token_type_ids": (enc.input_ids == image_id).int(),  # 5.23 needs this for 3D M-RoPE
    }


def test_files_and_config(ckpt: Path) -> None:
    names = {p.name for p in ckpt.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
        ".complete",
    ):
        assert name in names
    assert tiny.is_complete(ckpt, seed=0) and not tiny.is_complete(ckpt, seed=1)
    cfg = AutoConfig.from_pretrained(ckpt)
    tok = _tokenizer(ckpt)
    text = cfg.text_config
    assert cfg.model_type == "qwen2_5_vl" and text.vocab_size == len(tok)
    assert (
        sum(text.rope_parameters["mrope_section"])
        == text.hidden_size // text.num_attention_heads // 2
    )
    assert cfg.vision_config.out_hidden_size == text.hidden_size
    ids = tok.convert_tokens_to_ids
    assert cfg.image_token_id == ids("<|image_pad|>") and cfg.video_token_id == ids("<|video_pad|>")
    assert cfg.vision_start_token_id == ids("<|vision_start|>")
    assert cfg.vision_end_token_id == ids("<|vision_end|>")


def test_tokenizer_is_fast_and_round_trips(ckpt: Path) -> None:
    tok = _tokenizer(ckpt)
    assert tok.is_fast
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 1500 <= len(tok) <= 2000
    for text in [
        "Hello world!\n  two  spaces\tand a tab\n\n",
        " leading",
        "trailing  \n",
        "x=1;\r\n",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    for special in tiny.SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert len(set(tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)))) == 8


def test_chat_template(ckpt: Path) -> None:
    tok = _tokenizer(ckpt)
    plain = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert plain == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    parts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    rendered = tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_forward_with_image(ckpt: Path, model: Any) -> None:
    inputs = _image_inputs(ckpt)
    with torch.no_grad():
        merged = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        out = model(**inputs)
    assert merged.pooler_output.shape == (6, model.config.text_config.hidden_size)
    assert out.logits.shape == (
        1,
        inputs["input_ids"].shape[1],
        len(_tokenizer(ckpt)),
    )
    assert torch.isfinite(out.logits).all()


def test_greedy_generate_is_deterministic_and_varied(ckpt: Path, model: Any) -> None:
    tok = _tokenizer(ckpt)
    prompt = tok("The red cat sees", return_tensors="pt")
    runs = [model.generate(**prompt, max_new_tokens=30, do_sample=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    new = runs[0][0, prompt.input_ids.shape[1] :].tolist()
    assert len(new) == 30 and len(set(new)) >= 5
    inputs = _image_inputs(ckpt)
    with_image = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    assert len(set(with_image[0, inputs["input_ids"].shape[1] :].tolist())) >= 5


def test_same_seed_same_weights(tmp_path: Path, ckpt: Path) -> None:
    again = load_file(tiny.generate_checkpoint(tmp_path / "again", seed=0) / "model.safetensors")
    first = load_file(ckpt / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (
        ckpt / "tokenizer.json"
    ).read_bytes()
    other = load_file(tiny.generate_checkpoint(tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_default_model_path_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIPTYCH_CACHE_DIR", str(tmp_path))
    path = tiny.default_model_path()
    assert path == tmp_path / "tiny-qwen2.5-vl" and tiny.is_complete(path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_cli_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tiny.main(["--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert tiny.main(["--out", str(tmp_path / "new"), "--seed", "3"]) == 0
    assert tiny.is_complete(tmp_path / "new", seed=3)
