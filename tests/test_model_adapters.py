"""Model adapters: image token counts and placeholder expansion, both prompt patterns."""

import pytest

from triptych.models.base import ImageLayout, ModelAdapter
from triptych.models.qwen2_vl import QwenVLAdapter, smart_resize


class Framed(ModelAdapter):
    """An InternVL-like family: the template emits <image> (7); the prompt needs
    <img> (5) + <ctx> (9) x N + </img> (6)."""

    image_token_id = 9
    placeholder_token_id = 7
    image_start_token_id = 5
    image_end_token_id = 6
    template_frames_images = False

    def image_layout(self, height: int, width: int) -> ImageLayout:
        return ImageLayout(grid_thw=(1, 1, 1), num_tokens=3, resized=(height, width))


def test_framed_runs_get_their_start_and_end_tokens() -> None:
    adapter = Framed()
    layout = adapter.image_layout(10, 10)
    expanded, offsets = adapter.expand_placeholders([1, 7, 2, 7], [layout, layout])
    assert expanded == [1, 5, 9, 9, 9, 6, 2, 5, 9, 9, 9, 6]
    assert offsets == [2, 8]


def test_qwen_runs_are_framed_by_the_template() -> None:
    adapter = QwenVLAdapter(
        {"image_token_id": 4, "vision_start_token_id": 3, "vision_end_token_id": 5}, {}
    )
    layout = adapter.image_layout(56, 84)
    assert layout.num_tokens == 6 and layout.grid_thw == (1, 4, 6)
    expanded, offsets = adapter.expand_placeholders([1, 3, 4, 5, 2], [layout])
    assert expanded == [1, 3, 4, 4, 4, 4, 4, 4, 5, 2]
    assert offsets == [2]
    with pytest.raises(ValueError, match="2 images"):
        adapter.expand_placeholders([1, 3, 4, 5], [layout, layout])


@pytest.mark.parametrize(
    ("height", "width", "tokens"), [(448, 448, 256), (380, 570, 280), (10, 10, 4), (56, 56, 4)]
)
def test_token_counts_follow_smart_resize(height: int, width: int, tokens: int) -> None:
    h, w = smart_resize(height, width, 28, 3136, 12845056)
    assert h * w // 784 == tokens


def test_one_family_record_names_everything_a_vlm_needs() -> None:
    """Adapter, whole-model class, tower class and replaced tower modules come from one
    record per ``model_type``, and each named class exists in transformers."""
    import importlib

    from triptych.models import FAMILIES, family
    from triptych.models.family import vision_module_names

    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        vlm = family(model_type)
        assert vlm.adapter is QwenVLAdapter
        tower = vlm.tower()
        assert tower.tower.load().__name__ == tower.tower.name
        assert vlm.model_class.load().__name__ == vlm.model_class.name
        modeling = importlib.import_module(tower.tower.module)
        for names in tower.modules.values():
            assert all(hasattr(modeling, name) for name in names)
    assert set(FAMILIES) == {"qwen2_vl", "qwen2_5_vl"}
    assert vision_module_names("attention") == {"Qwen2_5_VLVisionAttention", "VisionAttention"}
    assert vision_module_names("gated_mlp") == {"Qwen2_5_VLMLP"}


def test_other_model_types_are_text_only_and_say_so_when_asked_for_a_tower() -> None:
    from triptych.models import family

    text = family("llama")
    assert text.adapter is None and text.model_class.name == "AutoModelForCausalLM"
    with pytest.raises(ValueError, match=r"model type 'llama' has no vision tower.*qwen2_5_vl"):
        text.tower()
