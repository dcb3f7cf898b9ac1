"""Kubernetes API I/O for the operator: a small async JSON client over aiohttp.

kopf's own API client is not public, so handlers use this one. It finds the cluster like kubectl:
in-cluster ServiceAccount first, then KUBECONFIG / ~/.kube/config (via the `kubernetes` package's
loader, which understands every kubeconfig form). Creation is idempotent: 409 means "already there",
and the existing object is read back.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)
JSON = dict[str, Any]
FIELD_MANAGER = "finetune-operator"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Pod": "pods",
    "Event": "events",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Job": "jobs",
    "JobSet": "jobsets",
    "Workload": "workloads",
    "Deployment": "deployments",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceMonitor": "servicemonitors",
    "FineTuneJob": "finetunejobs",
}


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body

    def body_message(self) -> str:
        """The API server's own message (a webhook's reason, a validation error)."""
        if isinstance(self.body, dict) and self.body.get("message"):
            return str(self.body["message"])
        return str(self.body)[:300]


@dataclass(frozen=True)
class Cluster:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    @classmethod
    def discover(cls) -> Cluster:
        """In-cluster config when running in a pod, else the current kubeconfig context."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if host and port and (SA_DIR / "token").exists() and not os.environ.get("KUBECONFIG"):
            server = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
            return cls(server=server, token_file=str(SA_DIR / "token"), ca_file=str(SA_DIR / "ca.crt"))
        from kubernetes import client, config  # the loader handles exec plugins, embedded data, contexts

        cfg = client.Configuration()
        # Read $KUBECONFIG now: the loader's own default is frozen when `kubernetes` is first imported.
        files = os.environ.get("KUBECONFIG") or "~/.kube/config"
        config.load_kube_config(config_file=files, client_configuration=cfg)  # type: ignore[no-untyped-call]
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        token = auth.split(" ", 1)[1] if auth and " " in auth else auth
        return cls(
            server=cfg.host.rstrip("/"),
            token=token,
            ca_file=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            insecure=not cfg.verify_ssl,
        )

    def bearer(self) -> str | None:
        # Projected ServiceAccount tokens rotate; read the file each time rather than caching it forever.
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"


def object_path(obj: JSON, subresource: str | None = None) -> str:
    meta = obj["metadata"]
    path = f"{collection_path(obj['apiVersion'], PLURALS[obj['kind']], meta.get('namespace'))}/{meta['name']}"
    return f"{path}/{subresource}" if subresource else path


def has_labels(obj: JSON, labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Api:
    """Async JSON calls to the API server; one instance (one connection pool) per operator."""

    def __init__(self, cluster: Cluster, *, timeout: float = 60.0, connections: int = 64) -> None:
        self.cluster = cluster
        # No limit on the whole call: under load a request may queue for a pooled connection, and that
        # wait is not a failure. Connecting and each read are bounded.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=timeout)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self.cluster.ssl_context())
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        token = self.cluster.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if body is not None:
            headers["Content-Type"] = content_type
            kwargs["data"] = json.dumps(body)
        async with self._http().request(method, self.cluster.server + path, **kwargs) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = await resp.text()
            return resp.status, data

    async def _checked(self, method: str, path: str, **kwargs: Any) -> Any:
        status, data = await self.request(method, path, **kwargs)
        if status >= 400:
            raise ApiError(status, method, path, data)
        return data

    async def get(self, path: str) -> JSON | None:
        """The object, or None when it does not exist."""
        status, data = await self.request("GET", path)
        if status == 404:
            return None
        if status >= 400:
            raise ApiError(status, "GET", path, data)
        return data  # type: ignore[no-any-return]

    async def list(self, path: str, labels: dict[str, str] | None = None) -> list[JSON]:
        """Objects of a collection; the label filter also runs here, so it holds for any server."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        data = await self._checked("GET", path, params=params)
        items = (data or {}).get("items") or []
        return [i for i in items if not labels or has_labels(i, labels)]

    async def create(self, obj: JSON, *, dry_run: bool = False) -> JSON:
        """Create `obj`, or read back the existing one with the same name (idempotent).

        `dry_run`: the API server validates, defaults and prunes `obj` and answers with what it would
        store, storing nothing (what a CRD's older schema drops shows there).
        """
        meta = obj["metadata"]
        path = collection_path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"))
        params = {"dryRun": "All"} if dry_run else None
        status, data = await self.request("POST", path, body=obj, params=params)
        if status == 409:
            existing = await self.get(object_path(obj))
            if existing is not None:
                return existing
        if status >= 400:
            raise ApiError(status, "POST", path, data)
        return data  # type: ignore[no-any-return]

    async def apply(self, obj: JSON) -> JSON:
        """Server-side apply: our field manager owns exactly the fields in `obj`."""
        return await self._checked(  # type: ignore[no-any-return]
            "PATCH",
            object_path(obj),
            body=obj,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        return await self._checked(  # type: ignore[no-any-return]
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str) -> bool:
        """Delete with background propagation (a Job takes its pods along); False if already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        status, data = await self.request("DELETE", path, body=body)
        if status == 404:
            return False
        if status >= 400:
            raise ApiError(status, "DELETE", path, data)
        return True

    async def served(self, api_version: str) -> bool:
        """Whether the server serves this group/version (e.g. a CRD such as ServiceMonitor exists)."""
        status, _ = await self.request("GET", collection_path(api_version, "", None).rstrip("/"))
        return status < 400
