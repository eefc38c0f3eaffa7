"""Several frontend processes on one port (``--frontend-processes``): connections spread over
them, ``/metrics`` and ``/ready`` speak for the group, a dead follower is replaced, and SIGTERM
to the leader stops them all."""

import json
import signal
import subprocess
from pathlib import Path

import httpx
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import Process, Stack, start_topology
from tests.test_faults import body, wait_until
from tests.test_metrics import scrape
from triptych.components.frontend.group import Group
from triptych.observability.metrics import merge

GROUP = ("--frontend-processes", "2")


def chat_requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "triptych_frontend_requests_total" and "chat" in dict(labels)["endpoint"]
    )


def group_dir(leader: psutil.Process) -> Path:
    follower = leader.children()[0]
    command = follower.cmdline()
    return Path(command[command.index("--frontend-group") + 1])


def own_metrics_ports(directory: Path) -> dict[int, int]:
    return {
        int(path.stem): json.loads(path.read_text())["metrics"] for path in directory.glob("*.json")
    }


def start_group(stack: Stack) -> tuple[Process, psutil.Process, Path]:
    """E/P/D behind a group of two frontend processes: the frontend as started, its leader
    process and the group's directory."""
    start_topology(stack, "E/P/D", frontend_args=GROUP)
    frontend = stack.processes[-1]
    leader = psutil.Process(frontend.popen.pid)
    return frontend, leader, group_dir(leader)


def test_a_group_shares_the_port_and_speaks_as_one(stack: Stack) -> None:
    _, leader, directory = start_group(stack)
    ready = httpx.get(f"{stack.url}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["frontend_processes"] == 2
    members = own_metrics_ports(directory)
    assert set(members) == {leader.pid, leader.children()[0].pid}

    sent = 24
    for _ in range(sent):  # a connection each: the kernel picks a process for each
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            reply = client.post("/v1/chat/completions", json=body(4, stream=False))
            assert reply.status_code == 200

    each = [chat_requests(scrape(f"http://127.0.0.1:{port}/metrics")) for port in members.values()]
    assert sum(each) == sent
    assert all(count > 0 for count in each), each  # all on one: 2 in 2**23
    for _ in range(4):  # a connection each: whichever process answers, the group's sum
        assert chat_requests(scrape(f"{stack.url}/metrics")) == sent


def test_a_second_group_is_refused_the_port_a_group_holds(stack: Stack) -> None:
    """SO_REUSEPORT would let it share the port silently: its leader checks first."""
    start_topology(stack, "E/P/D", frontend_args=GROUP)
    command = stack.command("frontend", "--topology", "E/P/D", *GROUP)
    command += ["--http-port", str(stack.http_port)]
    env = stack.env()
    second = subprocess.run(command, check=False, env=env, capture_output=True, timeout=120)
    assert second.returncode == 1
    assert f"port {stack.http_port} on 127.0.0.1 is already in use" in second.stderr.decode()


def test_a_dead_follower_is_replaced_and_sigterm_stops_the_group(stack: Stack) -> None:
    frontend, leader, directory = start_group(stack)
    first = leader.children()[0]
    first.kill()
    first.wait(10)

    def replaced() -> bool:
        children = [c for c in leader.children() if c.pid != first.pid]
        return bool(children) and set(own_metrics_ports(directory)) == {
            leader.pid,
            children[0].pid,
        }

    wait_until(replaced, 120)
    wait_until(lambda: httpx.get(f"{stack.url}/ready", timeout=10).status_code == 200, 60)
    second = leader.children()[0]
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body(4, stream=False), timeout=30)
    assert reply.status_code == 200

    frontend.popen.send_signal(signal.SIGTERM)
    assert frontend.popen.wait(60) == 0
    second.wait(10)  # gone with its leader
    assert not directory.exists()


def test_a_follower_stops_when_its_leader_is_killed(stack: Stack) -> None:
    frontend, leader, directory = start_group(stack)
    follower = leader.children()[0]
    frontend.kill()
    follower.wait(30)
    assert not follower.is_running()
    assert not directory.exists()


def test_limits_are_shared_out_rounding_up(tmp_path: Path) -> None:
    group = Group(tmp_path, 3)
    assert [group.share(limit) for limit in (1, 3, 512, 513)] == [1, 1, 171, 171]


def test_merge_adds_up_processes_and_keeps_what_describes_one() -> None:
    texts = []
    for served in (3, 5):
        registry = CollectorRegistry()
        requests = Counter("requests", "r", ["endpoint"], registry=registry)
        requests.labels("/a").inc(served)
        Gauge("in_flight", "g", registry=registry).set(served - 1)
        latency = Histogram("latency_seconds", "h", buckets=(0.1, 1.0), registry=registry)
        latency.observe(0.05 * served)
        Gauge("process_start_time_seconds", "s", registry=registry).set(1000 + served)
        texts.append(generate_latest(registry))
    samples = {
        (name, labels): value
        for (name, labels), value in scrape_text(merge(texts)).items()
        if not name.endswith("_created")
    }
    assert samples[("requests_total", (("endpoint", "/a"),))] == 8
    assert samples[("in_flight", ())] == 6
    assert samples[("latency_seconds_count", ())] == 2
    assert samples[("latency_seconds_bucket", (("le", "0.1"),))] == 0  # 0.15, 0.25
    assert samples[("latency_seconds_bucket", (("le", "1.0"),))] == 2
    assert abs(samples[("latency_seconds_sum", ())] - 0.4) < 1e-9
    assert samples[("process_start_time_seconds", ())] == 1003


def scrape_text(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }
