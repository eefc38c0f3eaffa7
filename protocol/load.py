"""A stage instance's load, as it announces it in its NATS micro metadata.

NATS micro metadata is a flat map of strings; every figure travels under a ``load_`` key, so
``nats micro info`` shows them and a planner reads them from the discovery pings it already
gets every second.
"""

from pydantic import BaseModel, Field, ValidationError

WORK_KINDS = ("encode", "prefill", "decode")
"""What a model thread spends its time on."""
UNITS = ("images", "prompt_tokens", "output_tokens", "requests")
"""What a stage counts."""
PREFIX = "load_"


class StageLoad(BaseModel):
    """Utilisation of one instance over the last `window_s` seconds."""

    queue_depth: int = Field(default=0, ge=0)
    """Requests waiting for the model (not yet running on it)."""
    busy_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of the window the model thread was busy."""
    busy_by_work: dict[str, float] = Field(default_factory=dict)
    """The same share split by kind of work (`WORK_KINDS`): on an aggregated worker it says
    what encoding, prefill and decode each cost."""
    images_per_s: float = Field(default=0.0, ge=0.0)
    prompt_tokens_per_s: float = Field(default=0.0, ge=0.0)
    """Prompt tokens prefilled per second (image tokens included)."""
    output_tokens_per_s: float = Field(default=0.0, ge=0.0)
    """Tokens decoded per second."""
    requests_per_s: float = Field(default=0.0, ge=0.0)
    """Requests this instance finished per second."""
    host_s_per_image: float = Field(default=0.0, ge=0.0)
    """Host seconds an encoder spent per image it encoded (decoding, resizing, patching, the
    forward's layouts), off the model thread but serial with its forwards in this process."""
    window_s: float = Field(default=0.0, ge=0.0)

    def to_metadata(self) -> dict[str, str]:
        """The ``load_*`` metadata entries."""
        entries = {
            "queue_depth": str(self.queue_depth),
            "busy_fraction": f"{self.busy_fraction:.4f}",
            "images_per_s": f"{self.images_per_s:.3f}",
            "prompt_tokens_per_s": f"{self.prompt_tokens_per_s:.1f}",
            "output_tokens_per_s": f"{self.output_tokens_per_s:.1f}",
            "requests_per_s": f"{self.requests_per_s:.3f}",
            "host_s_per_image": f"{self.host_s_per_image:.5f}",
            "window_s": f"{self.window_s:.1f}",
        }
        entries.update(
            {f"busy_{kind}": f"{share:.4f}" for kind, share in self.busy_by_work.items()}
        )
        return {PREFIX + key: value for key, value in entries.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "StageLoad | None":
        """Read the ``load_*`` entries back; None when the instance announces none."""
        entries = {k[len(PREFIX) :]: v for k, v in metadata.items() if k.startswith(PREFIX)}
        if "busy_fraction" not in entries:
            return None
        busy = {k[len("busy_") :]: v for k, v in entries.items() if k.startswith("busy_")}
        busy.pop("fraction", None)
        try:
            return cls.model_validate(
                {
                    **{k: v for k, v in entries.items() if not k.startswith("busy_")},
                    "busy_fraction": entries["busy_fraction"],
                    "busy_by_work": {k: float(v) for k, v in busy.items()},
                }
            )
        except (ValidationError, ValueError):
            return None
