"""Model families: what triptych knows per ``model_type`` (`family`), their adapters, and the tiny
test checkpoint."""

if __name__ != "triptych.models":  # the folder is reached only through the package
    raise ImportError(f"import triptych.models, not {__name__} (docs/architecture.md)")

import json
from pathlib import Path

from triptych.models.base import ImageLayout, ModelAdapter, VideoLayout
from triptych.models.family import FAMILIES, ModelFamily, family
from triptych.models.qwen2_vl import QwenVLAdapter


def load_adapter(model_path: str | Path) -> ModelAdapter | None:
    """The adapter for a checkpoint directory; None for a text-only model."""
    root = Path(model_path)
    config = json.loads((root / "config.json").read_text())
    adapter = family(str(config.get("model_type"))).adapter
    if adapter is None:
        return None
    preprocessor_file = root / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_file.read_text()) if preprocessor_file.exists() else {}
    video_file = root / "video_preprocessor_config.json"
    video = json.loads(video_file.read_text()) if video_file.exists() else None
    return adapter(config, preprocessor, video)


__all__ = [
    "FAMILIES",
    "ImageLayout",
    "ModelAdapter",
    "ModelFamily",
    "QwenVLAdapter",
    "VideoLayout",
    "family",
    "load_adapter",
]
