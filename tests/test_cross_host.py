"""E/P/D across two hosts: two network namespaces joined by a veth pair (192.0.2.0/24, a
documentation network), NATS on host A. Every process binds 0.0.0.0 and advertises its host's
address; UCX may use TCP only, as between real hosts (the namespaces share one kernel, where
shared memory would otherwise be taken). Two placements:

- encode + prefill on A, frontend + decode on B: image bytes cross B -> A, the KV cache A -> B;
- prefill on A, frontend + encode + decode on B: embeddings cross B -> A, the KV cache A -> B.

Either way the bootstrap room is joined across hosts and the tokens are transformers' own."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_correctness import IMAGE_CASES, TEXT_CASES, Oracle, image_part, request
from tests.test_deploy import noisy_png

HOST_A = "192.0.2.1"
HOST_B = "192.0.2.2"
ENCODE_METRICS_PORT = 9090


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Hosts:
    a: str
    b: str


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two namespaces with a veth pair between them; deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (the ip command) is not installed")
    tag = secrets.token_hex(3)
    a, b = f"tpt13-{tag}-a", f"tpt13-{tag}-b"
    created: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"t13{tag}a", "type", "veth", "peer", "name", f"t13{tag}b")
        for ns, dev, address in ((a, f"t13{tag}a", HOST_A), (b, f"t13{tag}b", HOST_B)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as error:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        reason = getattr(error, "stderr", "") or str(error)
        pytest.skip(f"cannot create network namespaces here: {reason.strip()}")
    try:
        yield Hosts(a, b)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys, time, urllib.request
    import nats

    base, nats_url, token, namespace = sys.argv[1:5]
    bodies = json.load(open(sys.argv[5]))

    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return reply.status, reply.read().decode()
        except Exception as error:
            return 0, repr(error)

    deadline = time.monotonic() + 240
    while get(base + "/ready")[0] != 200:
        if time.monotonic() > deadline:
            sys.exit("frontend not ready: " + get(base + "/ready")[1])
        time.sleep(0.5)
    tokens = []
    for body in bodies:
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as reply:
            tokens.append(json.load(reply)["choices"][0]["token_ids"])

    async def metadata():
        nc = await nats.connect(nats_url, token=token)
        found = {}
        for component in ("encode", "prefill", "decode"):
            reply = await nc.request(f"$SRV.INFO.{namespace}-{component}", b"", timeout=2)
            found[component] = json.loads(reply.data)["metadata"]
        await nc.close()
        return found

    meta = asyncio.run(metadata())
    encode = meta["encode"]
    status, text = get(f"http://{encode['host']}:{encode['metrics_port']}/metrics")
    wanted = 'triptych_transfer_bytes_total{kind="image",outcome="ok"}'
    image_bytes = sum(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith(wanted))
    print(json.dumps({"tokens": tokens, "metadata": meta, "image_bytes": image_bytes}))
    """
)


PLACEMENTS = {
    "encode_prefill__frontend_decode": {"encode": "a", "prefill": "a"},
    "prefill__frontend_encode_decode": {"encode": "b", "prefill": "a"},
}
"""Where encode and prefill run (NATS is on A; frontend and decode on B)."""


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_epd_across_two_hosts_is_token_exact(
    hosts: Hosts, tmp_path: Path, tiny_model: Path, placement: str
) -> None:
    where = {"frontend": "b", "decode": "b", **PLACEMENTS[placement]}
    netns = {"a": hosts.a, "b": hosts.b}
    address = {"a": HOST_A, "b": HOST_B}
    token = secrets.token_urlsafe(24)
    namespace = f"x{secrets.token_hex(4)}"
    nats_url = f"nats://{HOST_A}:4222"
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "{HOST_A}:4222"\nauthorization {{ token: "{token}" }}\n')
    venv_bin = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("NATS_URL", "POD_IP")},
        "NATS_URL": nats_url,
        "NATS_TOKEN": token,
        "TRIPTYCH_NAMESPACE": namespace,
        "UCX_TLS": "tcp",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
    }
    model = ("--engine", "hf", "--model-path", str(tiny_model), "--metrics-host", "0.0.0.0")
    plan = [
        ("nats", hosts.a, {}, ["nats-server", "-c", str(conf)]),
        (
            "encode",
            netns[where["encode"]],
            {},
            [
                *_component("encode_worker"),
                *model,
                "--advertise-host",
                address[where["encode"]],
                "--metrics-port",
                str(ENCODE_METRICS_PORT),
            ],
        ),
        (
            "prefill",
            netns[where["prefill"]],
            {"POD_IP": address[where["prefill"]]},
            [
                *_component("prefill_worker"),
                *model,
                "--dedicated-mm-encoder",
                "--disaggregation-bootstrap-host",
                "0.0.0.0",
            ],
        ),
        (
            "decode",
            hosts.b,
            {"POD_IP": HOST_B},
            [
                *_component("decode_worker"),
                *model,
                "--disaggregation-mode",
                "decode",
                "--dedicated-mm-encoder",
            ],
        ),
        (
            "frontend",
            hosts.b,
            {"POD_IP": HOST_B},
            [
                *_component("frontend"),
                "--model-path",
                str(tiny_model),
                "--topology",
                "E/P/D",
                "--http-host",
                "0.0.0.0",
                "--http-port",
                "8000",
            ],
        ),
    ]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name, *_ in plan}
    big = noisy_png(320, 320)  # over the frontend's inline budget: its bytes cross by NIXL
    assert len(big) > 256 * 1024
    cases = [
        TEXT_CASES[0],
        IMAGE_CASES[0],
        [{"role": "user", "content": [image_part(big), {"type": "text", "text": "And this?"}]}],
    ]
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{**request(case), "model": tiny_model.name} for case in cases]))
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    try:
        for name, ns, extra, argv in plan:
            processes[name] = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                env={**env, **extra},
                stdout=logs[name].open("wb"),
                stderr=subprocess.STDOUT,
            )
        asked = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                hosts.b,
                sys.executable,
                str(client),
                f"http://{HOST_B}:8000",
                nats_url,
                token,
                namespace,
                str(bodies),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        every_log = "\n".join(
            f"--- {n}\n{p.read_text(errors='replace')[-2500:]}" for n, p in logs.items()
        )
        assert asked.returncode == 0, asked.stderr + every_log
        result = json.loads(asked.stdout.strip().splitlines()[-1])
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    oracle = Oracle(tiny_model)
    assert result["tokens"] == [oracle.tokens(case) for case in cases]
    # What each process handed to the others is its host's address, never 0.0.0.0.
    for component in ("encode", "prefill", "decode"):
        assert result["metadata"][component]["host"] == address[where[component]], component
    # The large image's bytes moved by NIXL (and encode's advertised status port answered).
    assert result["image_bytes"] >= len(big)
    # Prefill read the embeddings and decode the KV cache over NIXL.
    assert "embeddings" in logs["prefill"].read_text() and "read in" in logs["prefill"].read_text()
    assert sum(
        "KV cache" in line and "read in" in line for line in logs["decode"].read_text().splitlines()
    ) == len(cases)


def _component(module: str) -> list[str]:
    return [sys.executable, "-m", f"triptych.components.{module}"]
