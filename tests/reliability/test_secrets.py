"""The broker password appears nowhere but in the Secret's data.

Every test of this suite runs with the recognisable password of the private broker, and the
autouse ``witness`` fixture searches what each produced (see conftest.py). The tests here add
what the others do not reach: the CLI's output of a whole run, ``queuejob render``, refused
credentials, and controls showing that the witness really reads the channels it claims to (and
that the password does sit in the Secret, where it belongs).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from queuejob.flows.adapters.local import LocalBackend
from queuejob.flows.core.errors import BrokerAuthError
from queuejob.flows.work_queue import run_work_queue
from tests.reliability.conftest import RelEnv
from tests.reliability.private_broker import PrivateBroker
from tests.reliability.support import (
    BROKER_PASSWORD,
    DOCS_ITEMS,
    Witness,
    local_kwargs,
    prefect_texts,
    queue_exists,
    secret_forms,
)
from tests.reliability.test_flow_kill import ephemeral_api_url, job_files

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]


def test_a_whole_cli_run_shows_the_password_only_in_the_secret(
    rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    env = {
        **os.environ,
        "PREFECT_API_URL": ephemeral_api_url(),
        # What a user sees by default (the rest of the suite runs Prefect at WARNING).
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_ROOT_LEVEL": "INFO",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.cli", "run", *DOCS_ITEMS, "--backend", "local",
         "--queue", queue, "--idle-timeout", "2", "--keep-job", "--",
         *rel_env.effects.work()],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    witness.add("cli stdout", proc.stdout)
    witness.add("cli stderr", proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "succeeded:      8" in proc.stdout
    (job,) = job_files(rel_env.state_dir)
    run_id = job["metadata"]["labels"]["queuejob.io/run-id"]
    witness.add_run(run_id)
    # The control: the Secret holds the URL (kept apart, mode 0600), and the Job only refers
    # to it.
    secrets = list((rel_env.state_dir / "default" / "secrets").glob("*.json"))
    assert len(secrets) == 1 and BROKER_PASSWORD in secrets[0].read_text()
    assert secrets[0].stat().st_mode & 0o077 == 0
    env_of_pods = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"secretKeyRef"} == set(next(e for e in env_of_pods if e["name"] == "BROKER_URL")
                                   ["valueFrom"])  # fmt: skip
    # The witness reads the Prefect API: the run's logs and its three artifacts are there.
    texts = prefect_texts([run_id])
    assert sum(1 for label, _ in texts if label.startswith("artifact")) >= 3
    assert any("summary: 8 items" in text for label, text in texts if label.startswith("prefect"))
    LocalBackend(state_dir=rel_env.state_dir).delete_run(namespace="default", run_id=run_id)


def test_render_never_shows_the_broker_url(rel_env: RelEnv, witness: Witness) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.cli", "render", "--image", "registry.example/q:1",
         "--", "sh", "-c", "cat"],
        env={**os.environ, "QUEUEJOB_BROKER_URL": rel_env.url},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    witness.add("render stdout", proc.stdout)
    witness.add("render stderr", proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert "<redacted>" in proc.stdout and "secretKeyRef" in proc.stdout


def test_refused_credentials_do_not_echo_the_password(
    broker: PrivateBroker, rel_env: RelEnv, queue: str, witness: Witness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The right password for a user that does not exist: the broker refuses the login.
    url = f"amqp://nobody:{BROKER_PASSWORD}@127.0.0.1:{broker.port}/%2F"
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", url)
    state = run_work_queue(**local_kwargs(queue, rel_env.effects.work()), return_state=True)
    witness.add_run(state.state_details.flow_run_id)
    assert state.is_failed()
    with pytest.raises(BrokerAuthError) as info:
        state.result()
    witness.add("exception", info.value)
    assert "refused the credentials of user 'nobody'" in str(info.value)
    assert not queue_exists(rel_env.url, queue)


def test_the_witness_finds_a_planted_leak(tmp_path: Path) -> None:
    # The control for the whole suite: each channel the witness reads does report a leak.
    w = Witness()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "s.json").write_text(json.dumps({"BROKER_URL": BROKER_PASSWORD}))
    (tmp_path / "state.json").write_text(json.dumps({"env": f"x{BROKER_PASSWORD}y"}))
    w.add_dir(tmp_path, skip=("secrets",))
    w.add("exception", RuntimeError(f"quoted: {BROKER_PASSWORD}"))
    w.add("report", {"nested": [f"pw={BROKER_PASSWORD}"]})
    found = w.leaks(secret_forms(BROKER_PASSWORD), [("stderr", f"... {BROKER_PASSWORD} ...")])
    assert sorted(f.split(":")[0] for f in found) == sorted(
        ["exception", "report", str(tmp_path / "state.json"), "stderr"]
    )
    # What the Secret's data looks like in the API (base64 of the URL) is not the password.
    assert (
        BROKER_PASSWORD not in base64.b64encode(f"amqp://u:{BROKER_PASSWORD}@h".encode()).decode()
    )
