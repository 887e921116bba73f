"""TLS for real: a private RabbitMQ with an amqps listener whose certificate is signed by a CA the
fixture makes with openssl. The adapters, the worker, the CLI and a whole flow run connect with
``amqps://`` and the CA file; a wrong CA and a plain-text port are each one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    declare_queues,
    fill_queue,
    queue_depths,
    wait_for_broker,
)
from queuejob.flows.core.errors import BrokerAuthError
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.worker import EXIT_OK
from tests.reliability.private_broker import PrivateBroker, find_server, free_port

from .support import ROOT, run_worker, wait_until, worker_env

pytestmark = pytest.mark.broker

USER, PASSWORD = "queuejob-tls", "tls-P4ss-queuejob"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    """A self-signed CA: ``<name>.pem`` and ``<name>.key``."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)  # fmt: skip


def make_server_cert(d: Path, ca: str) -> None:
    """``server.pem``/``server.key`` for localhost and 127.0.0.1, signed by ``ca``."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
             cwd=d)  # fmt: skip
    (d / "server.key").chmod(0o644)  # the broker may run as another user


@dataclass
class TlsBroker:
    """The broker's TLS and plain URLs and the CA files."""

    tls_port: int
    plain_port: int
    ca_file: Path
    wrong_ca_file: Path

    def url(self, *, tls: bool = True, ca: Path | None = None) -> str:
        scheme, port = ("amqps", self.tls_port) if tls else ("amqp", self.plain_port)
        query = f"?ca_file={urllib.parse.quote(str(ca))}" if ca else ""
        return f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{port}/%2F{query}"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A private RabbitMQ with an amqps listener (CA and certificate made here)."""
    if find_server() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("rabbitmq-server is not installed: the TLS tests need a private broker")
        pytest.skip("rabbitmq-server is not installed")
    base = tmp_path_factory.mktemp("tls-broker")
    certs = base / "certs"
    certs.mkdir()
    make_ca(certs, "ca")
    make_ca(certs, "other-ca")
    make_server_cert(certs, "ca")
    broker = PrivateBroker(base / "node", user=USER, password=PASSWORD)
    tls_port = free_port()
    with (base / "node" / "rabbitmq.conf").open("a") as conf:
        conf.write(
            f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certs / 'ca.pem'}\n"
            f"ssl_options.certfile = {certs / 'server.pem'}\n"
            f"ssl_options.keyfile = {certs / 'server.key'}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    try:
        broker.start()
        yield TlsBroker(tls_port, broker.port, certs / "ca.pem", certs / "other-ca.pem")
    finally:
        broker.close()


def test_the_adapters_connect_with_tls_and_the_ca_file(
    tls_broker: TlsBroker, queue_name: str, run_id: str
) -> None:
    cfg = BrokerConfig(tls_broker.url(), ca_file=str(tls_broker.ca_file), connect_timeout_s=5)
    assert cfg.tls
    wait_for_broker(cfg, deadline_s=30)
    qs = QueueSettings(queue_name)
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(["a", "b"])), run_id=run_id)
    assert queue_depths(cfg, qs)["work"].ready == 2
    # The CA named in the URL (as the RabbitMQBroker block writes it for the pods) works alike.
    assert queue_depths(BrokerConfig(tls_broker.url(ca=tls_broker.ca_file)), qs)["work"].ready == 2


def test_a_wrong_ca_is_one_clear_error_at_once(tls_broker: TlsBroker) -> None:
    cfg = BrokerConfig(tls_broker.url(), ca_file=str(tls_broker.wrong_ca_file))
    with pytest.raises(BrokerAuthError) as info:
        wait_for_broker(cfg, deadline_s=30)
    text = str(info.value)
    assert "could not be verified" in text and "set ca_file" in text, text
    assert str(tls_broker.wrong_ca_file) in text
    assert PASSWORD not in text


def test_tls_to_a_plain_text_port_is_one_clear_error(tls_broker: TlsBroker) -> None:
    url = tls_broker.url().replace(f":{tls_broker.tls_port}/", f":{tls_broker.plain_port}/")
    cfg = BrokerConfig(url, ca_file=str(tls_broker.ca_file), connect_timeout_s=5)
    with pytest.raises(BrokerAuthError) as info:
        wait_for_broker(cfg, deadline_s=30)
    text = str(info.value)
    assert "answered in plain text" in text and "TLS port" in text, text


def test_a_worker_connects_with_tls_and_the_mounted_ca(
    tls_broker: TlsBroker, queue_name: str, run_id: str
) -> None:
    cfg = BrokerConfig(tls_broker.url(), ca_file=str(tls_broker.ca_file))
    qs = QueueSettings(queue_name)
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(["x", "y", "z"])), run_id=run_id)
    # As in a pod: the URL from the Secret, the CA from the volume the Job mounts.
    env = worker_env(
        tls_broker.url(),
        qs.name,
        run_id,
        "pod-tls",
        QUEUEJOB_BROKER_CA_FILE=str(tls_broker.ca_file),
    )
    res = run_worker(["--mode", "fine", "--idle-timeout", "0.5", "--", "cat"], env)
    assert res.returncode == EXIT_OK, res.stderr
    wait_until(lambda: queue_depths(cfg, qs)["work"].ready == 0, what="the queue drained")
    # Without the CA the pod says what is wrong (exit 2: a configuration error).
    env.pop("QUEUEJOB_BROKER_CA_FILE")
    res = run_worker(["--idle-timeout", "0.5", "--", "cat"], env)
    assert res.returncode == 2 and "could not be verified" in res.stderr, res.stderr


def test_the_cli_connects_with_tls(tls_broker: TlsBroker, queue_name: str) -> None:
    cfg = BrokerConfig(tls_broker.url(), ca_file=str(tls_broker.ca_file))
    declare_queues(cfg, QueueSettings(queue_name))
    env = {**os.environ, "QUEUEJOB_BROKER_URL": tls_broker.url(ca=tls_broker.ca_file)}
    res = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.cli", "dead-letters", queue_name],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert PASSWORD not in res.stdout + res.stderr


@pytest.mark.prefect
def test_a_flow_run_and_its_pods_connect_with_tls(
    tls_broker: TlsBroker, queue_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from queuejob.flows.params import CleanupParams, JobParams, QueueParams
    from queuejob.flows.work_queue import run_work_queue

    monkeypatch.setenv("QUEUEJOB_BROKER_URL", tls_broker.url(ca=tls_broker.ca_file))
    monkeypatch.setenv("QUEUEJOB_STATE_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    report = run_work_queue(
        items=ItemSource.inline(["one", "two", "three"]),
        queue=QueueParams(name=queue_name),
        job=JobParams(command=["cat"], parallelism=1, idle_timeout_seconds=1.0),
        mode="fine",
        backend="local",
        timeout_seconds=120,
        cleanup=CleanupParams(delete_job=True, delete_queues=True),
    )
    assert report["summary"]["succeeded"] == 3, report["summary"]
    assert report["job_phase"] == "Succeeded"
