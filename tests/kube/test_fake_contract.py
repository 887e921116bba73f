"""The fake API server held to the recorded v1.32 traces (``tests/kube/traces``).

Each test replays a recorded exchange (the same method, path, headers and body) against the fake
and compares what can be compared: status codes, Status bodies (reason, message with names
substituted, details, causes), defaulted fields, key order, condition sequences, watch event
sequences and deletion behaviour. Timings are shorter (pod back-off 0.2 s) but orders are the
same. When the traces and the fake disagree, the traces win.

The traces are test data kept in the repository (``tests/kube/traces``, with their README).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakekube import FakeKubeServer
from tests.fakekube.rawhttp import Reply, WatchRecord, WatchRecorder, call, wait_until
from tests.kube import TRACES

pytestmark = pytest.mark.kube

SA_USER = "system:serviceaccount:default:queuejob-noperms"
SA_TOKEN = "sa-token-queuejob-noperms"
CONDITION_KEYS = ["type", "status", "lastProbeTime", "lastTransitionTime", "reason", "message"]


# --- trace access ------------------------------------------------------------------------------


def _traces_dir() -> Path:
    if not (TRACES / "README.md").is_file():
        pytest.fail(f"the recorded Kubernetes traces are missing from the checkout: {TRACES}")
    return TRACES


def exchange(name: str) -> dict[str, Any]:
    """One recorded request/response (``<name>.json``)."""
    return json.loads((_traces_dir() / f"{name}.json").read_text())  # type: ignore[no-any-return]


def body_text(name: str) -> str:
    """A recorded pod log body (``<name>.txt``)."""
    return (_traces_dir() / f"{name}.txt").read_text()


def watch_trace(name: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(header line, events, last line) of a recorded watch stream (``<name>.jsonl``)."""
    lines = [json.loads(x) for x in (_traces_dir() / f"{name}.jsonl").read_text().splitlines()]
    events = [x["event"] for x in lines[1:] if "event" in x]
    return lines[0], events, lines[-1]


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeKubeServer]:
    """A fake with a slow garbage collector, so a GET right after a DELETE is deterministic."""
    server = FakeKubeServer(backoff_base_s=0.2, gc_delay_s=1.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.pod_processes() == []


def send(
    fake: FakeKubeServer,
    ex: dict[str, Any],
    *,
    token: Any = "admin",
    subst: dict[str, str] | None = None,
    path: str | None = None,
) -> Reply:
    """Replay a recorded request (method, path, Content-Type, body) against the fake."""
    req = ex["request"]
    body = req["body"]
    if subst and body is not None:
        body = json.loads(substitute(json.dumps(body), subst))
    headers = {k: v for k, v in req["headers"].items() if k == "Content-Type"}
    return call(
        fake.url,
        req["method"],
        substitute(path or req["path"], subst or {}),
        token=fake.token if token == "admin" else token,
        body=json.dumps(body) if isinstance(body, (dict, list)) else body,
        headers=headers,
    )


def substitute(text: str, mapping: dict[str, str]) -> str:
    """Replace recorded names/uids with the fake's."""
    for old, new in mapping.items():
        text = text.replace(old, new)
    return text


def create_recorded(fake: FakeKubeServer, name: str, **kw: Any) -> dict[str, Any]:
    """Replay a recorded create and return the fake's object (asserting 201)."""
    reply = send(fake, exchange(name), **kw)
    assert reply.status == 201, reply.text
    return reply.json  # type: ignore[no-any-return]


def job_path(name: str, ns: str = "default") -> str:
    return f"/apis/batch/v1/namespaces/{ns}/jobs/{name}"


def get(fake: FakeKubeServer, path: str) -> Reply:
    return call(fake.url, "GET", path, token=fake.token)


def start_watch(fake: FakeKubeServer, path: str, token: Any = "admin") -> WatchRecorder:
    rec = WatchRecorder(fake.url, path, token=fake.token if token == "admin" else token)
    rec.start()
    rec.wait_open()
    return rec


def conditions_of(obj: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (c["type"], c["status"], c.get("reason", ""), c.get("message", ""))
        for c in (obj.get("status") or {}).get("conditions") or []
    ]


def condition_sequence(events: list[dict[str, Any]]) -> list[list[tuple[str, str, str, str]]]:
    """The distinct successive condition lists a Job went through."""
    out: list[list[tuple[str, str, str, str]]] = []
    for event in events:
        if event["type"] == "BOOKMARK":
            continue
        conds = conditions_of(event["object"])
        if not out or out[-1] != conds:
            out.append(conds)
    return out


def assert_status_omission_rules(events: list[dict[str, Any]]) -> None:
    """active/succeeded/failed omitted when 0; terminating, uncounted and ready always there."""
    for event in events:
        if event["type"] == "BOOKMARK":
            continue
        status = event["object"]["status"]
        if not status:
            continue
        for key in ("active", "succeeded", "failed"):
            assert status.get(key, 1) != 0, (key, status)
        for key in ("terminating", "uncountedTerminatedPods", "ready"):
            assert key in status, (key, status)
        for cond in status.get("conditions") or []:
            assert list(cond) == CONDITION_KEYS, cond
            assert cond["lastProbeTime"] == cond["lastTransitionTime"], cond


def strip_volatile(obj: Any, uid_map: dict[str, str]) -> Any:
    """Replace uids by placeholders so bodies from both servers compare."""
    return json.loads(substitute(json.dumps(obj), uid_map))


TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# --- discovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "s01-01-get-version",
        "s01-02-get-api",
        "s01-03-get-apis",
        "s01-04-get-apis-batch-v1",
        "s01-05-get-api-v1",
    ],
)
def test_discovery(fake: FakeKubeServer, name: str) -> None:
    ex = exchange(name)
    reply = send(fake, ex)
    want = ex["response"]["body"]
    got = reply.json
    assert reply.status == ex["response"]["status"] == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert list(got) == list(want)
    if name == "s01-01-get-version":
        assert got == want
    elif name == "s01-02-get-api":
        assert got["versions"] == want["versions"]
        assert [list(a) for a in got["serverAddressByClientCIDRs"]] == [
            list(a) for a in want["serverAddressByClientCIDRs"]
        ]
    elif name == "s01-03-get-apis":
        recorded = {g["name"]: g for g in want["groups"]}
        assert got["groups"]
        for group in got["groups"]:
            assert group == recorded[group["name"]]
    else:
        recorded = {r["name"]: r for r in want["resources"]}
        served = [r["name"] for r in got["resources"]]
        assert {"pods", "pods/log", "secrets", "namespaces"} <= set(served) or {
            "jobs",
            "jobs/status",
        } <= set(served)
        for resource in got["resources"]:
            assert resource == recorded[resource["name"]]


# --- creates: defaulting, metadata, key order -------------------------------------------------

CREATES = [
    "s02-01-create-secret",
    "s02-02-create-job",
    "s02-07-create-job-generateName-suspended",
    "s04-02-create-job-exit3",
    "s05-02-create-job-deadline3",
    "s06-06-create-name-63-chars",
    "s06-10-create-completions-0",
    "s07-bg-02-create-job",
    "s08-04-create-job-5-lines",
    "s09-02-create-job-completions3-parallelism3",
    "s11-02-create-job-completions6-parallelism2",
    # With a podFailurePolicy: podReplacementPolicy defaults to Failed (p01-p03), or is kept
    # as given (p04).
    "p01-01-create-job",
    "p02-01-create-job",
    "p03-01-create-job",
    "p04-01-create-job",
]


@pytest.mark.parametrize("name", CREATES)
def test_create_defaults(fake: FakeKubeServer, name: str) -> None:
    ex = exchange(name)
    reply = send(fake, ex)
    want = ex["response"]["body"]
    got = reply.json
    assert reply.status == ex["response"]["status"] == 201, reply.text
    assert list(got) == list(want)
    assert list(got["metadata"]) == list(want["metadata"])
    meta = got["metadata"]
    assert meta["namespace"] == "default"
    assert TIME_RE.match(meta["creationTimestamp"])
    assert int(meta["resourceVersion"]) > 0
    if "generateName" in want["metadata"]:
        assert re.fullmatch(
            re.escape(meta["generateName"]) + r"[bcdfghjklmnpqrstvwxz2456789]{5}", meta["name"]
        )
    names = {want["metadata"]["uid"]: "<uid>", want["metadata"]["name"]: "<name>"}
    mine = {meta["uid"]: "<uid>", meta["name"]: "<name>"}
    for key in [k for k in want if k not in ("metadata", "kind", "apiVersion")]:
        assert strip_volatile(got[key], mine) == strip_volatile(want[key], names), key
    # Key order inside the spec follows the Go structs, as the server writes it.
    if "spec" in want:
        assert list(got["spec"]) == list(want["spec"])
        tpl, want_tpl = got["spec"]["template"], want["spec"]["template"]
        assert list(tpl["spec"]) == list(want_tpl["spec"])
        assert [list(c) for c in tpl["spec"]["containers"]] == [
            list(c) for c in want_tpl["spec"]["containers"]
        ]
    assert [sorted(m) for m in meta["managedFields"]] == [
        sorted(m) for m in want["metadata"]["managedFields"]
    ]
    assert [(m["manager"], m["operation"]) for m in meta["managedFields"]] == [
        (m["manager"], m["operation"]) for m in want["metadata"]["managedFields"]
    ]
    # GET right after returns the same object (s02-03); the fake's controller is quicker than
    # the real one, so the status (and resourceVersion) may already have moved on.
    again = get(fake, f"{ex['request']['path'].split('?')[0]}/{meta['name']}")
    assert again.status == 200
    for key in [k for k in got if k != "status"]:
        if key == "metadata":
            assert {**again.json[key], "resourceVersion": "", "managedFields": []} == {
                **got[key],
                "resourceVersion": "",
                "managedFields": [],
            }
        else:
            assert again.json[key] == got[key], key


def test_patch_secret_owner_reference(fake: FakeKubeServer) -> None:
    secret = create_recorded(fake, "s02-01-create-secret")
    job = create_recorded(fake, "s02-02-create-job")
    ex = exchange("s02-04-patch-secret-ownerref-to-job")
    recorded_uid = ex["request"]["body"]["metadata"]["ownerReferences"][0]["uid"]
    reply = send(fake, ex, subst={recorded_uid: job["metadata"]["uid"]})
    want = ex["response"]["body"]
    got = reply.json
    assert reply.status == 200
    assert list(got["metadata"]) == list(want["metadata"])
    assert got["metadata"]["ownerReferences"] == strip_volatile(
        want["metadata"]["ownerReferences"], {recorded_uid: job["metadata"]["uid"]}
    )
    assert int(got["metadata"]["resourceVersion"]) > int(secret["metadata"]["resourceVersion"])
    assert got["data"] == want["data"] and got["type"] == want["type"]


# --- Status bodies -----------------------------------------------------------------------------


def _setup_job(fake: FakeKubeServer) -> dict[str, str]:
    job = create_recorded(fake, "s02-02-create-job")
    return {"8e72201e-07d7-4be4-8dec-655a683b3f25": job["metadata"]["uid"]}


def _setup_sa(fake: FakeKubeServer) -> dict[str, str]:
    fake.add_service_account(SA_TOKEN, SA_USER, set())
    return {}


def _setup_log_pod(fake: FakeKubeServer) -> dict[str, str]:
    create_recorded(fake, "s08-03-create-secret")
    create_recorded(fake, "s08-04-create-job-5-lines")
    pod = wait_until(lambda: fake.list_objects("pods", "default"), 5, "the log Job's pod")[0]
    return {"queuejob-0008-22kpd": pod["metadata"]["name"]}


def _setup_running_job(fake: FakeKubeServer) -> dict[str, str]:
    create_recorded(fake, "s11-01-create-secret")
    job = create_recorded(fake, "s11-02-create-job-completions6-parallelism2")
    return {"f9db5a22-01cc-43ce-94b1-a7c8cd850013": job["metadata"]["uid"]}


def _setup_stale_put(fake: FakeKubeServer) -> dict[str, str]:
    mapping = _setup_job(fake)
    current = get(fake, job_path("queuejob-0002")).json
    mapping['"resourceVersion": "282"'] = (
        f'"resourceVersion": "{int(current["metadata"]["resourceVersion"]) - 1}"'
    )
    return mapping


ERRORS: dict[str, tuple[Callable[[FakeKubeServer], dict[str, str]] | None, Any]] = {
    # name: (setup returning name substitutions, token: "admin" | None | other)
    "s06-01-get-missing-job-404": (None, "admin"),
    "s06-02-delete-missing-job-404": (None, "admin"),
    "s06-03-create-job-again-409": (_setup_job, "admin"),
    "s06-04-create-restartPolicy-Always-422": (None, "admin"),
    "s06-05-create-name-64-chars-422": (None, "admin"),
    "s06-07-create-name-uppercase-422": (None, "admin"),
    "s06-08-create-label-value-too-long-422": (None, "admin"),
    "s06-09-create-negative-parallelism-422": (None, "admin"),
    "s06-11-create-two-errors-422": (None, "admin"),
    "s06-12-create-container-without-image-422": (None, "admin"),
    "s06-14-create-job-in-missing-namespace-404": (None, "admin"),
    "s06-15-put-job-stale-resourceVersion-409": (_setup_stale_put, "admin"),
    "s06-16-patch-wrong-content-type-415": (_setup_job, "admin"),
    "s06-17-create-malformed-json-400": (None, "admin"),
    "s06-21-list-jobs-continue-garbage-400": (_setup_job, "admin"),
    "s06-22-get-jobs-bad-token-401": (None, "not-a-known-token"),
    "s06-23-get-jobs-no-token-403": (None, None),
    "s06-26-sa-list-jobs-403": (_setup_sa, SA_TOKEN),
    "s06-27-sa-create-job-403": (_setup_sa, SA_TOKEN),
    "s06-28-sa-get-job-403": (_setup_sa, SA_TOKEN),
    "s06-30-sa-get-pod-log-403": (_setup_sa, SA_TOKEN),
    "s07-bg-07-get-job-right-after-delete": (None, "admin"),
    "s07-bg-10-get-secret-after-gc-404": (None, "admin"),
    "s08-08-log-wrong-container-400": (_setup_log_pod, "admin"),
    "s08-09-log-missing-pod-404": (None, "admin"),
    "s11-11-merge-patch-completions-422": (_setup_running_job, "admin"),
    "s11-12-merge-patch-template-image-422": (_setup_running_job, "admin"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_status_body(fake: FakeKubeServer, name: str) -> None:
    setup, token = ERRORS[name]
    mapping = setup(fake) if setup else {}
    ex = exchange(name)
    reply = send(fake, ex, token=token, subst=mapping)
    want = json.loads(substitute(json.dumps(ex["response"]["body"]), mapping))
    got = reply.json
    assert reply.status == ex["response"]["status"], reply.text
    assert reply.headers["Content-Type"] == "application/json"
    assert list(got) == list(want)
    for key in ("kind", "apiVersion", "metadata", "status", "reason", "code"):
        assert got[key] == want[key], key
    if name == "s11-12-merge-patch-template-image-422":
        # The message embeds a Go struct dump of the whole template; compare its frame.
        pattern = (
            r'Job\.batch "queuejob-0011" is invalid: spec\.template: Invalid value: '
            r'core\.PodTemplateSpec\{.*Image:"other:2".*\}: field is immutable'
        )
        assert re.fullmatch(pattern, got["message"]), got["message"]
        assert re.fullmatch(pattern, want["message"])
        assert got["details"]["causes"][0]["field"] == "spec.template"
        assert [list(c) for c in got["details"]["causes"]] == [
            list(c) for c in want["details"]["causes"]
        ]
    else:
        assert got.get("message") == want.get("message")
        assert got.get("details") == want.get("details")
    for header in ("Warning", "X-Content-Type-Options"):
        assert reply.headers.get(header) == ex["response"]["headers"].get(header), header


# --- Job lifecycles: condition order, the two status writes, pod lifecycles ----------------------


def pod_signatures(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, ...]]]:
    """Each pod's deduplicated lifecycle: (event, phase, tracked, bound, deletion, owned).

    While a pod is being deleted its phase is not compared: the recording's kubelet did not
    always post a terminal phase before the final delete (see the traces' README).
    """
    out: dict[str, list[tuple[str, ...]]] = {}
    for event in events:
        if event["type"] in ("BOOKMARK", "ERROR"):
            continue
        obj = event["object"]
        meta = obj["metadata"]
        deleting = meta.get("deletionTimestamp")
        deletion = (
            "none"
            if not deleting
            else ("now" if meta.get("deletionGracePeriodSeconds") == 0 else "graceful")
        )
        state = (
            event["type"],
            "*" if deleting else str((obj.get("status") or {}).get("phase")),
            "tracked"
            if "batch.kubernetes.io/job-tracking" in (meta.get("finalizers") or [])
            else "-",
            "bound" if (obj.get("spec") or {}).get("nodeName") else "unbound",
            deletion,
            "owned" if meta.get("ownerReferences") else "orphan",
        )
        seq = out.setdefault(meta["name"], [])
        if not seq or seq[-1] != state:
            seq.append(state)
    return out


def _watch_path(recorded: str, rv: str) -> str:
    """The recorded watch path from our resourceVersion (``0`` keeps its meaning: "any")."""
    return re.sub(r"resourceVersion=[1-9]\d*", f"resourceVersion={rv}", recorded)


def _terminal(event: dict[str, Any]) -> bool:
    return any(
        c[0] in ("Complete", "Failed") and c[1] == "True" for c in conditions_of(event["object"])
    )


def run_recorded_job(
    fake: FakeKubeServer,
    secret: str,
    job: str,
    watch: str,
    pods_watch: str,
    *,
    until: Callable[[dict[str, Any]], bool] = _terminal,
    timeout: float = 20.0,
) -> tuple[dict[str, Any], WatchRecord, WatchRecord]:
    """Create the recorded Secret and Job, watch both like the recording, wait for ``until``."""
    create_recorded(fake, secret)
    created = create_recorded(fake, job)
    rv = created["metadata"]["resourceVersion"]
    job_watch = start_watch(fake, _watch_path(watch_trace(watch)[0]["watch_request"]["path"], rv))
    pod_watch = start_watch(
        fake, _watch_path(watch_trace(pods_watch)[0]["watch_request"]["path"], rv)
    )
    job_watch.wait_for(lambda e: e["type"] != "BOOKMARK" and until(e), timeout)
    return created, job_watch.stop(), pod_watch.stop()


LIFECYCLES = {
    "s03-job-watch-until-complete": (
        "s02-01-create-secret",
        "s02-02-create-job",
        "s03-pods-watch",
        "s02-05-get-job-at-end",
        "s02-06-list-pods-by-job-name-at-end",
    ),
    "s04-job-watch-until-failed": (
        "s04-01-create-secret",
        "s04-02-create-job-exit3",
        "s04-pods-watch",
        "s04-03-get-job-at-end",
        "s04-04-list-pods-at-end",
    ),
    "s05-job-watch-until-failed": (
        "s05-01-create-secret",
        "s05-02-create-job-deadline3",
        "s05-pods-watch",
        "s05-04-get-job-at-end",
        "s05-05-list-pods-3s-later",
    ),
}


@pytest.mark.parametrize("name", list(LIFECYCLES))
def test_job_lifecycle(fake: FakeKubeServer, name: str) -> None:
    secret, job, pods_watch, final, pods_final = LIFECYCLES[name]
    created, jobs, pods = run_recorded_job(fake, secret, job, name, pods_watch)
    header, want_events, _end = watch_trace(name)
    job_name = created["metadata"]["name"]

    # The stream: 200, chunked, from the create RV so only MODIFIED (no ADDED replay).
    assert jobs.status == header["status"] == 200 and jobs.headers["Transfer-Encoding"] == "chunked"
    got_events = jobs.of_type()
    assert {e["type"] for e in got_events} - {"BOOKMARK"} == {"MODIFIED"}
    assert condition_sequence(got_events) == condition_sequence(want_events)
    assert_status_omission_rules(got_events)

    # The first write after create sets the bookkeeping fields.
    first = got_events[0]["object"]["status"]
    assert {"startTime", "active", "terminating", "uncountedTerminatedPods", "ready"} <= set(first)

    # Interim condition in the write that still lists the last pod as uncounted; the terminal
    # one with the counts moved (success) or after the pods are gone (failure).
    spec = created["spec"]
    statuses = [e["object"]["status"] for e in got_events if e["type"] == "MODIFIED"]
    interim = next(s for s in statuses if s.get("conditions"))
    terminal = next(s for s in statuses if _terminal({"object": {"status": s}}))
    want_statuses = [e["object"]["status"] for e in want_events if e["type"] == "MODIFIED"]
    want_interim = next(s for s in want_statuses if s.get("conditions"))
    want_terminal = next(s for s in want_statuses if _terminal({"object": {"status": s}}))
    assert sorted(interim["uncountedTerminatedPods"]) == sorted(
        want_interim["uncountedTerminatedPods"]
    )
    assert interim.get("terminating") == want_interim.get("terminating")
    assert terminal["uncountedTerminatedPods"] == {} == want_terminal["uncountedTerminatedPods"]
    assert sorted(terminal) == sorted(want_terminal)
    if name.startswith("s03"):
        assert terminal["succeeded"] == spec["completions"] and "completionTime" in terminal
    else:
        assert "completionTime" not in terminal
        assert terminal["failed"] == want_terminal["failed"]
    if name.startswith("s04"):
        assert terminal["failed"] == spec["backoffLimit"] + 1

    # Final object: same status keys and conditions as recorded.
    got_final = get(fake, job_path(job_name)).json
    want_final = exchange(final)["response"]["body"]
    assert list(got_final["status"]) == list(want_final["status"])
    assert conditions_of(got_final) == conditions_of(want_final)
    assert [
        (m["manager"] != "OpenAPI-Generator", m.get("subresource"))
        for m in got_final["metadata"]["managedFields"]
    ] == [
        (m["manager"] != "OpenAPI-Generator", m.get("subresource"))
        for m in want_final["metadata"]["managedFields"]
    ]

    # Pods: every lifecycle the fake produced is one the recording shows.
    _h, want_pod_events, _e = watch_trace(pods_watch)
    recorded = {tuple(s) for s in pod_signatures(want_pod_events).values()}
    got_sigs = pod_signatures(pods.of_type())
    assert len(got_sigs) == len(pod_signatures(want_pod_events))
    for pod, sig in got_sigs.items():
        assert tuple(sig) in recorded, (pod, sig)

    # The pods at the end: same count, phases and object shape (s02-06, s04-04, s05-05).
    want_list = exchange(pods_final)["response"]["body"]
    got_list = wait_until(
        lambda: (
            (
                r := get(
                    fake, f"/api/v1/namespaces/default/pods?labelSelector=job-name%3D{job_name}"
                ).json
            )["items"].__len__()
            == len(want_list["items"])
            and r
        ),
        5,
        "the recorded number of pods at the end",
    )
    assert list(got_list) == list(want_list) and list(got_list["metadata"]) == ["resourceVersion"]
    assert sorted(p["status"]["phase"] for p in got_list["items"]) == sorted(
        p["status"]["phase"] for p in want_list["items"]
    )
    for got_pod, want_pod in zip(got_list["items"], want_list["items"], strict=True):
        _assert_pod_shape(got_pod, want_pod)


def _assert_pod_shape(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    assert list(got["metadata"]) == list(want["metadata"])
    assert sorted(got["metadata"]["labels"]) == sorted(want["metadata"]["labels"])
    assert got["metadata"]["generateName"] == got["metadata"]["ownerReferences"][0]["name"] + "-"
    assert [list(r) for r in got["metadata"]["ownerReferences"]] == [
        list(r) for r in want["metadata"]["ownerReferences"]
    ]
    # Admission and defaults; the recording's fork adds a 4th projected source (README).
    want_spec = copy.deepcopy(want["spec"])
    want_spec["volumes"][0]["projected"]["sources"] = [
        s
        for s in want_spec["volumes"][0]["projected"]["sources"]
        if (s.get("configMap") or {}).get("name") != "openshift-service-ca.crt"
    ]
    got_spec = copy.deepcopy(got["spec"])
    volume, want_volume = got_spec["volumes"][0]["name"], want_spec["volumes"][0]["name"]
    assert re.fullmatch(r"kube-api-access-[bcdfghjklmnpqrstvwxz2456789]{5}", volume)
    assert strip_volatile(got_spec, {volume: "<vol>"}) == strip_volatile(
        want_spec, {want_volume: "<vol>"}
    )
    status, want_status = got["status"], want["status"]
    assert list(status) == list(want_status)
    assert [(c["type"], c["status"], c.get("reason")) for c in status["conditions"]] == [
        (c["type"], c["status"], c.get("reason")) for c in want_status["conditions"]
    ]
    for got_cs, want_cs in zip(
        status["containerStatuses"], want_status["containerStatuses"], strict=True
    ):
        assert list(got_cs) == list(want_cs)
        got_term, want_term = got_cs["state"]["terminated"], want_cs["state"]["terminated"]
        assert list(got_term) == list(want_term)
        assert (got_term["exitCode"], got_term["reason"]) == (
            want_term["exitCode"],
            want_term["reason"],
        )
        assert got_cs["containerID"] == f"fake://{got['metadata']['uid']}-{got_cs['name']}"


def test_logs_of_a_finished_pod(fake: FakeKubeServer) -> None:
    """s08-01/02: the log of a ``sleep 1; echo done`` pod, whole and with tailLines."""
    _created, _jobs, _pods = run_recorded_job(
        fake,
        "s02-01-create-secret",
        "s02-02-create-job",
        "s03-job-watch-until-complete",
        "s03-pods-watch",
    )
    pod = fake.list_objects("pods", "default")[0]["metadata"]["name"]
    for name in ("s08-01-log-finished-pod", "s08-02-log-finished-pod-tailLines2"):
        ex = exchange(name)
        reply = send(fake, ex, subst={"queuejob-0002-5fl6p": pod})
        assert reply.status == 200 and reply.chunked
        assert reply.headers["Content-Type"] == ex["response"]["headers"]["Content-Type"]
        assert reply.text == ex["response"]["body_text"] == body_text("s08-01-log-finished-pod")


def test_logs_with_secret_env_tail_and_container(fake: FakeKubeServer) -> None:
    """s08-05..07: a 6-line log (the secretKeyRef value included), tailLines=2, container."""
    mapping = _setup_log_pod(fake)
    pod = mapping["queuejob-0008-22kpd"]
    wait_until(
        lambda: (
            (fake.get_object("pods", "default", pod) or {}).get("status", {}).get("phase")
            == "Succeeded"
        ),
        5,
        "the log pod to succeed",
    )
    for name, text in (
        ("s08-05-log-multiline-pod", body_text("s08-05-log-multiline-pod")),
        ("s08-06-log-multiline-pod-tailLines2", body_text("s08-06-log-multiline-pod-tailLines2")),
        (
            "s08-07-log-container-param",
            exchange("s08-07-log-container-param")["response"]["body_text"],
        ),
    ):
        reply = send(fake, exchange(name), subst=mapping)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain"
        assert reply.text == text


# --- deletion: Background, Foreground, no policy (orphan) ----------------------------------------


def _event_shape(event: dict[str, Any]) -> tuple[str, tuple[str, ...], bool]:
    meta = event["object"]["metadata"]
    return event["type"], tuple(meta.get("finalizers") or ()), bool(meta.get("deletionTimestamp"))


def _dedup(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


DELETES = {
    "s07-bg": "Background",
    "s07-fg": "Foreground",
    "s07-nb": None,
}


@pytest.mark.parametrize("case", list(DELETES))
def test_delete_propagation(fake: FakeKubeServer, case: str) -> None:
    secret = create_recorded(fake, f"{case}-01-create-secret")
    job = create_recorded(fake, f"{case}-02-create-job")
    name, uid = job["metadata"]["name"], job["metadata"]["uid"]
    rv = job["metadata"]["resourceVersion"]
    recorded_job = exchange(f"{case}-02-create-job")["response"]["body"]["metadata"]
    mapping = {recorded_job["uid"]: uid}
    if case != "s07-nb":
        reply = send(fake, exchange(f"{case}-03-patch-secret-ownerref"), subst=mapping)
        assert reply.status == 200
    header = watch_trace(
        f"{case}-job-watch" if case == "s07-nb" else f"{case}-job-watch-through-deleted"
    )[0]
    job_watch = start_watch(fake, _watch_path(header["watch_request"]["path"], rv))
    pods_header = watch_trace(f"{case}-pods-watch")[0]
    pod_watch = start_watch(fake, _watch_path(pods_header["watch_request"]["path"], rv))
    secret_watch = None
    if case != "s07-nb":
        sh = watch_trace(f"{case}-secret-watch")[0]
        secret_watch = start_watch(fake, _watch_path(sh["watch_request"]["path"], rv))

    # Before the delete: 2 Running pods (sleep 600), or 2 Succeeded ones for the nb case.
    before = exchange(
        f"{case}-04-list-pods-before-delete"
        if case != "s07-nb"
        else "s07-nb-03-list-pods-before-delete"
    )["response"]["body"]
    want_phases = sorted(p["status"]["phase"] for p in before["items"])
    pods_path = f"/api/v1/namespaces/default/pods?labelSelector=job-name%3D{name}"
    wait_until(
        lambda: (
            sorted(p["status"]["phase"] for p in get(fake, pods_path).json["items"]) == want_phases
        ),
        10,
        f"pods {want_phases}",
    )
    if case == "s07-nb":
        job_watch.wait_for(_terminal, 10)

    ex = exchange(
        f"{case}-06-delete-job-background"
        if case == "s07-bg"
        else f"{case}-06-delete-job-foreground"
        if case == "s07-fg"
        else f"{case}-04-delete-job-no-body"
    )
    reply = send(fake, ex)
    want = ex["response"]["body"]
    assert reply.status == 200
    assert reply.headers.get("Warning") == ex["response"]["headers"].get("Warning")
    got = reply.json
    assert list(got) == list(want)
    if case == "s07-bg":
        assert got == strip_volatile(
            want, {want["details"]["name"]: name, want["details"]["uid"]: uid}
        )
    else:
        meta, want_meta = got["metadata"], want["metadata"]
        assert list(meta) == list(want_meta)
        for key in ("deletionGracePeriodSeconds", "finalizers", "generation"):
            assert meta[key] == want_meta[key], key
        assert TIME_RE.match(meta["deletionTimestamp"])

    # Right after: 404 at once (bg), or still there with the finalizer (fg, nb).
    right_after = exchange(
        f"{case}-07-get-job-right-after-delete"
        if case != "s07-nb"
        else "s07-nb-05-get-job-right-after-delete"
    )
    now = get(fake, job_path(name))
    assert now.status == right_after["response"]["status"]
    if now.status == 200:
        assert (
            now.json["metadata"]["finalizers"]
            == right_after["response"]["body"]["metadata"]["finalizers"]
        )

    # Then the garbage collector: gone (bg, fg), or the pods kept without owners (nb).
    wait_until(lambda: get(fake, job_path(name)).status == 404, 10, "the Job to go")
    if case == "s07-nb":
        kept = exchange("s07-nb-07-list-pods-4s-later")["response"]["body"]["items"]
        pods = wait_until(
            lambda: [
                p
                for p in get(fake, pods_path).json["items"]
                if "ownerReferences" not in p["metadata"]
            ],
            5,
            "the pods to lose their ownerReferences",
        )
        assert len(pods) == len(kept) == 2
        for pod, want_pod in zip(pods, kept, strict=True):
            assert list(pod["metadata"]) == list(want_pod["metadata"])
            assert pod["metadata"]["labels"]["job-name"] == name
    else:
        wait_until(lambda: not get(fake, pods_path).json["items"], 10, "the pods to go")
        gone = exchange(f"{case}-10-get-secret-after-gc-404")
        secret_reply = get(fake, f"/api/v1/namespaces/default/secrets/{secret['metadata']['name']}")
        assert secret_reply.status == 404
        assert secret_reply.json == strip_volatile(
            gone["response"]["body"],
            {gone["response"]["body"]["details"]["name"]: secret["metadata"]["name"]},
        )
        wait_until(lambda: not fake.pod_processes(), 5, "the pod processes to be killed")

    # The watches: the recorded shape of the Job's, the pods' and the Secret's streams.
    time.sleep(0.1)
    jobs = [e for e in job_watch.stop().of_type() if e["type"] != "BOOKMARK"]
    job_trace = f"{case}-job-watch" if case == "s07-nb" else f"{case}-job-watch-through-deleted"
    want_jobs = [e for e in watch_trace(job_trace)[1] if e["type"] != "BOOKMARK"]

    def deletion_steps(events: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...], bool]]:
        """The Job's events from the DELETE on: finalizers and deletionTimestamp, DELETED."""
        shapes = _dedup([_event_shape(e) for e in events])
        return [s for s in shapes if s[0] == "DELETED" or s[1] or s[2]]

    assert deletion_steps(jobs) == deletion_steps(want_jobs)
    pods_events = pod_watch.stop().of_type()
    _h, want_pod_events, _e = watch_trace(f"{case}-pods-watch")
    recorded = {tuple(s[-3:]) for s in pod_signatures(want_pod_events).values()}
    for pod, sig in pod_signatures(pods_events).items():
        assert tuple(sig[-3:]) in recorded, (pod, sig)
    if secret_watch is not None:
        secret_events = [e["type"] for e in secret_watch.stop().of_type()]
        want_secret = [e["type"] for e in watch_trace(f"{case}-secret-watch")[1]]
        assert secret_events == want_secret == ["MODIFIED", "DELETED"]


def test_delete_suspended_job_without_body(fake: FakeKubeServer) -> None:
    """s02-07/08/09: a Job suspended at create; DELETE without a body orphans (with Warning)."""
    job = create_recorded(fake, "s02-07-create-job-generateName-suspended")
    name = job["metadata"]["name"]
    want_get = exchange("s02-08-get-suspended-job-after-2s")["response"]["body"]
    status = wait_until(
        lambda: get(fake, job_path(name)).json["status"] or None, 5, "the suspended status"
    )
    assert list(status) == list(want_get["status"])
    assert conditions_of({"status": status}) == conditions_of(want_get)
    assert "startTime" not in status and not fake.list_objects("pods", "default")
    ex = exchange("s02-09-delete-suspended-job-no-body")
    reply = send(fake, ex, path=job_path(name))
    want = ex["response"]["body"]
    assert reply.status == 200
    assert reply.headers["Warning"] == ex["response"]["headers"]["Warning"]
    assert list(reply.json["metadata"]) == list(want["metadata"])
    for key in ("finalizers", "deletionGracePeriodSeconds", "generation"):
        assert reply.json["metadata"][key] == want["metadata"][key]
    wait_until(lambda: get(fake, job_path(name)).status == 404, 5, "the orphaned Job to go")


def test_blocked_pod_keeps_the_job_running(fake: FakeKubeServer, tmp_path: Path) -> None:
    """s09: completions 3, parallelism 3, one pod blocks: active 1, succeeded 2, no new pod."""
    create_recorded(fake, "s09-01-create-secret")
    ex = exchange("s09-02-create-job-completions3-parallelism3")
    body = copy.deepcopy(ex["request"]["body"])
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "LOCK_DIR", "value": str(tmp_path)})
    reply = call(fake.url, "POST", ex["request"]["path"], token=fake.token, body=body)
    assert reply.status == 201
    name = reply.json["metadata"]["name"]
    want = exchange("s09-03-get-job-after-5s")["response"]["body"]["status"]
    status = wait_until(
        lambda: (
            (s := get(fake, job_path(name)).json["status"]).get("succeeded") == 2
            and s["ready"] == 1
            and s
        ),
        10,
        "2 succeeded and 1 running",
    )
    assert list(status) == list(want)
    assert {k: v for k, v in status.items() if k != "startTime"} == {
        k: v for k, v in want.items() if k != "startTime"
    }
    time.sleep(0.6)  # s09-05: unchanged later, and no pod was added
    assert get(fake, job_path(name)).json["status"] == status
    assert len(fake.list_objects("pods", "default")) == 3
    deleted = send(fake, exchange("s09-06-delete-job-background"))
    assert deleted.status == 200 and deleted.json["status"] == "Success"
    wait_until(lambda: not fake.list_objects("pods", "default"), 10, "the pods to go (s09-07)")


def test_completions_zero_completes_without_pods(fake: FakeKubeServer) -> None:
    """s06-10/13: completions 0 goes straight to SuccessCriteriaMet + Complete, no pods."""
    job = create_recorded(fake, "s06-10-create-completions-0")
    want = exchange("s06-13-get-completions-0-job-after-3s")["response"]["body"]
    got = wait_until(
        lambda: (
            (j := get(fake, job_path(job["metadata"]["name"])).json)
            and _terminal({"object": j})
            and j
        ),
        5,
        "Complete",
    )
    assert list(got["status"]) == list(want["status"])
    assert conditions_of(got) == conditions_of(want)
    assert not fake.list_objects("pods", "default")


# --- list and watch semantics ------------------------------------------------------------------


def _suspended_jobs(fake: FakeKubeServer, count: int) -> list[str]:
    body = copy.deepcopy(exchange("s02-02-create-job")["request"]["body"])
    body["spec"]["suspend"] = True
    names = []
    for i in range(count):
        body["metadata"]["name"] = f"queuejob-w{i}"
        reply = call(
            fake.url, "POST", "/apis/batch/v1/namespaces/default/jobs", token=fake.token, body=body
        )
        assert reply.status == 201
        names.append(body["metadata"]["name"])
    for n in names:
        wait_until(lambda n=n: get(fake, job_path(n)).json["status"], 5, "suspended status")
    return names


def test_list_shape_and_pagination(fake: FakeKubeServer) -> None:
    """s10-01 and s10-09: items without kind/apiVersion; limit gives continue + remaining."""
    _suspended_jobs(fake, 4)
    want = exchange("s10-01-list-jobs")["response"]["body"]
    got = get(fake, "/apis/batch/v1/namespaces/default/jobs").json
    assert list(got) == list(want) and list(got["metadata"]) == list(want["metadata"])
    assert [list(i) for i in got["items"]] == [list(i) for i in want["items"]]
    ex = exchange("s10-09-list-jobs-limit1")
    page = send(fake, ex).json
    want_page = ex["response"]["body"]
    assert list(page["metadata"]) == list(want_page["metadata"])
    assert page["metadata"]["remainingItemCount"] == want_page["metadata"]["remainingItemCount"]
    token = page["metadata"]["continue"]
    decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    recorded = want_page["metadata"]["continue"]
    want_decoded = json.loads(base64.urlsafe_b64decode(recorded + "=" * (-len(recorded) % 4)))
    assert list(decoded) == list(want_decoded) and decoded["v"] == want_decoded["v"]
    names = [i["metadata"]["name"] for i in page["items"]]
    while token:
        nxt = get(fake, f"/apis/batch/v1/namespaces/default/jobs?limit=1&continue={token}").json
        names += [i["metadata"]["name"] for i in nxt["items"]]
        token = nxt["metadata"].get("continue")
    assert names == [i["metadata"]["name"] for i in got["items"]]


WATCHES = [
    "s10-02-watch-from-list-rv-timeout3",
    "s10-03-watch-from-list-rv-timeout3-bookmarks",
    "s10-04-watch-no-rv-timeout2",
    "s10-05-watch-rv0-timeout2",
    "s10-06-watchlist-sendInitialEvents-timeout3",
    "s10-07-pods-watch-labelselector-nomatch-timeout3",
    "s10-08-watch-no-rv-bookmarks-timeout3",
    "s10-10-watch-param-True-timeout2",
    "s10-11-watch-param-1-timeout2",
]


@pytest.mark.parametrize("name", WATCHES)
def test_watch_semantics(fake: FakeKubeServer, name: str) -> None:
    """s10: initial events, bookmarks, timeoutSeconds and the watch flag (timeouts cut to 1 s)."""
    names = _suspended_jobs(fake, 4)
    list_rv = get(fake, "/apis/batch/v1/namespaces/default/jobs").json["metadata"][
        "resourceVersion"
    ]
    header, want_events, end = watch_trace(name)
    path = _watch_path(header["watch_request"]["path"], list_rv)
    recorder = start_watch(fake, re.sub(r"timeoutSeconds=\d+", "timeoutSeconds=1", path))
    recorder.join(timeout=5)
    got = recorder.record
    assert got.status == header["status"] == 200
    assert got.headers["Transfer-Encoding"] == "chunked"
    assert got.clean_end is True and "cleanly" in end["end"]
    assert 0.9 <= (got.ended or 0) <= 3.0, got.ended
    types = [e["type"] for e in got.of_type()]
    want_types = [e["type"] for e in want_events]
    if "ADDED" in want_types:
        assert [e["object"]["metadata"]["name"] for e in got.of_type("ADDED")] == names
        assert [t for t in types if t != "ADDED"] == [t for t in want_types if t != "ADDED"]
    else:
        assert types == want_types
    for got_bm, want_bm in zip(
        got.of_type("BOOKMARK"), [e for e in want_events if e["type"] == "BOOKMARK"], strict=True
    ):
        rv = got_bm["object"]["metadata"]["resourceVersion"]
        assert int(rv) >= int(list_rv)
        assert got_bm == strip_volatile(
            want_bm, {want_bm["object"]["metadata"]["resourceVersion"]: rv}
        )
    for event in got.of_type("ADDED"):
        assert list(event["object"]) == ["kind", "apiVersion", "metadata", "spec", "status"]


def test_watch_from_an_evicted_resource_version(fake: FakeKubeServer) -> None:
    """s06-18b: HTTP 200 and one ERROR event (410 Expired), then the stream ends."""
    small = FakeKubeServer(watch_cache_size=5)
    small.start()
    try:
        name = _suspended_jobs(small, 1)[0]
        for i in range(8):
            patch = {"metadata": {"annotations": {"churn": str(i)}}}
            reply = call(
                small.url,
                "PATCH",
                job_path(name),
                token=small.token,
                body=patch,
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert reply.status == 200
        header, want_events, end = watch_trace("s06-18b-watch-jobs-resourceVersion-1-after-churn")
        rec = start_watch(
            small,
            header["watch_request"]["path"].replace("timeoutSeconds=10", "timeoutSeconds=5"),
            token=small.token,
        )
        rec.join(timeout=5)
        got = rec.record
        assert got.status == 200 and got.clean_end is True and "cleanly" in end["end"]
        assert len(got.events) == len(want_events) == 1
        event, want = got.events[0][1], want_events[0]
        assert event["type"] == want["type"] == "ERROR"
        pattern = r"too old resource version: 1 \((\d+)\)"
        assert re.fullmatch(pattern, want["object"]["message"])
        match = re.fullmatch(pattern, event["object"]["message"])
        assert match and int(match.group(1)) > 1
        assert {**event["object"], "message": ""} == {**want["object"], "message": ""}
        assert got.ended is not None and got.ended < 1.0
    finally:
        small.stop()


def test_watch_replays_a_young_cache(fake: FakeKubeServer) -> None:
    """s06-18a/s06-19: an RV still in the cache replays the history, creations included."""
    names = _suspended_jobs(fake, 2)
    deleted = call(
        fake.url,
        "DELETE",
        job_path(names[0]),
        token=fake.token,
        body={"propagationPolicy": "Background"},
    )
    assert deleted.status == 200
    header, want_events, _end = watch_trace("s06-18a-watch-jobs-resourceVersion-1-young-cache")
    rec = start_watch(
        fake, header["watch_request"]["path"].replace("timeoutSeconds=5", "timeoutSeconds=1")
    )
    rec.join(timeout=5)
    got = rec.record.of_type()
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in got]
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    for events in (got, want_events):
        first_seen: dict[str, str] = {}
        for e in events:
            first_seen.setdefault(e["object"]["metadata"]["name"], e["type"])
        assert set(first_seen.values()) == {"ADDED"}
    assert [e["type"] for e in got if e["object"]["metadata"]["name"] == names[0]][-1] == "DELETED"
    assert "DELETED" in [e["type"] for e in want_events]


def test_list_at_an_exact_old_resource_version(fake: FakeKubeServer) -> None:
    """s06-20: LIST resourceVersion=1&resourceVersionMatch=Exact: the (empty) past."""
    _suspended_jobs(fake, 1)
    ex = exchange("s06-20-list-jobs-resourceVersion-1-exact")
    reply = send(fake, ex)
    assert reply.status == 200 and reply.json == ex["response"]["body"]


def test_watch_forbidden_is_a_plain_response(fake: FakeKubeServer) -> None:
    """s06-29: a 403 on a watch is a normal, non-chunked Status response."""
    fake.add_service_account(SA_TOKEN, SA_USER, set())
    header, _events, end = watch_trace("s06-29-sa-watch-jobs-403")
    rec = start_watch(fake, header["watch_request"]["path"], token=SA_TOKEN)
    rec.join(timeout=5)
    assert rec.record.status == header["status"] == 403
    assert "Content-Length" in rec.record.headers and "non-chunked" in end["end"]
    want = json.loads(
        (_traces_dir() / "s06-29-sa-watch-jobs-403.jsonl").read_text().splitlines()[1]
    )["non_stream_body"]
    assert json.loads(rec.record.body) == want


def test_self_subject_access_review(fake: FakeKubeServer) -> None:
    """s06-31: a limited service account asks whether it may create Jobs: no."""
    fake.add_service_account(SA_TOKEN, SA_USER, {("get", "jobs")})
    ex = exchange("s06-31-sa-selfsubjectaccessreview")
    reply = send(fake, ex, token=SA_TOKEN)
    want = ex["response"]["body"]
    assert reply.status == 201
    assert reply.json["status"] == want["status"] and reply.json["spec"] == want["spec"]
    assert (reply.json["kind"], reply.json["apiVersion"]) == (want["kind"], want["apiVersion"])


# --- PATCH on a running Job: parallelism, suspend, resume, immutable fields ----------------------


def test_patch_parallelism_suspend_resume(fake: FakeKubeServer) -> None:
    """s11: the generation bumps, a 3rd pod, Suspended True then False, startTime reset."""
    create_recorded(fake, "s11-01-create-secret")
    job = create_recorded(fake, "s11-02-create-job-completions6-parallelism2")
    mapping = {"f9db5a22-01cc-43ce-94b1-a7c8cd850013": job["metadata"]["uid"]}
    header, want_job_events, _end = watch_trace("s11-job-watch")
    job_watch = start_watch(
        fake, _watch_path(header["watch_request"]["path"], job["metadata"]["resourceVersion"])
    )
    pods_header = watch_trace("s11-pods-watch")[0]
    pods_watch = start_watch(
        fake, _watch_path(pods_header["watch_request"]["path"], job["metadata"]["resourceVersion"])
    )

    def status() -> dict[str, Any]:
        return get(fake, job_path("queuejob-0011")).json["status"]  # type: ignore[no-any-return]

    wait_until(lambda: status().get("ready") == 2, 10, "2 running pods (s11-03)")
    steps = [
        (
            "s11-04-merge-patch-parallelism-3",
            "s11-05-get-job-parallelism-3",
            lambda s: s.get("active") == 3 and s.get("ready") == 3,
        ),
        (
            "s11-06-merge-patch-suspend-true",
            "s11-07-get-job-suspended",
            lambda s: s.get("terminating") == 0 and s.get("conditions") and not s.get("active"),
        ),
        (
            "s11-09-strategic-merge-patch-suspend-false",
            "s11-10-get-job-resumed",
            lambda s: s.get("ready") == 3,
        ),
    ]
    for patch_name, get_name, ready in steps:
        ex = exchange(patch_name)
        reply = send(fake, ex, subst=mapping)
        want = ex["response"]["body"]
        assert reply.status == 200, reply.text
        assert reply.json["metadata"]["generation"] == want["metadata"]["generation"]
        assert reply.json["spec"]["parallelism"] == want["spec"]["parallelism"]
        assert reply.json["spec"]["suspend"] == want["spec"]["suspend"]
        got = wait_until(lambda ready=ready: (s := status()) and ready(s) and s, 10, get_name)
        want_status = exchange(get_name)["response"]["body"]["status"]
        assert list(got) == list(want_status), get_name
        assert conditions_of({"status": got}) == conditions_of({"status": want_status})
        if get_name == "s11-07-get-job-suspended":
            wait_until(lambda: not fake.list_objects("pods", "default"), 10, "s11-08: no pods")
    for name in ("s11-11-merge-patch-completions-422", "s11-12-merge-patch-template-image-422"):
        assert send(fake, exchange(name), subst=mapping).status == 422
    deleted = send(fake, exchange("s11-13-delete-job-background"))
    assert deleted.status == 200 and deleted.json["status"] == "Success"
    job_watch.wait_for(lambda e: e["type"] == "DELETED", 10)
    wait_until(lambda: not fake.list_objects("pods", "default"), 10, "the pods to go")
    time.sleep(0.1)

    def steps_of(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return _dedup(
            [
                (
                    e["type"],
                    e["object"]["metadata"]["generation"],
                    tuple((c[0], c[1], c[2]) for c in conditions_of(e["object"])),
                )
                for e in events
                if e["type"] != "BOOKMARK"
            ]
        )

    assert steps_of(job_watch.stop().of_type()) == steps_of(want_job_events)
    pod_events = pods_watch.stop().of_type()
    want_pod_events = watch_trace("s11-pods-watch")[1]
    for kind in ("ADDED", "DELETED"):
        assert len([e for e in pod_events if e["type"] == kind]) == len(
            [e for e in want_pod_events if e["type"] == kind]
        ), kind
