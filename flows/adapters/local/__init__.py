"""The local Job backend: runs a batch/v1 Job's pods as local processes, with Job semantics.

This is how queuejob runs with no cluster (``make demo``, a laptop, CI). It takes the same Secret
and Job dicts the manifest builder makes for Kubernetes and behaves like the Job controller, so the
flow's wait and caveat logic cannot tell the two backends apart:

- pods run the container's ``command`` + ``args`` with its ``env`` (literal values,
  ``secretKeyRef`` resolved from the run's Secret, ``fieldRef`` to the pod's name/namespace) and
  Kubernetes' ``$(VAR)`` expansion; ``queuejob worker ...`` runs as
  ``python -m queuejob.flows.worker ...`` with this interpreter;
- ``completions`` / ``parallelism`` as for a NonIndexed Job (completions unset: done when one pod
  has succeeded and all have ended, no new pod after a success), ``backoffLimit`` with an
  exponential pod back-off (``backoff_base_s * 2**(n-1)``, capped), ``activeDeadlineSeconds``
  (running pods are killed), ``ttlSecondsAfterFinished``;
- the status has the shape and the condition order of Kubernetes 1.31+ (``SuccessCriteriaMet`` then
  ``Complete``; ``FailureTarget`` then ``Failed``) with the same reasons and messages.
- ``podFailurePolicy`` as Kubernetes applies it to a failed pod (the first matching rule decides:
  ``FailJob`` fails the Job with reason ``PodFailurePolicy`` and Kubernetes' message, ``Ignore``
  keeps the pod out of ``failed``, ``Count`` or no match counts it) and ``podReplacementPolicy:
  Failed`` (no replacement while a pod terminates). The pods the backend itself stopped (those of
  a supervisor that went away) get the condition ``DisruptionTarget`` (reason
  ``DeletionByPodGC``), which queuejob's policy ignores;

How it is built. Each Job has a small supervisor process of its own (``python -m
queuejob.flows.adapters.local supervise <state file>``, detached from the caller), so the Job
outlives the flow's process just as a Kubernetes Job does. The supervisor is the only writer of
the Job's state file ``<state_dir>/<namespace>/<job>.json`` (the Job object plus a ``local``
section with pod pids, exit codes and back-off bookkeeping), replaced atomically on every change;
``wait`` polls it.
Pod output (stdout and stderr together, as ``kubectl logs`` shows it) goes to
``<job>.logs/<pod>.log``. Secrets are kept apart in ``secrets/<name>.json`` with mode 0600, and the
broker URL they hold is never written to a state file or a log line of ours; log tails handed out
are scrubbed of Secret values.

Nothing is left running:

- every process of a Job carries the environment markers ``QUEUEJOB_LOCAL_JOB_UID``,
  ``QUEUEJOB_LOCAL_RUN`` and (pods) ``QUEUEJOB_LOCAL_POD_UID``, so ``delete_run`` finds them from
  any process (on Linux through ``/proc``, also when the state file is gone) and stops them:
  SIGTERM to each process group, then SIGKILL after the grace period;
- every pod runs in its own process group (the container); when its main process ends, whatever
  it left behind is killed, in its group or not (the worker runs commands in a session of their
  own), as a container's processes die with it;
- pods get ``PR_SET_PDEATHSIG`` (Linux), and a watchdog process forked by the supervisor stops the
  Job's process groups when the supervisor dies (even by SIGKILL);
- an exclusive ``flock`` on ``<job>.lock``, held by the supervisor and its watchdog, guarantees one
  controller per Job; ``create_or_adopt`` and ``wait`` start a new supervisor when the old one is
  gone before the Job finished (pods it lost count as failed), like a restarted controller.

Differences from Kubernetes, on purpose: the image and scheduling fields are ignored; a missing
Secret or a command that cannot start fails the pod (``CreateContainerConfigError`` /
``StartError``) instead of leaving it pending; deletion waits until the processes are gone, whatever
the propagation policy.

Modules: ``backend`` (the API the flow calls), ``supervisor`` (one Job's controller; started as
``python -m queuejob.flows.adapters.local supervise``), ``pods`` (a pod's env and command line),
``spec`` (what is accepted of a Job and a Secret), ``state`` (the files and the lock), ``processes``
(``/proc``, signals, stopping what is left, the watchdog), ``common`` (constants, small helpers).
"""

from queuejob.flows.adapters.local.backend import LocalBackend
from queuejob.flows.adapters.local.common import (
    JOB_UID_ENV,
    POD_ENV,
    RUN_ENV,
    STATE_DIR_ENV,
    default_state_dir,
)

__all__ = [
    "JOB_UID_ENV",
    "POD_ENV",
    "RUN_ENV",
    "STATE_DIR_ENV",
    "LocalBackend",
    "default_state_dir",
]
