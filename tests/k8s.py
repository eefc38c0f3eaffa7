"""Rendered Kubernetes manifests for tests: render an overlay, and run its pods as local
processes the way a kubelet would start their containers."""

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.stack import ROOT

K8S = ROOT / "deploy" / "k8s"
TOPOLOGIES = {"e-p-d": "E/P/D", "e-pd": "E/PD", "epd": "EPD", "p-d": "P/D"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubectl() -> str:
    """The kubectl binary, or a test failure that says how to get one."""
    found = shutil.which("kubectl")
    if found is None:
        raise AssertionError(
            "kubectl is not installed: these tests render deploy/k8s with `kubectl kustomize` "
            "(kubectl >= 1.27 carries kustomize v5); install kubectl and run them again"
        )
    return found


def render(overlay: str, token: str = "", workdir: Path | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s/<overlay>`, from a copy of deploy/ whose NATS token file
    holds `token` (as README.md tells users to write it), as a list of objects."""
    source = K8S.parent
    if token and workdir is not None:
        copy = workdir / "deploy"
        shutil.copytree(source, copy, dirs_exist_ok=True)
        (copy / "k8s" / "base" / "nats-token.env").write_text(f"token={token}\n")
        source = copy
    done = subprocess.run(
        [kubectl(), "kustomize", str(source / "k8s" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every Deployment and StatefulSet."""
    return [
        (workload, container)
        for workload in objects
        if workload["kind"] in ("Deployment", "StatefulSet")
        for container in workload["spec"]["template"]["spec"]["containers"]
    ]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args (unknown references stay as they are)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class Pod:
    """One workload's container, started as a local process on its own loopback address."""

    name: str
    address: str
    argv: list[str]
    env: dict[str, str]
    workload: dict[str, Any]
    container: dict[str, Any]
    log: Path
    popen: "subprocess.Popen[bytes] | None" = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def probe(self, kind: str) -> int:
        """The HTTP status of the container's `kind` probe ("readinessProbe", ...)."""
        get = self.container[kind]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in self.container["ports"] if p["name"] == port)
        try:
            return httpx.get(f"http://{self.address}:{port}{get['path']}", timeout=2).status_code
        except httpx.HTTPError:
            return 0


@dataclass
class LocalCluster:
    """The pods of a rendered overlay as local processes.

    What a cluster would provide is substituted, and nothing else: each pod gets its own
    loopback address as its IP (and for the interfaces it binds, 0.0.0.0), each Service name
    resolves to the address of the pod it selects, Secrets and ConfigMaps become environment
    variables and files, and `overrides` replaces ConfigMap values as an overlay would (a CPU
    device, the tiny checkpoint).
    """

    objects: list[dict[str, Any]]
    tmp: Path
    subnet: str
    overrides: dict[str, str] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)

    def __post_init__(self) -> None:
        workloads = [w for w in self.objects if w["kind"] in ("Deployment", "StatefulSet")]
        replicas: dict[str, list[tuple[str, str]]] = {}  # workload -> [(pod name, address)]
        for workload in workloads:
            name = workload["metadata"]["name"]
            count = int(workload["spec"].get("replicas", 1))
            replicas[name] = [
                (
                    name if count == 1 else f"{name}-{i}",
                    f"{self.subnet}.{10 + 10 * len(replicas) + i}",
                )
                for i in range(count)
            ]
        services: dict[str, str] = {}
        for service in find(self.objects, "Service"):
            selector = service["spec"]["selector"]
            for w in workloads:
                labels = w["spec"]["template"]["metadata"]["labels"]
                if all(labels.get(k) == v for k, v in selector.items()):
                    services[service["metadata"]["name"]] = replicas[w["metadata"]["name"]][0][1]
        self.services = services
        for workload, container in containers(self.objects):
            for name, address in replicas[workload["metadata"]["name"]]:
                self.pods.append(self._pod(workload, container, name, address))

    def _pod(
        self, workload: dict[str, Any], container: dict[str, Any], name: str, address: str
    ) -> Pod:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self._config_map(source["configMapRef"]["name"]))
        for item in container.get("env", []):
            env[item["name"]] = self._env_value(item, address, env)
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                where = self.tmp / name / mount["name"]
                where.mkdir(parents=True, exist_ok=True)
                for file, text in self._config_map(volume["configMap"]["name"]).items():
                    (where / file).write_text(self._localize(text, address))
                mounts[mount["mountPath"]] = str(where)
        argv = [
            self._localize(expand(arg, env), address)
            for arg in [*container.get("command", []), *container.get("args", [])]
        ]
        for mount_path, local in mounts.items():
            argv = [arg.replace(mount_path, local) for arg in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        return Pod(name, address, argv, env, workload, container, self.tmp / f"{name}.log")

    def _config_map(self, name: str) -> dict[str, str]:
        config = next(c for c in find(self.objects, "ConfigMap") if c["metadata"]["name"] == name)
        data = dict(config.get("data", {}))
        return {k: self.overrides.get(k, v) for k, v in data.items()}

    def _env_value(self, item: dict[str, Any], address: str, env: dict[str, str]) -> str:
        if "value" in item:
            return self._localize(expand(item["value"], env), address)
        source = item["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", source
            return address
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = next(
                s for s in find(self.objects, "Secret") if s["metadata"]["name"] == ref["name"]
            )
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self._config_map(ref["name"])[ref["key"]]
        raise AssertionError(f"unsupported env source {source}")

    def _localize(self, text: str, address: str) -> str:
        text = text.replace("0.0.0.0", address)
        for service, target in self.services.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(service)}(?![\w-])", target, text)
        return text

    def start(self, first: str) -> None:
        """Start the pod named `first` (NATS), wait until it is ready, then all the others."""
        ordered = sorted(self.pods, key=lambda pod: pod.name != first)
        for pod in ordered:
            env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "NATS_TOKEN")}
            env.update(pod.env)
            env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
            env["PYTHONUNBUFFERED"] = "1"
            pod.popen = subprocess.Popen(
                pod.argv, env=env, cwd=ROOT, stdout=pod.log.open("wb"), stderr=subprocess.STDOUT
            )
            if pod.name == first:
                self.wait_ready([pod], 30)

    def wait_ready(self, pods: list[Pod], timeout: float) -> None:
        """Until every pod's readiness probe answers 200 (its liveness probe too)."""
        deadline = time.monotonic() + timeout
        waiting = list(pods)
        while waiting and time.monotonic() < deadline:
            for pod in list(waiting):
                assert pod.popen is not None and pod.popen.poll() is None, (
                    f"{pod.name} exited:\n{pod.output()[-3000:]}"
                )
                if pod.probe("readinessProbe") == 200 and pod.probe("livenessProbe") == 200:
                    waiting.remove(pod)
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in waiting)
        assert not waiting, f"not ready in {timeout}s\n{logs}"

    def stop(self) -> None:
        """SIGTERM every pod, SIGKILL what has not stopped within its grace period."""
        for pod in self.pods:
            if pod.popen is not None and pod.popen.poll() is None:
                pod.popen.send_signal(signal.SIGTERM)
        for pod in self.pods:
            if pod.popen is not None:
                try:
                    pod.popen.wait(30)
                except subprocess.TimeoutExpired:
                    pod.popen.kill()
                    pod.popen.wait()
