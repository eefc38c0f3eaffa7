"""Shared fixtures: one private nats-server per test session, the tiny checkpoint, stacks."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, start_topology
from triptych.runtime.nats_server import NatsServer


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
    stack = Stack(nats_server.url, tmp_path_factory.mktemp("epd"))
    try:
        yield start_topology(stack, "E/P/D")
    finally:
        stack.stop()
