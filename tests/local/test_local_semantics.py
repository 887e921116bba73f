"""Job semantics of the local backend, with plain shell pods (no broker needed).

Each test checks the Job status the flow sees (the shape and condition order of Kubernetes
1.31+), the pods the supervisor ran, and, at teardown, that no process of the run is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from queuejob.flows.adapters.local import POD_ENV, LocalBackend
from queuejob.flows.core.errors import InvalidInput, JobConflict, JobTimeout, KubeNotFound
from queuejob.flows.core.job_status import JobPhase, JobState, job_state

from .conftest import SECRET_PASSWORD, SECRET_URL, Harness, until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def conditions(job: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["type"], c["reason"], c["message"]) for c in job["status"].get("conditions") or []]


def pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["local"]["pods"])


def max_overlap(job: dict[str, Any]) -> int:
    """The most pods that ran at the same time, from their start and finish times."""
    events = []
    for p in pods(job):
        events += [(p["startEpoch"], 1), (p["finishedEpoch"], -1)]
    peak = cur = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        cur += delta
        peak = max(peak, cur)
    return peak


def test_completions_with_parallelism_succeed_like_kubernetes(harness: Harness) -> None:
    updates: list[JobState] = []
    handle = harness.create("echo hello from $POD_NAME; sleep 0.2", completions=5, parallelism=2)
    assert not handle.adopted and handle.uid

    state = harness.backend.wait(handle, timeout_s=30, on_update=updates.append, tick_s=0.2)

    assert state.phase is JobPhase.SUCCEEDED
    assert state.reason == "CompletionsReached"
    assert updates and updates[0].phase in (JobPhase.PENDING, JobPhase.RUNNING)
    assert max(u.counts.active for u in updates) <= 2
    job = harness.terminal(handle)
    assert conditions(job) == [
        ("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
        ("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
    ]
    status = job["status"]
    assert status["succeeded"] == 5
    assert "active" not in status and "failed" not in status  # zero counters are omitted
    assert status["terminating"] == 0 and status["ready"] == 0
    assert status["completionTime"] and status["startTime"]
    for cond in status["conditions"]:
        assert set(cond) == {
            "type",
            "status",
            "lastProbeTime",
            "lastTransitionTime",
            "reason",
            "message",
        }
        assert cond["lastProbeTime"] == cond["lastTransitionTime"]
    final = job_state(job)
    assert final.terminal and final.phase is JobPhase.SUCCEEDED
    assert len(pods(job)) == 5 and max_overlap(job) == 2
    logs = harness.backend.pod_logs(handle)
    assert list(logs) == [p["name"] for p in pods(job)]
    for name, text in logs.items():
        assert name.startswith(f"{handle.name}-") and len(name) == len(handle.name) + 6
        assert text == f"hello from {name}"
    assert harness.backend.failure_details(handle) == []


def test_env_secret_and_scrubbing(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pod checks the Secret's value without the test putting it into the Job, prints it
    # (a careless user command), and checks it inherited nothing but the basics from the flow.
    script = (
        'test "$(printf %s "$BROKER_URL" | md5sum | cut -c1-32)" = "$WANT_MD5" || exit 7; '
        'test -z "$QUEUEJOB_TEST_BROKER_URL" || exit 8; '
        'test "$HOSTNAME" = "$POD_NAME" || exit 9; '
        'echo "ns=$NS literal=$LIT url=$BROKER_URL"'
    )
    want = hashlib.md5(SECRET_URL.encode()).hexdigest()
    run_id, secret, job = harness.shell_job(script, env={"WANT_MD5": want, "LIT": "x y"})
    job["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    )
    # The flow's own environment (here: the test's broker URL) must not reach the pods.
    monkeypatch.setenv("QUEUEJOB_TEST_BROKER_URL", os.environ.get("QUEUEJOB_TEST_BROKER_URL", "x"))
    handle = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    state = harness.backend.wait(handle, timeout_s=20)
    assert state.phase is JobPhase.SUCCEEDED, harness.backend.failure_details(handle)

    logs = harness.backend.pod_logs(handle)
    (text,) = logs.values()
    assert text == "ns=default literal=x y url=<redacted>"
    ns_dir = harness.state_dir / "default"
    secret_file = ns_dir / "secrets" / f"{handle.name}-broker.json"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(ns_dir.stat().st_mode) == 0o700
    harness.terminal(handle)
    # Nothing the backend writes itself holds the password: the state file, the supervisor log.
    for path in (ns_dir / f"{handle.name}.json", ns_dir / f"{handle.name}.logs/supervisor.log"):
        assert SECRET_PASSWORD not in path.read_text()
    assert SECRET_PASSWORD not in repr(harness.backend)


def test_variable_references_expand_like_kubernetes(harness: Harness) -> None:
    run_id, secret, job = harness.shell_job("unused", env={"LIT": "x", "GREETING": "hi $(LIT)"})
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["sh", "-c", 'echo "$0|$1|$(GREETING)|$(UNDEFINED)"']
    container["args"] = ["$(POD_NAME)", "$$(POD_NAME)"]
    handle = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    assert harness.backend.wait(handle, timeout_s=20).phase is JobPhase.SUCCEEDED
    ((pod, text),) = harness.backend.pod_logs(handle).items()
    # $(UNDEFINED) reaches the shell unchanged, which runs it as a command substitution.
    assert text.splitlines()[-1] == f"{pod}|$(POD_NAME)|hi x|"


def test_backoff_limit_fails_with_backoff_between_pods(harness: Harness) -> None:
    handle = harness.create("echo attempt $POD_NAME >&2; exit 3", completions=1, backoff_limit=2)

    state = harness.backend.wait(handle, timeout_s=30)

    assert state.phase is JobPhase.FAILED
    assert state.reason == "BackoffLimitExceeded"
    job = harness.terminal(handle)
    assert conditions(job) == [
        ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
    ]
    assert job["status"]["failed"] == 3 and "completionTime" not in job["status"]
    ps = pods(job)
    assert len(ps) == 3
    # Exponential back-off: base 0.1 s, then 0.2 s, counted from the previous failure.
    for i in range(1, 3):
        gap = ps[i]["startEpoch"] - ps[i - 1]["finishedEpoch"]
        assert gap >= 0.1 * 2 ** (i - 1) - 0.02, (i, gap)
    failures = harness.backend.failure_details(handle, tail_lines=5)
    assert [f.pod for f in failures] == [p["name"] for p in ps]
    for failure in failures:
        assert failure.exit_code == 3 and failure.reason == "Error"
        assert failure.log_tail == f"attempt {failure.pod}"


def test_deadline_kills_pods_then_fails(harness: Harness, tmp_path: Path) -> None:
    # One pod ignores SIGTERM, so the deadline needs the SIGKILL after the grace period.
    script = 'if mkdir "$LOCKDIR/first" 2>/dev/null; then trap "" TERM; fi; sleep 600'
    updates: list[JobState] = []
    handle = harness.create(
        script, completions=2, parallelism=2, deadline_s=1, env={"LOCKDIR": str(tmp_path)}
    )
    until(lambda: harness.job(handle)["status"].get("active") == 2, what="2 active pods")
    started = time.monotonic()

    state = harness.backend.wait(handle, timeout_s=20, on_update=updates.append, tick_s=0.1)

    assert state.phase is JobPhase.FAILED and state.reason == "DeadlineExceeded"
    assert time.monotonic() - started < 5
    job = harness.terminal(handle)
    assert conditions(job) == [
        ("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline"),
        ("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"),
    ]
    assert job["status"]["failed"] == 2 and "active" not in job["status"]
    assert sorted(p["exitCode"] for p in pods(job)) == [128 + 9, 128 + 15]
    # After the terminal condition no process of the run is left except, for an instant, the
    # supervisor and its watchdog on their way out.
    until(lambda: not harness.processes(handle), timeout=10, what="the run's processes to end")


def test_work_queue_mode_stops_starting_pods_after_a_success(
    harness: Harness, tmp_path: Path
) -> None:
    # completions unset: the first pod to finish succeeds; the others end later on their own.
    script = 'if mkdir "$LOCKDIR/won" 2>/dev/null; then exit 0; fi; sleep 0.7; exit 0'
    handle = harness.create(script, completions=None, parallelism=3, env={"LOCKDIR": str(tmp_path)})

    state = harness.backend.wait(handle, timeout_s=20)

    assert state.phase is JobPhase.SUCCEEDED
    job = harness.terminal(handle)
    assert "completions" not in job["spec"]
    assert len(pods(job)) == 3  # no pod was started after the first success
    assert job["status"]["succeeded"] == 3
    # Success only once every pod had ended.
    last_end = max(p["finishedEpoch"] for p in pods(job))
    assert job["local"]["finishedEpoch"] >= last_end


def test_work_queue_mode_replaces_failed_pods_until_a_success(
    harness: Harness, tmp_path: Path
) -> None:
    script = 'if mkdir "$LOCKDIR/first" 2>/dev/null; then exit 1; fi; exit 0'
    handle = harness.create(script, completions=None, parallelism=1, env={"LOCKDIR": str(tmp_path)})
    state = harness.backend.wait(handle, timeout_s=20)
    assert state.phase is JobPhase.SUCCEEDED
    job = harness.terminal(handle)
    assert (job["status"]["failed"], job["status"]["succeeded"]) == (1, 1)


def test_zero_completions_complete_without_pods(harness: Harness) -> None:
    handle = harness.create("exit 1", completions=0)
    assert harness.backend.wait(handle, timeout_s=20).phase is JobPhase.SUCCEEDED
    job = harness.terminal(handle)
    assert pods(job) == [] and [c[0] for c in conditions(job)] == [
        "SuccessCriteriaMet",
        "Complete",
    ]


def test_pod_leftovers_die_with_the_pod(harness: Harness, tmp_path: Path) -> None:
    # The first pod's main process exits at once, leaving a child in its process group and one
    # in a session of its own (as the worker runs user commands); the second pod keeps the Job
    # running, so only the end of the first pod can have stopped them. ($$$$ is the shell's $$
    # once Kubernetes' $(VAR) expansion has turned $$ into $.)
    script = (
        'if mkdir "$LOCKDIR/first" 2>/dev/null; then sleep 600 & '
        "setsid sh -c 'echo $$$$ > \"$LOCKDIR/escaped\"; exec sleep 600' & "
        'until [ -s "$LOCKDIR/escaped" ]; do sleep 0.05; done; exit 0; fi; sleep 600'
    )
    handle = harness.create(script, completions=2, parallelism=1, env={"LOCKDIR": str(tmp_path)})

    def second_running() -> bool:
        ps = pods(harness.job(handle))
        return len(ps) == 2 and ps[1]["phase"] == "Running"

    until(second_running, what="the second pod")
    first = pods(harness.job(handle))[0]
    assert first["phase"] == "Succeeded"

    def first_pods_processes() -> list[psutil.Process]:
        return [p for p in harness.processes(handle) if p.environ().get(POD_ENV) == first["uid"]]

    until(lambda: not first_pods_processes(), timeout=10, what="the first pod's children")
    escaped = int((tmp_path / "escaped").read_text())
    assert not psutil.pid_exists(escaped) or psutil.Process(escaped).status() == "zombie"
    assert any(p.environ().get(POD_ENV) for p in harness.processes(handle))  # pod 2 still runs


def test_command_that_cannot_start_fails_the_pod(harness: Harness) -> None:
    run_id, secret, job = harness.shell_job("unused", backoff_limit=0)
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["/nonexistent/queuejob-bin"]
    handle = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    state = harness.backend.wait(handle, timeout_s=20)
    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    (failure,) = harness.backend.failure_details(handle)
    assert failure.exit_code == 128 and failure.reason == "StartError"
    assert "/nonexistent/queuejob-bin" in failure.log_tail


def test_adopt_same_run_conflict_for_another(harness: Harness) -> None:
    run_id, secret, job = harness.shell_job("sleep 600")
    first = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    supervisor = harness.job(first)["local"]["supervisor"]["pid"]

    again = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)

    assert again.adopted and again.uid == first.uid
    assert harness.job(first)["local"]["supervisor"]["pid"] == supervisor  # no second one
    found = harness.backend.find_job(namespace="default", name=first.name, run_id=run_id)
    assert found is not None and found.uid == first.uid and found.adopted
    assert harness.backend.find_job(namespace="default", name="t-missing", run_id=run_id) is None

    other_run, other_secret, other_job = harness.shell_job("true", name=first.name)
    with pytest.raises(JobConflict, match=first.name):
        harness.backend.create_or_adopt(secret=other_secret, job=other_job, run_id=other_run)
    with pytest.raises(JobConflict, match="delete"):
        harness.backend.find_job(namespace="default", name=first.name, run_id=other_run)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda j: j["spec"].update(completionMode="Indexed"), "completionMode"),
        (lambda j: j["spec"].update(suspend=True), "suspend"),
        (lambda j: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "Never"),
        (lambda j: j["spec"]["template"]["spec"]["containers"].append({}), "2 containers"),
        (lambda j: j["spec"]["template"]["spec"]["containers"][0].pop("command"), "command"),
        (lambda j: j["spec"].update(parallelism=-1), "parallelism"),
        (
            lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
            ),
            "configMapKeyRef",
        ),
        (
            lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}
            ),
            "Secret 'nope'",
        ),
    ],
)
def test_specs_the_local_backend_cannot_run_are_refused(
    harness: Harness, change: Any, match: str
) -> None:
    run_id, secret, job = harness.shell_job("true")
    change(job)
    with pytest.raises(InvalidInput, match=match):
        harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    ns_dir = harness.state_dir / "default"
    assert not list(ns_dir.glob("*.json")) if ns_dir.exists() else True
    assert not list((ns_dir / "secrets").glob("*.json")) if ns_dir.exists() else True


def test_wait_times_out_with_heartbeats(harness: Harness) -> None:
    handle = harness.create("sleep 600")
    updates: list[JobState] = []
    started = time.monotonic()
    with pytest.raises(JobTimeout, match=handle.name):
        harness.backend.wait(handle, timeout_s=0.8, on_update=updates.append, tick_s=0.1)
    assert 0.8 <= time.monotonic() - started < 3
    assert len(updates) >= 5  # a change or a tick at least every 0.1 s


def test_wait_raises_when_the_job_is_deleted(harness: Harness) -> None:
    handle = harness.create("sleep 600")
    until(lambda: harness.job(handle)["status"].get("active"), what="an active pod")
    timer = threading.Timer(
        0.3, harness.backend.delete_run, kwargs={"namespace": "default", "run_id": handle.run_id}
    )
    timer.start()
    try:
        with pytest.raises(KubeNotFound, match="deleted"):
            harness.backend.wait(handle, timeout_s=20)
    finally:
        timer.join()
    assert not harness.processes(handle)


def test_ttl_after_finished_removes_the_job(harness: Harness) -> None:
    handle = harness.create("true", extra_spec={"ttlSecondsAfterFinished": 1})
    assert harness.backend.wait(handle, timeout_s=20).phase is JobPhase.SUCCEEDED
    until(
        lambda: harness.backend.read_job(namespace="default", name=handle.name) is None,
        timeout=10,
        what="the TTL to remove the Job",
    )
    assert not list((harness.state_dir / "default" / "secrets").glob("*.json"))
    until(lambda: not harness.processes(handle), timeout=10, what="the supervisor to exit")


# --- processes outliving their parents --------------------------------------------------------

_CREATE_AND_HANG = """
import json, sys, time
from pathlib import Path
from queuejob.flows.adapters.local import LocalBackend
backend = LocalBackend(state_dir=Path(sys.argv[1]), grace_s=1.0)
spec = json.loads(sys.stdin.read())
handle = backend.create_or_adopt(secret=spec["secret"], job=spec["job"], run_id=spec["run_id"])
print(handle.name, flush=True)
time.sleep(600)
"""

_DELETE = """
import sys
from pathlib import Path
from queuejob.flows.adapters.local import LocalBackend
backend = LocalBackend(state_dir=Path(sys.argv[1]), grace_s=1.0)
print(backend.delete_run(namespace=sys.argv[2], run_id=sys.argv[3]))
"""


def _python(code: str, *args: str, stdin: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_delete_from_another_process_leaves_nothing(harness: Harness) -> None:
    # Pods with a child each (sh + sleep), so whole process groups must go.
    handle = harness.create("sleep 600 & sleep 600; wait", completions=3, parallelism=3)
    until(lambda: harness.job(handle)["status"].get("active") == 3, what="3 active pods")
    assert len(harness.processes(handle)) >= 3 * 2 + 2  # pods, their children, supervisor+wd

    proc = _python(_DELETE, str(harness.state_dir), "default", handle.run_id)
    out, _ = proc.communicate(timeout=30)

    assert proc.returncode == 0 and out.strip() == "1"
    assert harness.processes(handle) == []
    assert harness.backend.read_job(namespace="default", name=handle.name) is None
    ns_dir = harness.state_dir / "default"
    assert sorted(p.name for p in ns_dir.iterdir()) == ["secrets"]
    assert list((ns_dir / "secrets").iterdir()) == []
    assert harness.backend.delete_run(namespace="default", run_id=handle.run_id) == 0


def test_job_outlives_a_killed_creator_and_is_deleted_by_label(harness: Harness) -> None:
    run_id, secret, job = harness.shell_job("sleep 600", completions=2, parallelism=2)
    creator = _python(_CREATE_AND_HANG, str(harness.state_dir))
    assert creator.stdin is not None and creator.stdout is not None
    creator.stdin.write(json.dumps({"secret": secret, "job": job, "run_id": run_id}))
    creator.stdin.close()
    name = creator.stdout.readline().strip()
    assert name == job["metadata"]["name"]

    creator.send_signal(signal.SIGKILL)
    creator.wait(timeout=10)

    handle = harness.backend.find_job(namespace="default", name=name, run_id=run_id)
    assert handle is not None
    until(lambda: harness.job(handle)["status"].get("active") == 2, what="2 active pods")
    assert harness.processes(handle)  # like a Kubernetes Job, it runs on without its creator
    assert harness.backend.delete_run(namespace="default", run_id=run_id) == 1
    assert harness.processes(handle) == []


def test_killed_supervisor_takes_its_pods_along_and_is_replaced(
    harness: Harness, tmp_path: Path
) -> None:
    # The first pod leaves a marker and blocks with a child; a replacement pod finds the marker
    # and succeeds.
    script = 'if [ -e "$MARK" ]; then exit 0; fi; touch "$MARK"; sleep 600 & sleep 600; wait'
    handle = harness.create(script, backoff_limit=1, env={"MARK": str(tmp_path / "mark")})
    until(lambda: harness.job(handle)["status"].get("active") == 1, what="an active pod")
    first_pod = pods(harness.job(handle))[0]
    supervisor = harness.job(handle)["local"]["supervisor"]["pid"]
    pod_procs = [p for p in harness.processes(handle) if p.pid != supervisor]
    assert len(pod_procs) >= 3  # the pod's sh and sleep, its background sleep, the watchdog

    os.kill(supervisor, signal.SIGKILL)

    until(lambda: not harness.processes(handle), timeout=10, what="the pods to die")
    # The next wait finds the Job without a controller and starts one: the lost pod counts as
    # failed and a new pod finishes the Job.
    state = harness.backend.wait(handle, timeout_s=30)
    assert state.phase is JobPhase.SUCCEEDED
    job = harness.terminal(handle)
    assert job["local"]["supervisor"]["pid"] != supervisor
    assert (job["status"]["failed"], job["status"]["succeeded"]) == (1, 1)
    lost = pods(job)[0]
    assert lost["name"] == first_pod["name"] and lost["reason"] == "Lost"


def test_a_killed_watchdog_is_replaced(harness: Harness) -> None:
    handle = harness.create("sleep 600 & sleep 600; wait")
    until(lambda: harness.job(handle)["status"].get("active"), what="an active pod")
    first = harness.job(handle)["local"]["supervisor"]["watchdogPid"]

    os.kill(first, signal.SIGKILL)

    second = until(
        lambda: (
            (harness.job(handle)["local"]["supervisor"]["watchdogPid"] != first)
            and harness.job(handle)["local"]["supervisor"]["watchdogPid"]
        ),
        what="a new watchdog",
    )
    assert psutil.pid_exists(second)
    # The new watchdog does its job: the supervisor's death takes the pod's whole group along.
    os.kill(harness.job(handle)["local"]["supervisor"]["pid"], signal.SIGKILL)
    until(lambda: not harness.processes(handle), timeout=10, what="the pods to die")


def test_default_state_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUEJOB_STATE_DIR", str(tmp_path / "elsewhere"))
    assert LocalBackend().state_dir == tmp_path / "elsewhere"
    monkeypatch.delenv("QUEUEJOB_STATE_DIR")
    assert LocalBackend().state_dir == Path.home() / ".cache" / "queuejob" / "local-jobs"


def test_a_deleted_job_can_be_created_again_under_its_name(harness: Harness) -> None:
    run_id, secret, job = harness.shell_job("sleep 600")
    first = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
    until(lambda: harness.job(first)["status"].get("active"), what="an active pod")
    assert harness.backend.delete_run(namespace="default", run_id=run_id) == 1

    second = harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)

    assert not second.adopted and second.uid != first.uid
    until(lambda: harness.job(second)["status"].get("active"), what="the new Job's pod")
    assert harness.job(second)["metadata"]["uid"] == second.uid
