"""Start and stop the real Kubernetes 1.20 control plane (scripts/k8s-control-plane.sh) for tests.

The tier runs when the binaries are cached, when asked (``QUEUEJOB_REAL_K8S=1``, which is what
``make test-k8s`` sets) or in CI (``CI=true``); `selection` says which, and why not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.realkube.kubelet import Api, ApiConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k8s-control-plane.sh"
DEFAULT_CACHE = Path("/var/cache/queuejob/k8s-1.20")
BUILD_HINT = "`make test-k8s` builds them once (about 15-25 min on 2 cores) and runs the tier"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """Where the built binaries live (outside the repository)."""
    return Path(os.environ.get("QUEUEJOB_K8S_CACHE") or DEFAULT_CACHE)


def binaries_present() -> bool:
    """True when kube-apiserver and kube-controller-manager are built and etcd is installed."""
    bindir = cache_dir() / "bin"
    return (
        os.access(bindir / "kube-apiserver", os.X_OK)
        and os.access(bindir / "kube-controller-manager", os.X_OK)
        and shutil.which("etcd") is not None
    )


@dataclass(frozen=True)
class Selection:
    """Whether the tier runs, whether it must build first, and the reason when it does not."""

    run: bool
    build_first: bool
    reason: str


def selection() -> Selection:
    """The tier's selection rule (see the module docstring)."""
    wanted = os.environ.get("QUEUEJOB_REAL_K8S")
    present = binaries_present()
    if wanted is not None and not _truthy(wanted):
        return Selection(False, False, "QUEUEJOB_REAL_K8S is off")
    if _truthy(wanted) or _truthy(os.environ.get("CI")):
        return Selection(True, not present, "")
    if present:
        return Selection(True, False, "")
    missing = (
        "etcd is not installed"
        if shutil.which("etcd") is None and (cache_dir() / "bin").is_dir()
        else f"no Kubernetes 1.20 binaries in {cache_dir()}"
    )
    return Selection(False, False, f"{missing}; {BUILD_HINT}")


def build(log_path: Path) -> float:
    """Build the binaries (the script skips what is done); return the seconds it took."""
    started = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        result = subprocess.run(
            ["bash", str(SCRIPT), "build"], stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"building the Kubernetes binaries failed (exit {result.returncode}); see {log_path}:"
            "\n" + "\n".join(tail)
        )
    return time.monotonic() - started


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ControlPlane:
    """A running control plane: where it is, how to reach it as admin, and its files."""

    run_dir: Path
    server: str
    ca_file: Path
    admin_kubeconfig: Path
    serving_cert: Path
    serving_key: Path
    start_seconds: float

    def __repr__(self) -> str:
        return f"ControlPlane(server={self.server!r}, run_dir={str(self.run_dir)!r})"

    @property
    def admin_token(self) -> str:
        """The static token of the system:masters user."""
        return (self.run_dir / "tokens.csv").read_text().split(",", 1)[0]

    def api_config(self, token: str | None = None) -> ApiConfig:
        """How to reach the apiserver, as admin unless another token is given."""
        return ApiConfig(
            server=self.server, token=token or self.admin_token, ca_file=str(self.ca_file)
        )

    def api(self, token: str | None = None) -> Api:
        """A small JSON client, as admin unless another token is given."""
        return Api(self.api_config(token))

    def write_kubeconfig(self, path: Path, *, token: str, user: str) -> Path:
        """A kubeconfig for this cluster that authenticates with ``token``."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: queuejob-test\n  cluster:\n    server: {self.server}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: {user}\n  user:\n    token: {token}\n"
            "contexts:\n- name: queuejob-test\n  context:\n    cluster: queuejob-test\n"
            f"    user: {user}\n    namespace: default\n"
            "current-context: queuejob-test\n"
        )
        path.chmod(0o600)
        return path

    @classmethod
    def start(cls, run_dir: Path, *, timeout_s: float = 240.0) -> ControlPlane:
        """Start etcd, kube-apiserver and kube-controller-manager on free ports."""
        env = dict(os.environ)
        env.update(
            QUEUEJOB_K8S_APISERVER_PORT=str(free_port()),
            QUEUEJOB_K8S_ETCD_PORT=str(free_port()),
            QUEUEJOB_K8S_ETCD_PEER_PORT=str(free_port()),
            QUEUEJOB_K8S_CM_PORT=str(free_port()),
        )
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(SCRIPT), "start", str(run_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            stop(run_dir)
            raise RuntimeError(
                f"the control plane did not start (exit {result.returncode}); logs in "
                f"{run_dir}:\n{result.stderr[-3000:]}"
            )
        pki = run_dir / "pki"
        return cls(
            run_dir=run_dir,
            server=(run_dir / "server").read_text().strip(),
            ca_file=pki / "ca.crt",
            admin_kubeconfig=run_dir / "admin.kubeconfig",
            serving_cert=pki / "serving.crt",
            serving_key=pki / "serving.key",
            start_seconds=time.monotonic() - started,
        )

    def stop(self) -> None:
        """Stop every process the start launched."""
        stop(self.run_dir)


def processes_of(run_dir: Path) -> list[str]:
    """Live processes whose command line names ``run_dir`` (etcd, apiserver, controllers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if str(run_dir) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


def stop(run_dir: Path) -> None:
    """Stop the control plane started in ``run_dir`` (a no-op when nothing runs there)."""
    subprocess.run(["bash", str(SCRIPT), "stop", str(run_dir)], check=False, timeout=60)
