"""Each launch script brings up a stack that answers, and SIGTERM stops every process."""

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import nats
import psutil
import pytest

from tests.stack import ROOT, SERVING

SCRIPTS = [("multimodal_disagg.sh", 4), ("multimodal_epd.sh", 3), ("agg.sh", 2), ("disagg.sh", 3)]


@pytest.mark.parametrize(("script", "components"), SCRIPTS)
def test_launch_script_serves_and_stops(
    script: str, components: int, tmp_path: Path, tiny_model: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    log = (tmp_path / "launch.log").open("wb")
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "launch" / script), "--engine", "mock", "--http-port", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        reply = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and launcher.poll() is None:
            serving = SERVING.search((tmp_path / "launch.log").read_text())
            if serving:  # the launcher says so only once /ready answers 200
                reply = httpx.post(
                    f"{serving[1]}/v1/chat/completions",
                    json={
                        "model": tiny_model.name,
                        "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                    timeout=30,
                )
                break
            time.sleep(0.2)
        assert reply is not None, (tmp_path / "launch.log").read_text()
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] == 5
        children = psutil.Process(launcher.pid).children(recursive=True)
        if script == "multimodal_disagg.sh":
            assert_private_nats_is_guarded(children, (tmp_path / "launch.log").read_text())
        assert sum("triptych.components" in " ".join(c.cmdline()) for c in children) == components
        assert any("nats-server" in " ".join(c.cmdline()) for c in children)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def assert_private_nats_is_guarded(children: list[psutil.Process], log: str) -> None:
    """The launcher's NATS wants the token it gave the components, which no log shows."""
    url = next(
        line.split(" at ")[1].split()[0]
        for line in log.splitlines()
        if "private nats-server" in line
    )
    worker = next(c for c in children if "triptych.components" in " ".join(c.cmdline()))
    token = worker.environ()["NATS_TOKEN"]
    assert len(token) >= 24 and token not in log

    async def connect(**auth: str) -> None:
        nc = await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False, **auth)
        await nc.close()

    with pytest.raises(Exception, match=r"(?i)authoriz"):
        asyncio.run(connect())
    asyncio.run(connect(token=token))
