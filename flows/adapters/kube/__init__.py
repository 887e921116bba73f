"""The Kubernetes backend: create or adopt the run's Secret and Job, watch it, explain, delete.

This adapter is the only place that talks to the Kubernetes API (the official sync client,
``kubernetes>=37,<38``). It sends plain camelCase dict bodies and reads plain dicts back
(``_preload_content=False`` + ``json.loads``), so the client's typed models never see fields they
do not know, and every library exception leaves here translated into a
``queuejob.flows.core.errors`` type:

- 429, 5xx and connection errors -> `KubeUnavailable` (a `RetryableError`);
- 401 -> `ConfigError` (the credentials are wrong, not the RBAC);
- 403 -> `KubeForbidden` naming the verb, the resource and the namespace;
- 404 -> `KubeNotFound` (a missing namespace says so);
- 422 -> `KubeInvalid` quoting the server's causes (field: message);
- anything else -> `KubeError`.

Retry policy. The flow's tasks retry `RetryableError` with Prefect's back-off; on top of that every
API call here is retried a few times (``retries``, exponential back-off from ``retry_base_s``,
honouring ``Retry-After``) when it fails with a `RetryableError`. That is safe because every call
this backend makes is idempotent by design: reads and deletes trivially; the ownerReference patch
sets the same value again; and a create that is repeated after a lost answer meets a 409 for an
object carrying this run's label, which is adopted. A short burst of 500s or 429s therefore costs
seconds inside one task attempt instead of a whole task retry (which would redo the create and lose
the watch position). Permanent errors are never retried.

Waiting. `KubeBackend.wait` lists the Job once (its state and a resourceVersion), then a background
thread watches it (``fieldSelector=metadata.name=<job>``), resuming from the last resourceVersion
seen (events and BOOKMARKs), with ``timeoutSeconds`` on each watch, a re-list when the server
answers 410 Gone (as an ERROR event in an HTTP 200 stream), and a reconnect when a stream drops.
Events reach the caller's thread through a queue, so a decisive condition is seen within
milliseconds of its write, and the caller gets a heartbeat every ``tick_s`` to poll the broker.
A second watch follows the Job's pods (label ``controller-uid``) for what the Job's status
does not say: the pods Kubernetes disrupted (``DisruptionTarget``), reported on
``JobState.disruptions``; its failure is logged and does not end the wait.

Server versions. `KubeBackend.server_features` reads ``/version`` once and says whether the
server keeps ``podFailurePolicy`` (1.26+) and ``podReplacementPolicy`` (1.29+); the flow builds
the Job accordingly, and a create whose answer lacks a field that was sent is logged.

Secrets: the broker URL travels only in the Secret body; it never appears in a message, a log line
or an exception raised here (client-side validation errors are re-raised without their inputs).

Modules: ``backend`` (the API the flow calls), ``watch`` (the watch thread), ``errors`` (API
errors as ``queuejob.flows.core.errors`` types), ``config`` (loading the API client), ``common``.
"""

from queuejob.flows.adapters.kube.backend import KubeBackend
from queuejob.flows.adapters.kube.config import load_api_client
from queuejob.flows.adapters.kube.errors import KubeOp, error_from_api_exception, error_from_status
from queuejob.flows.adapters.kube.watch import WatchStats

__all__ = [
    "KubeBackend",
    "KubeOp",
    "WatchStats",
    "error_from_api_exception",
    "error_from_status",
    "load_api_client",
]
