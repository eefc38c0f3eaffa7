"""Replica counts of the stage Deployments through the Kubernetes scale subresource.

``GET`` and ``PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` (a merge patch of
``spec.replicas``), what ``kubectl scale`` and the HorizontalPodAutoscaler use. In a pod the
service account's token and CA are read from their standard files; outside, pass the API
server's URL (``kubectl proxy`` serves one without credentials).
"""

import ssl
from pathlib import Path
from typing import Any

import aiohttp

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ScaleError(Exception):
    """The API server refused or could not be reached."""


class DeploymentScaler:
    """Reads and sets ``spec.replicas`` of Deployments in one namespace."""

    def __init__(
        self,
        api_url: str,
        namespace: str,
        token: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.namespace = namespace
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl: ssl.SSLContext | bool = True
        if ca_file:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_cluster(cls, namespace: str | None = None) -> "DeploymentScaler":
        """The API server of the cluster this pod runs in, with its service account."""
        import os

        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ScaleError("not in a cluster: KUBERNETES_SERVICE_HOST is unset; pass --kube-api")
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        ns = namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", ns, token, str(SERVICE_ACCOUNT / "ca.crt"))

    async def __aenter__(self) -> "DeploymentScaler":
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, deployment: str) -> str:
        where = f"namespaces/{self.namespace}/deployments/{deployment}"
        return f"{self.api_url}/apis/apps/v1/{where}/scale"

    async def _call(self, method: str, deployment: str, body: Any = None) -> dict[str, Any]:
        if self._session is None:
            raise RuntimeError("use DeploymentScaler in `async with`")
        headers = {"Content-Type": "application/merge-patch+json"} if body is not None else {}
        try:
            async with self._session.request(
                method, self._url(deployment), json=body, headers=headers, ssl=self._ssl
            ) as response:
                data: Any = await response.json(content_type=None)
                if response.status >= 400:
                    message = data.get("message") if isinstance(data, dict) else data
                    raise ScaleError(f"{method} {deployment}/scale: {response.status} {message}")
        except aiohttp.ClientError as error:
            raise ScaleError(f"{method} {deployment}/scale: {error}") from error
        if not isinstance(data, dict):
            raise ScaleError(f"{method} {deployment}/scale: not a Scale object")
        return data

    async def replicas(self, deployment: str) -> int:
        """``spec.replicas`` now."""
        scale = await self._call("GET", deployment)
        return int(scale.get("spec", {}).get("replicas", 0))

    async def scale(self, deployment: str, replicas: int) -> int:
        """Set ``spec.replicas``; returns what the API server answered."""
        scale = await self._call("PATCH", deployment, {"spec": {"replicas": replicas}})
        return int(scale.get("spec", {}).get("replicas", replicas))
