"""Model families: everything triptych knows per checkpoint ``model_type``, in one record each.

A family names its adapter (placeholders, token counts, resize rules), the transformers class
that loads the whole model, its vision tower's class, and the tower's modules whose forward
triptych replaces (packed window attention, the CUDA patch embedding, RMSNorm and gated MLP).
`family(model_type)` is the one lookup: a registered VLM family, or, for any other
``model_type``, a text-only family loaded as a causal language model. Asking a text-only family
for what only a VLM has (its tower) raises the one error that says which families have one.
"""

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from triptych.models.qwen2_vl import QwenVLAdapter

VisionModule = Literal["attention", "patch_embed", "rms_norm", "gated_mlp"]
"""A kind of tower module whose forward is replaced."""


@dataclass(frozen=True)
class TransformersClass:
    """A class of transformers, named and imported on first use (importing every family's
    modeling module would cost seconds at start-up)."""

    module: str
    name: str

    def load(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class VisionTowerSpec:
    """A VLM's vision tower: its class and the class names of the modules it is built from."""

    tower: TransformersClass
    modules: dict[VisionModule, tuple[str, ...]] = field(default_factory=dict)
    """Class names by kind; a kind absent here has no replaced forward in this family."""


@dataclass(frozen=True)
class ModelFamily:
    """What triptych knows about checkpoints of one ``model_type``."""

    model_type: str
    model_class: TransformersClass
    """The whole model, as the language-model engines load it."""
    adapter: type[QwenVLAdapter] | None = None
    """None: a text-only model (no images, no encode stage)."""
    vision: VisionTowerSpec | None = None

    def tower(self) -> VisionTowerSpec:
        """The vision tower; a text-only family has none."""
        if self.vision is None:
            known = ", ".join(sorted(FAMILIES))
            raise ValueError(
                f"model type '{self.model_type}' has no vision tower known to triptych "
                f"(families with one: {known})"
            )
        return self.vision


_QWEN2_5_VL = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
_QWEN2_VL = "transformers.models.qwen2_vl.modeling_qwen2_vl"

FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (
        ModelFamily(
            "qwen2_5_vl",
            TransformersClass(_QWEN2_5_VL, "Qwen2_5_VLForConditionalGeneration"),
            QwenVLAdapter,
            VisionTowerSpec(
                TransformersClass(_QWEN2_5_VL, "Qwen2_5_VisionTransformerPretrainedModel"),
                {
                    "attention": ("Qwen2_5_VLVisionAttention",),
                    "patch_embed": ("Qwen2_5_VisionPatchEmbed",),
                    "rms_norm": ("Qwen2_5_VLRMSNorm",),
                    "gated_mlp": ("Qwen2_5_VLMLP",),
                },
            ),
        ),
        ModelFamily(
            "qwen2_vl",
            TransformersClass(_QWEN2_VL, "Qwen2VLForConditionalGeneration"),
            QwenVLAdapter,
            VisionTowerSpec(
                TransformersClass(_QWEN2_VL, "Qwen2VisionTransformerPretrainedModel"),
                # LayerNorms and a plain MLP: only attention and patch embedding are replaced
                {"attention": ("VisionAttention",), "patch_embed": ("PatchEmbed",)},
            ),
        ),
    )
}
"""The VLM families, by ``model_type``."""

_CAUSAL_LM = TransformersClass("transformers", "AutoModelForCausalLM")


def family(model_type: str) -> ModelFamily:
    """The family of checkpoints of `model_type`: a registered VLM, else a text-only model."""
    return FAMILIES.get(model_type) or ModelFamily(model_type, _CAUSAL_LM)


def vision_module_names(kind: VisionModule) -> frozenset[str]:
    """The class names of `kind` across every family's tower (a tower is patched by walking
    its modules, which need not say which family they came from)."""
    return frozenset(
        name
        for spec in FAMILIES.values()
        if spec.vision is not None
        for name in spec.vision.modules.get(kind, ())
    )
