"""Where a checkpoint lies: a local directory, or a Hugging Face Hub ID resolved into the cache.

``--model-path`` takes either. A hub ID (``org/name``, optionally at ``--revision``) is resolved
once per process through ``huggingface_hub``, which honours its cache and ``HF_HOME``,
``HF_TOKEN`` and ``HF_HUB_OFFLINE``. Each process fetches only what it reads: the frontend the
tokenizer, config and processor files; a language-model worker those plus the weights; an encode
worker the configs plus only the shards that hold the vision tower, where the checkpoint's
safetensors index says which those are.
"""

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
"""What a Hugging Face Hub model ID looks like (``Qwen/Qwen2.5-VL-7B-Instruct``)."""

VISION_PREFIXES = ("visual.", "model.visual.")
"""Where a VLM keeps its vision tower's weights (Qwen2-VL, Qwen2.5-VL)."""

INDEX_FILE = "model.safetensors.index.json"

_CONFIG_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""Configs, tokenizer and processor files: small, and what the frontend reads."""


class Needs(enum.Enum):
    """Which of a checkpoint's files a process reads."""

    TOKENIZER = "tokenizer"
    """Tokenizer, configs, chat template, image processor (the frontend)."""
    WEIGHTS = "weights"
    """Those plus every weight file (prefill, decode and aggregated workers)."""
    VISION = "vision"
    """Those plus the vision tower's weight files only (an encode worker)."""


class CheckpointError(Exception):
    """The checkpoint cannot be found or fetched; the message says why in one line."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved to a local directory."""

    path: str
    """The directory holding the files this process needs."""
    name: str
    """The name clients use by default: the hub ID, or the directory's name."""
    hub_id: str | None = None
    """The hub ID it came from (None for a local directory)."""


def is_hub_id(model: str) -> bool:
    """Whether `model` names a hub repository rather than an existing local directory."""
    return not Path(model).exists() and HUB_ID.fullmatch(model) is not None


def resolve_checkpoint(model: str, revision: str | None, needs: Needs) -> Checkpoint:
    """The local directory of `model` (a directory, or a hub ID fetched into the HF cache)."""
    if not is_hub_id(model):
        root = Path(model)
        if not (root / "config.json").is_file():
            raise CheckpointError(
                f"'{model}' is neither a checkpoint directory (with a config.json) nor a "
                "Hugging Face Hub ID (org/name)"
            )
        return Checkpoint(path=str(root), name=root.resolve().name)
    path = _fetch(model, revision, _CONFIG_FILES)
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"hub model '{model}' has no config.json")
    if needs is Needs.WEIGHTS:
        path = _fetch(model, revision, [*_CONFIG_FILES, "*.safetensors"])
        _check_weights(model, Path(path), None)
    elif needs is Needs.VISION:
        shards = vision_shards(Path(path))
        path = _fetch(model, revision, [*_CONFIG_FILES, *(shards or ["*.safetensors"])])
        _check_weights(model, Path(path), shards)
    return Checkpoint(path=path, name=model, hub_id=model)


def vision_shards(root: Path) -> list[str] | None:
    """The weight files that hold the vision tower, per the safetensors index (None without an
    index: then the single weight file holds everything)."""
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    return sorted({f for key, f in weight_map.items() if key.startswith(VISION_PREFIXES)})


def _fetch(model: str, revision: str | None, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision '{revision}'" if revision else ""
    try:
        return str(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(
            f"hub model '{model}' is gated: accept its terms on huggingface.co and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"hub model '{model}' has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"'{model}' is not a local directory, and the Hugging Face Hub has no model "
            f"'{model}' (or it is private: set HF_TOKEN)"
        ) from None
    except IncompleteSnapshotError as error:
        raise CheckpointError(
            f"hub model '{model}'{at}: {str(error).split(':', 1)[-1].strip()}"
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"hub model '{model}'{at} is not in the Hugging Face cache and cannot be downloaded "
            "(offline: HF_HUB_OFFLINE is set or the Hub is unreachable); download it first or "
            "give a local directory"
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"hub model '{model}'{at}: {error}".splitlines()[0]) from None


def _check_weights(model: str, root: Path, shards: list[str] | None) -> None:
    """Fail now, in one line, if weight files this process reads are missing (an offline
    cache that holds only part of the checkpoint)."""
    if shards is None and (root / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((root / INDEX_FILE).read_text())["weight_map"].values()))
    if shards is None:
        if not list(root.glob("*.safetensors")):
            raise CheckpointError(f"hub model '{model}' has no *.safetensors weights in {root}")
        return
    missing = [shard for shard in shards if not (root / shard).is_file()]
    if missing:
        raise CheckpointError(
            f"hub model '{model}': {missing[0]} is missing from {root} "
            "(an incomplete offline cache?)"
        )
