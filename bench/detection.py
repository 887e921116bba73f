"""Figure 3: completion detection, from the last pod's exit to the wait returning.

A Job of two pods; each pod sleeps a while, writes ``time.time()`` to a file named after itself
and exits at once (``os._exit``), so the file holds the moment its process ended. The latency is
the moment ``wait()`` returned minus the later of the two. The pods' sleep is drawn at random
(the same draw for queuejob and the baseline) so the Job ends at any phase of a poll interval.

Measured on the fake Kubernetes API server (`tests.fakekube`, through the real ``kubernetes``
client and `KubeBackend`'s watch) and on the local backend. The baseline polls the Job's status
every 5 s, prefect-kubernetes' ``interval_seconds`` default, and stops at the first decisive
condition.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import BenchError, Context, FigureResult, rounds, say
from queuejob.flows.core.backend import JobBackend, JobHandle
from queuejob.flows.core.job_status import JobState, job_state
from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, secret_name

KEY = "detection"
TITLE = "Completion detection: last pod's exit to the wait returning"

TARGET_LATENCY_S = 0.5
POLL_INTERVAL_S = 5.0  # prefect-kubernetes' KubernetesJob.interval_seconds default
NAMESPACE = "default"
# The pod: sleep, record the time, exit at once (no interpreter teardown after the stamp).
POD_SCRIPT = (
    "import os, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "path = os.path.join(sys.argv[1], os.environ['POD_NAME'])\n"
    "with open(path + '.tmp', 'w') as fh:\n"
    "    fh.write(repr(time.time()))\n"
    "os.replace(path + '.tmp', path)\n"
    "os._exit(0)\n"
)
# The Secret the Job's env refers to; the pods never connect anywhere.
UNUSED_BROKER_URL = "amqp://bench:unused@127.0.0.1:1/%2F"


def _manifests(run_id: str, stamps: Path, delay_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = JobSpec(
        image="localhost/queuejob:bench",
        command=("true",),
        name_prefix="bench-detect",
        namespace=NAMESPACE,
        parallelism=2,
        backoff_limit=0,
    )
    job = build_job(spec, run_id=run_id, queue="bench-detect", completions=2)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = [sys.executable, "-c", POD_SCRIPT, str(stamps), f"{delay_s:.3f}"]
    secret = build_secret(
        namespace=NAMESPACE,
        name=secret_name(job["metadata"]["name"]),
        run_id=run_id,
        broker_url=UNUSED_BROKER_URL,
    )
    return secret, job


def _last_exit(stamps: Path) -> float:
    files = [p for p in stamps.iterdir() if not p.name.endswith(".tmp")]
    if len(files) != 2:
        raise BenchError(f"expected 2 pod time stamps, found {len(files)} in {stamps}")
    return max(float(p.read_text()) for p in files)


def _poll(read_state: Callable[[], JobState], timeout_s: float) -> JobState:
    """The baseline waiter: read the status, sleep the poll interval, repeat."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state()
        if state.phase.decided:
            return state
        if time.monotonic() > deadline:
            raise BenchError("the 5 s poll did not see the Job decided in time")
        time.sleep(POLL_INTERVAL_S)


def measure(
    backend: JobBackend,
    read_job: Callable[[JobHandle], dict[str, Any]],
    workdir: Path,
    delay_s: float,
    *,
    poll: bool,
) -> float:
    """Create the Job, wait for it (the backend's wait, or the 5 s poll) and return the
    seconds from the last pod's exit to the wait returning."""
    run_id = str(uuid.uuid4())
    stamps = workdir / run_id[:8]
    stamps.mkdir()
    secret, job = _manifests(run_id, stamps, delay_s)
    try:
        handle = backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
        if poll:
            state = _poll(lambda: job_state(read_job(handle)), timeout_s=60)
        else:
            state = backend.wait(handle, timeout_s=60)
        returned = time.time()
        if state.phase.value != "Succeeded":
            raise BenchError(f"the detection Job ended {state.describe()}")
        return returned - _last_exit(stamps)
    finally:
        backend.delete_run(namespace=NAMESPACE, run_id=run_id)


@contextlib.contextmanager
def fake_kube_backend(
    workdir: Path,
) -> Iterator[tuple[JobBackend, Callable[[JobHandle], dict[str, Any]]]]:
    """A `KubeBackend` on a fresh fake API server, and a status reader for the poll."""
    from kubernetes.client import BatchV1Api

    from queuejob.flows.adapters.kube import KubeBackend
    from tests.fakekube import FakeKubeServer

    fake = FakeKubeServer()
    fake.start()
    try:
        kubeconfig = fake.write_kubeconfig(workdir / "kubeconfig")
        backend = KubeBackend.from_config(kubeconfig=str(kubeconfig))
        batch = BatchV1Api(backend.api_client)

        def read(handle: JobHandle) -> dict[str, Any]:
            # Raw JSON (_preload_content=False): the typed models would reject unknown fields.
            resp: Any = batch.read_namespaced_job_status(
                handle.name, handle.namespace, _preload_content=False, _request_timeout=10
            )
            data: dict[str, Any] = json.loads(resp.data)
            return data

        yield backend, read
    finally:
        fake.stop()


@contextlib.contextmanager
def local_backend(
    workdir: Path,
) -> Iterator[tuple[JobBackend, Callable[[JobHandle], dict[str, Any]]]]:
    """A `LocalBackend` with its own state directory, and a status reader for the poll."""
    from queuejob.flows.adapters.local import LocalBackend

    backend = LocalBackend(state_dir=workdir / "local-jobs")

    def read(handle: JobHandle) -> dict[str, Any]:
        job = backend.read_job(namespace=handle.namespace, name=handle.name)
        if job is None:
            raise BenchError(f"Job {handle.name} vanished from the local backend")
        return job

    yield backend, read


def run(ctx: Context) -> FigureResult:
    """Both backends; in each run queuejob's wait and the 5 s poll see the same pod sleep."""
    fig = FigureResult(key=KEY, number=3, title=TITLE, runs=ctx.runs)
    fig.params = {"pods": 2, "poll_interval_s": POLL_INTERVAL_S, "pod_sleep_s": "uniform 0.5-5.5"}
    rng = random.Random(20240603)
    setups = (
        ("kube", "fake Kubernetes API", fake_kube_backend),
        ("local", "local backend", local_backend),
    )
    for key, label, setup in setups:
        ours = fig.new_series(f"{key}_wait", f"{label}: queuejob's wait (watch)", "s")
        base = fig.new_series(f"{key}_poll", f"{label}: 5 s status poll", "s")
        work = ctx.scratch(f"{KEY}-{key}")
        with setup(work) as (backend, read):
            for i in rounds(ctx, f"{KEY} ({label})"):
                delay = rng.uniform(0.5, 5.5)
                # Alternate which waiter goes first, so neither always meets a warmer machine.
                order = (False, True) if i % 2 else (True, False)
                for poll in order:
                    latency = measure(backend, read, work, delay, poll=poll)
                    (base if poll else ours).add(latency)
                    say(f"  {'5 s poll' if poll else 'wait()'}: {latency * 1000:.0f} ms")
        fig.ratio(f"{label}: poll / wait", f"{key}_poll", f"{key}_wait")
        fig.target(
            f"detection latency, {label}",
            ours.median,
            "<=",
            TARGET_LATENCY_S,
            "s",
            measured="queuejob's wait",
        )
    return fig
