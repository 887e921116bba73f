"""Helpers shared by the real-control-plane tests: the run's objects, lookups and waits."""

from __future__ import annotations

import base64
import copy
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.realkube.cluster import ROOT, ControlPlane
from tests.realkube.kubelet import Api, ApiError
from tests.shell_jobs import shell_run

RBAC_FILE = ROOT / "deployments" / "k8s" / "rbac.yaml"

PASSWORD = "pw-never-shown-5c1e"
BROKER_URL = f"amqp://queuejob:{PASSWORD}@rabbitmq.example.invalid:5672/%2F"

NS = "default"


def make_run(run_id: str, script: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's Secret and Job, with a plain shell command instead of the queuejob worker."""
    kw.setdefault("namespace", NS)
    return shell_run(run_id, script, broker_url=BROKER_URL, **kw)


def get(api: Api, path: str) -> dict[str, Any] | None:
    """An object by API path, None when missing."""
    return api.get(path, ok_missing=True)


def job_path(name: str, ns: str = NS) -> str:
    """The API path of a Job."""
    return f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"


def secret_path(name: str, ns: str = NS) -> str:
    """The API path of a Secret."""
    return f"/api/v1/namespaces/{ns}/secrets/{name}"


def pods_of(api: Api, job: str, ns: str = NS) -> list[dict[str, Any]]:
    """The Job's pods, found by the label every Kubernetes version sets."""
    listing = api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3D{job}") or {}
    return list(listing.get("items") or [])


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 20.0) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def watch_threads() -> list[str]:
    """Names of the backend's watch threads still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("kube-watch-")]


def _manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _create(api: Api, path: str, body: dict[str, Any]) -> None:
    try:
        api.request("POST", path, body)
    except ApiError as exc:
        if exc.status != 409:
            raise


def can(api: Api, verb: str, resource: str) -> bool:
    """Whether the API's identity may ``verb`` the ``resource`` in the namespace (a review)."""
    group = "batch" if resource == "jobs" else ""
    res, _, sub = resource.partition("/")
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "namespace": NS,
                "verb": verb,
                "group": group,
                "resource": res,
                "subresource": sub,
            }
        },
    }
    answer = api.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
    return bool(((answer or {}).get("status") or {}).get("allowed"))


def apply_role(
    plane: ControlPlane, tmp_path: Path, *, name: str, drop: tuple[str, str] | None = None
) -> Path:
    """Apply the manifest's ServiceAccount, Role and RoleBinding under ``name`` (without the
    ``drop`` = (resource, verb) permission); return a kubeconfig with the account's token."""
    admin = plane.api()
    docs = copy.deepcopy(_manifests())
    sa, role, binding = docs["ServiceAccount"], docs["Role"], docs["RoleBinding"]
    for doc in (sa, role, binding):
        doc["metadata"]["name"] = name
        assert doc["metadata"]["namespace"] == NS
    binding["roleRef"]["name"] = name
    binding["subjects"][0]["name"] = name
    if drop is not None:
        resource, verb = drop
        rules = [r for r in role["rules"] if resource in r["resources"]]
        assert rules and verb in rules[0]["verbs"], f"the Role has no {verb} on {resource}"
        rules[0]["verbs"].remove(verb)
        # A rule must keep at least one verb: drop the rule when it had only this one.
        role["rules"] = [r for r in role["rules"] if r["verbs"]]
    _create(admin, f"/api/v1/namespaces/{NS}/serviceaccounts", sa)
    _create(admin, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles", role)
    _create(admin, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings", binding)

    # 1.20's token controller gives every service account a token Secret.
    sa_path = f"/api/v1/namespaces/{NS}/serviceaccounts/{name}"
    wait_for("the service account's token", lambda: bool((admin.get(sa_path) or {}).get("secrets")))
    secret_name = (admin.get(sa_path) or {})["secrets"][0]["name"]
    token_secret = admin.get(f"/api/v1/namespaces/{NS}/secrets/{secret_name}") or {}
    token = base64.b64decode(token_secret["data"]["token"]).decode()
    # The binding reaches the authorizer through an informer: wait until it is in force.
    as_sa = plane.api(token)
    wait_for("the RoleBinding to take effect", lambda: can(as_sa, "list", "jobs"))
    return plane.write_kubeconfig(tmp_path / f"{name}.kubeconfig", token=token, user=name)
