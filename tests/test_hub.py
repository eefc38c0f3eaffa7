"""``--model-path org/name``: hub IDs resolved through huggingface_hub's cache, offline, each
process reading only the files it needs (the cache layouts here are written by the test)."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.stack import Stack, serving
from tests.test_correctness import ONE, Oracle, image_part, request
from triptych.models.checkpoint import CheckpointError, Needs, resolve_checkpoint
from triptych.runtime.nats_server import NatsServer

HUB_ID = "triptych-test/tiny-vl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LANGUAGE_SHARD = "model-00001-of-00002.safetensors"
VISION_SHARD = "model-00002-of-00002.safetensors"


def sharded(tiny_model: Path, out: Path) -> Path:
    """The tiny checkpoint with its weights in two shards: the language model's, the tower's."""
    out.mkdir(parents=True)
    for item in tiny_model.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as weights:
        tensors = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
    vision = {k: v for k, v in tensors.items() if k.startswith("visual.")}
    language = {k: v for k, v in tensors.items() if k not in vision}
    save_file(language, str(out / LANGUAGE_SHARD), metadata={"format": "pt"})
    save_file(vision, str(out / VISION_SHARD), metadata={"format": "pt"})
    weight_map = {k: LANGUAGE_SHARD for k in language} | {k: VISION_SHARD for k in vision}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def hf_home(root: Path, checkpoint: Path, keep: set[str] | None = None, ref: str = "main") -> Path:
    """An HF_HOME whose cache holds `checkpoint` as HUB_ID at `ref` (only the files in `keep`,
    when given), laid out as huggingface_hub writes it: blobs, snapshots, refs."""
    repo = root / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if keep is None or item.name in keep:
            blob = repo / "blobs" / f"blob-{item.name}"
            shutil.copy(item, blob)
            (snapshot / item.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(COMMIT)
    return root


CONFIGS = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    return sharded(tiny_model, tmp_path_factory.mktemp("sharded") / "tiny-vl")


def offline(home: Path) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub_stack(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[Stack]:
    """E/P/D on the hf engine from a hub ID. Each process has a cache of its own holding only
    what it may read: the frontend no weights, the encode worker the tower's shard alone."""
    tmp = tmp_path_factory.mktemp("hub")
    frontend = hf_home(tmp / "frontend", checkpoint, CONFIGS)
    encode = hf_home(tmp / "encode", checkpoint, CONFIGS | {VISION_SHARD})
    full = hf_home(tmp / "full", checkpoint)
    envs = {
        "encode": offline(encode),
        "prefill": offline(full),
        "decode": offline(full),
        "frontend": offline(frontend),
    }
    with serving(nats_server.url, tmp, "E/P/D", engine="hf", model_path=HUB_ID, envs=envs) as stack:
        yield stack


def test_a_hub_id_serves_under_its_own_name(hub_stack: Stack, tiny_model: Path) -> None:
    models = httpx.get(f"{hub_stack.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [HUB_ID]
    assert models[0]["root"] == HUB_ID
    messages = [{"role": "user", "content": [image_part(ONE), {"type": "text", "text": "What?"}]}]
    reply = httpx.post(
        f"{hub_stack.url}/v1/chat/completions",
        json={**request(messages), "model": HUB_ID},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == Oracle(tiny_model).tokens(messages)


def resolve(home: Path, model: str, revision: str | None, needs: str) -> str:
    """The directory resolve_checkpoint finds in a fresh process (huggingface_hub reads HF_HOME
    once, at import), or the one-line error it raises."""
    code = (
        "import sys\n"
        "from triptych.models.checkpoint import CheckpointError, Needs, resolve_checkpoint\n"
        "try:\n"
        "    print(resolve_checkpoint(sys.argv[1], sys.argv[2] or None, Needs(sys.argv[3])).path)\n"
        "except CheckpointError as error:\n"
        "    print('error:', error)\n"
    )
    env = {**os.environ, **offline(home)}
    done = subprocess.run(
        [sys.executable, "-c", code, model, revision or "", needs],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_each_process_needs_only_its_own_files(tmp_path: Path, checkpoint: Path) -> None:
    home = hf_home(tmp_path / "configs", checkpoint, CONFIGS | {VISION_SHARD})
    found = resolve(home, HUB_ID, None, "tokenizer")
    assert Path(found).name == COMMIT and (Path(found) / "config.json").is_file()
    assert resolve(home, HUB_ID, None, "vision") == found
    assert f"{LANGUAGE_SHARD} is missing" in resolve(home, HUB_ID, None, "weights")


def test_revisions_and_missing_models(tmp_path: Path, checkpoint: Path) -> None:
    home = hf_home(tmp_path / "tagged", checkpoint, ref="v1.0")
    assert Path(resolve(home, HUB_ID, "v1.0", "weights")).name == COMMIT
    untagged = resolve(home, HUB_ID, None, "weights")  # no "main" in this cache
    assert untagged.startswith("error:") and "not in the Hugging Face cache" in untagged
    assert "not in the Hugging Face cache" in resolve(home, "nobody/nothing", None, "tokenizer")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "dir"), None, Needs.TOKENIZER)


def test_a_local_directory_is_served_under_its_name(tiny_model: Path) -> None:
    found = resolve_checkpoint(str(tiny_model), None, Needs.WEIGHTS)
    assert (found.path, found.name, found.hub_id) == (str(tiny_model), tiny_model.name, None)
