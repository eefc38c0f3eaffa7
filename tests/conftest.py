"""Shared fixtures: one private nats-server per test session, the tiny checkpoint, stacks."""

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.stack import ServeHf, Stack, serving
from triptych.runtime.nats_server import NatsServer


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """In-process torch runs on one thread in every test, whichever tests ran before: the tiny
    models gain nothing from more, the stacks' worker processes share the same cores, and no
    result depends on a thread count another test left behind."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server on a free loopback port, for the whole session."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Qwen2.5-VL checkpoint (generated once into .cache/)."""
    from triptych.models.tiny import default_model_path

    return default_model_path()


@pytest.fixture
def stack(nats_server: NatsServer, tmp_path: Path, tiny_model: Path) -> Iterator[Stack]:
    """An empty stack in a fresh namespace; every process it starts is stopped afterwards."""
    stack = Stack(nats_server.url, tmp_path)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def epd_stack(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Stack]:
    """One E/P/D stack on the mock engine, shared by a module's tests."""
    with serving(nats_server.url, tmp_path_factory.mktemp("epd"), "E/P/D") as stack:
        yield stack


@pytest.fixture(scope="module")
def guarded(
    nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    media_root: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    """An E/P/D stack whose frontend takes the module's ``MEDIA_LIMITS`` (flag: value),
    fetches media from ``localhost`` only (a test's own media server) and reads local files
    under the module's `media_root` only."""
    limits: dict[str, object] = request.module.MEDIA_LIMITS
    guards = ("--allowed-image-hosts", "localhost", "--allowed-local-media-path", str(media_root))
    frontend = (*(part for flag, value in limits.items() for part in (flag, str(value))), *guards)
    tmp = tmp_path_factory.mktemp("guarded")
    with serving(nats_server.url, tmp, "E/P/D", frontend_args=frontend) as stack:
        yield stack


@pytest.fixture(scope="module")
def serve_hf(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> ServeHf:
    """``serve_hf(topology, model_path=tiny, frontend_args=(), ready_timeout=300)``: a fresh
    stack of that topology on the hf engine, stopped when its ``with`` block ends."""

    def serve(
        topology: str,
        model_path: Path = tiny_model,
        frontend_args: tuple[str, ...] = (),
        ready_timeout: float = 300,
    ) -> AbstractContextManager[Stack]:
        return serving(
            nats_server.url,
            tmp_path_factory.mktemp("hf"),
            topology,
            engine="hf",
            model_path=str(model_path),
            frontend_args=frontend_args,
            ready_timeout=ready_timeout,
        )

    return serve
