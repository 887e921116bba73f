"""The fake API server's Job controller and Eviction API held to the recorded 1.32 traces with a
podFailurePolicy (``tests/kube/traces/p01``-``p04``; README there).

Every recorded Job carries queuejob's two rules: FailJob on the worker container's exit 2,
Ignore on the pod condition DisruptionTarget. The traces' pods ran under the project's kubelet
stand-in, which (then) dropped DisruptionTarget in its terminal status write, so p02 shows the
evicted pod counted; a real kubelet keeps the condition, and so does the fake's: there the
evicted pod is ignored. That one difference is asserted as such.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakekube import FakeKubeServer
from tests.fakekube.rawhttp import WatchRecord, WatchRecorder, wait_until
from tests.kube.test_fake_contract import (
    _watch_path,
    assert_status_omission_rules,
    condition_sequence,
    create_recorded,
    exchange,
    get,
    job_path,
    pod_signatures,
    send,
    start_watch,
    watch_trace,
)

pytestmark = pytest.mark.kube

EVICTED = ("DisruptionTarget", "True", "EvictionByEvictionAPI", "Eviction API: evicting")


@pytest.fixture
def fake() -> Iterator[FakeKubeServer]:
    server = FakeKubeServer(backoff_base_s=0.2, gc_delay_s=0.2, kill_grace_s=2.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.pod_processes() == []


def _terminal(event: dict[str, Any]) -> bool:
    conds = (event["object"].get("status") or {}).get("conditions") or []
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conds)


def _run(
    fake: FakeKubeServer, scenario: str, *, subst: dict[str, str] | None = None
) -> tuple[dict[str, Any], Any, Any]:
    """Create the scenario's recorded Job (its command changed by ``subst``), watching the Job
    and its pods as the recording did; return (created Job, job watch, pods watch)."""
    created = create_recorded(fake, f"{scenario}-01-create-job", subst=subst)
    rv = created["metadata"]["resourceVersion"]
    header, _, _ = watch_trace(f"{scenario}-job-watch-until-finished")
    pods_header, _, _ = watch_trace(f"{scenario}-pods-watch")
    jobs = start_watch(fake, _watch_path(header["watch_request"]["path"], rv))
    pods = start_watch(fake, _watch_path(pods_header["watch_request"]["path"], rv))
    return created, jobs, pods


def _stop_when_settled(jobs: WatchRecorder, pods: WatchRecorder, count: int) -> tuple[Any, Any]:
    """Stop both watches once the pods' watch has seen ``count`` pods each reach its end (no
    longer tracked by the Job, or deleted): pod events may trail the Job's last write."""

    def settled() -> bool:
        sigs = pod_signatures(pods.record.of_type())
        return len(sigs) == count and all(
            s[-1][0] == "DELETED" or (s[-1][1] in ("Succeeded", "Failed") and s[-1][2] == "-")
            for s in sigs.values()
        )

    wait_until(settled, 10, f"{count} pods to settle in the pods' watch")
    return jobs.stop(), pods.stop()


def _normalised(seq: list[list[tuple[str, str, str, str]]]) -> list[list[tuple[str, ...]]]:
    """Condition sequences with the pod names in messages replaced (they are generated)."""
    return [
        [tuple(re.sub(r"default/[-a-z0-9]+", "default/<pod>", x) for x in c) for c in conds]
        for conds in seq
    ]


def _statuses(record: WatchRecord) -> list[dict[str, Any]]:
    return [e["object"]["status"] for e in record.of_type("MODIFIED")]


def _pod_conditions(event: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (c["type"], c["status"], c.get("reason", ""), c.get("message", ""))
        for c in (event["object"].get("status") or {}).get("conditions") or []
    ]


@pytest.mark.parametrize("scenario", ["p01", "p03"])
def test_failjob_on_exit_2_and_other_exits_counted(fake: FakeKubeServer, scenario: str) -> None:
    created, jobs, pods = _run(fake, scenario)
    jobs.wait_for(lambda e: e["type"] == "MODIFIED" and _terminal(e), 20)
    _, want_pod_events, _ = watch_trace(f"{scenario}-pods-watch")
    jobs_rec, pods_rec = _stop_when_settled(jobs, pods, len(pod_signatures(want_pod_events)))
    _, want_events, _ = watch_trace(f"{scenario}-job-watch-until-finished")

    got = jobs_rec.of_type()
    assert _normalised(condition_sequence(got)) == _normalised(condition_sequence(want_events))
    assert_status_omission_rules(got)
    interim = next(s for s in _statuses(jobs_rec) if s.get("conditions"))
    terminal = _statuses(jobs_rec)[-1]
    want = [e["object"]["status"] for e in want_events if e["type"] == "MODIFIED"]
    want_interim = next(s for s in want if s.get("conditions"))
    assert sorted(interim["uncountedTerminatedPods"]) == ["failed"]
    assert sorted(interim) == sorted(want_interim)
    assert sorted(terminal) == sorted(want[-1]) and "completionTime" not in terminal
    assert terminal["failed"] == want[-1]["failed"]  # p01: 1, no retry; p03: backoffLimit + 1
    if scenario == "p01":
        # The message names the pod that exited 2: the Job's only one.
        (pod,) = fake.list_objects("pods", "default")
        message = interim["conditions"][0]["message"]
        assert message == (
            f"Container worker for pod default/{pod['metadata']['name']} failed with exit code "
            "2 matching FailJob rule at index 0"
        )

    recorded = {tuple(s) for s in pod_signatures(want_pod_events).values()}
    got_sigs = pod_signatures(pods_rec.of_type())
    assert len(got_sigs) == len(pod_signatures(want_pod_events))
    for pod_name, sig in got_sigs.items():
        assert tuple(sig) in recorded, (pod_name, sig)
    want_list = exchange(f"{scenario}-10-list-pods-at-end")["response"]["body"]
    name = created["metadata"]["name"]
    got_list = get(fake, f"/api/v1/namespaces/default/pods?labelSelector=job-name%3D{name}").json
    assert sorted(p["status"]["phase"] for p in got_list["items"]) == sorted(
        p["status"]["phase"] for p in want_list["items"]
    )
    final = get(fake, job_path(name)).json
    want_final = exchange(f"{scenario}-09-get-job-at-end")["response"]["body"]
    assert list(final["status"]) == list(want_final["status"])


def _first_pod_blocks(tmp_path: Path, *, old: str) -> dict[str, str]:
    """Substitution for a recorded command: the first pod blocks until stopped, the
    replacement finds the mark and succeeds at once (the recording slept 8 s in both)."""
    mark = tmp_path / "mark"
    return {old: f"[ -e {mark} ] && echo done && exit 0; touch {mark}; sleep 30 & wait"}


def test_an_evicted_pod_is_ignored_and_replaced(fake: FakeKubeServer, tmp_path: Path) -> None:
    subst = _first_pod_blocks(tmp_path, old="sleep 8 & wait; echo done")
    created, jobs, pods = _run(fake, "p02", subst=subst)
    name = created["metadata"]["name"]
    running = pods.wait_for(
        lambda e: (e["object"].get("status") or {}).get("phase") == "Running", 10
    )
    pod = running["object"]["metadata"]["name"]

    ex = exchange("p02-02-evict-running-pod")
    reply = send(fake, ex, subst={"pfp-evicted-cxp4d": pod})
    assert reply.status == ex["response"]["status"] == 201
    assert reply.json == ex["response"]["body"]

    jobs.wait_for(lambda e: e["type"] == "MODIFIED" and _terminal(e), 20)
    jobs_rec, pods_rec = _stop_when_settled(jobs, pods, 2)
    _, want_events, _ = watch_trace("p02-job-watch-until-finished")
    _, want_pod_events, _ = watch_trace("p02-pods-watch")

    # The apiserver's part, as recorded: DisruptionTarget added (last), then a graceful delete.
    evicted = [e for e in pods_rec.of_type() if e["object"]["metadata"]["name"] == pod]
    want_evicted = [
        e for e in want_pod_events if e["object"]["metadata"]["name"] == "pfp-evicted-cxp4d"
    ]
    first = next(e for e in evicted if EVICTED in _pod_conditions(e))
    want_first = next(e for e in want_evicted if EVICTED in _pod_conditions(e))
    assert _pod_conditions(first)[-1] == _pod_conditions(want_first)[-1] == EVICTED
    assert not first["object"]["metadata"].get("deletionTimestamp")
    deleting = next(e for e in evicted if e["object"]["metadata"].get("deletionTimestamp"))
    assert deleting["object"]["metadata"]["deletionGracePeriodSeconds"] == 30
    # The kubelet's terminal write keeps the condition (the recording's stand-in lost it).
    stopped = next(e for e in evicted if e["object"]["status"].get("phase") == "Failed")
    assert EVICTED in _pod_conditions(stopped)
    want_stopped = next(e for e in want_evicted if e["object"]["status"].get("phase") == "Failed")
    assert EVICTED not in _pod_conditions(want_stopped), "the recorded stand-in defect"
    assert (
        stopped["object"]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        == want_stopped["object"]["status"]["containerStatuses"][0]["state"]["terminated"][
            "exitCode"
        ]
    )

    # The Job: the same conditions as recorded, but the evicted pod ignored, not counted.
    assert condition_sequence(jobs_rec.of_type()) == condition_sequence(want_events)
    assert_status_omission_rules(jobs_rec.of_type())
    assert all("failed" not in s for s in _statuses(jobs_rec))
    assert all(not s["uncountedTerminatedPods"].get("failed") for s in _statuses(jobs_rec))
    want_final = [e["object"]["status"] for e in want_events if e["type"] == "MODIFIED"][-1]
    assert want_final["failed"] == 1  # the recording, with the condition lost
    final = get(fake, job_path(name)).json["status"]
    assert final["succeeded"] == 1 and "failed" not in final
    # Two pods, as recorded; the evicted one gone once its finalizer was removed.
    assert len(pod_signatures(pods_rec.of_type())) == len(pod_signatures(want_pod_events)) == 2
    assert pod_signatures(pods_rec.of_type())[pod][-1][0] == "DELETED"


def test_replacement_waits_until_the_deleted_pod_has_failed(
    fake: FakeKubeServer, tmp_path: Path
) -> None:
    # The recorded command traps SIGTERM and takes 3 s to stop; 1 s here (the fake's kill
    # grace is 2 s), so the pod is seen terminating before it fails.
    subst = _first_pod_blocks(tmp_path, old="sleep 8 & wait; echo done")
    subst["trap 'sleep 3; exit 143' TERM"] = "trap 'sleep 1; exit 143' TERM"
    created, jobs, pods = _run(fake, "p04", subst=subst)
    name = created["metadata"]["name"]
    running = pods.wait_for(
        lambda e: (e["object"].get("status") or {}).get("phase") == "Running", 10
    )
    first = running["object"]["metadata"]["name"]
    ex = exchange("p04-02-delete-running-pod")
    reply = send(fake, ex, subst={"replace-failed-psfzt": first})
    assert reply.status == 200
    assert reply.json["metadata"]["deletionGracePeriodSeconds"] == 5

    jobs.wait_for(lambda e: e["type"] == "MODIFIED" and _terminal(e), 20)
    jobs_rec, pods_rec = _stop_when_settled(jobs, pods, 2)
    _, want_events, _ = watch_trace("p04-job-watch-until-finished")
    assert condition_sequence(jobs_rec.of_type()) == condition_sequence(want_events)
    assert_status_omission_rules(jobs_rec.of_type())
    # terminating 1 and nothing active while the old pod stops, as recorded (t=2.055).
    assert any(s["terminating"] == 1 and "active" not in s for s in _statuses(jobs_rec)), _statuses(
        jobs_rec
    )
    # The replacement came only after the old pod reached Failed (a plain delete counts).
    events = pods_rec.of_type()
    failed_at = next(
        i
        for i, e in enumerate(events)
        if e["object"]["metadata"]["name"] == first
        and e["object"]["status"].get("phase") == "Failed"
    )
    added = [i for i, e in enumerate(events) if e["type"] == "ADDED"]
    assert len(added) == 2 and added[1] > failed_at
    final = get(fake, job_path(name)).json["status"]
    want_final = exchange("p04-09-get-job-at-end")["response"]["body"]["status"]
    assert (final["failed"], final["succeeded"]) == (want_final["failed"], want_final["succeeded"])


def test_eviction_of_a_missing_pod_is_404(fake: FakeKubeServer) -> None:
    ex = exchange("p02-02-evict-running-pod")
    reply = send(fake, ex, subst={"pfp-evicted-cxp4d": "nope"})
    assert reply.status == 404
    assert reply.json["message"] == 'pods "nope" not found'


def test_a_policy_needs_restart_policy_never(fake: FakeKubeServer) -> None:
    body = json.loads(json.dumps(exchange("p01-01-create-job")["request"]["body"]))
    body["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    reply = send(
        fake,
        {"request": {**exchange("p01-01-create-job")["request"], "body": body}},
    )
    assert reply.status == 422
    assert 'only "Never" is supported when podFailurePolicy is specified' in reply.json["message"]
