"""A fake Kubernetes API server for tests, held to the recorded traces in ``tests/kube/traces``.

    from tests.fakekube import FakeKubeServer

    with FakeKubeServer(backoff_base_s=0.2) as fake:
        fake.write_kubeconfig(tmp_path / "kubeconfig")
        ...  # the real kubernetes client against fake.url

What it serves: discovery (``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/batch/v1``),
namespaces, Secrets, Pods (``log``, ``status``, ``eviction``), batch/v1 Jobs (``status``),
watches, and SelfSubjectAccessReview. What runs behind it: a Job controller with the 1.31+
condition order (``legacy_conditions=True`` for the older one), ``podFailurePolicy`` and
``podReplacementPolicy``, a garbage collector, and a kubelet that runs each pod's command as a
local process (and keeps the pod conditions it does not own, such as the ``DisruptionTarget`` an
eviction adds). Pytest fixtures live in ``tests.fakekube.pytest_plugin``.

Not emulated: Indexed Jobs' per-index accounting (FailIndex), successPolicy, PodDisruptionBudgets,
``restartPolicy: OnFailure`` restarts (treated like Never), image entrypoints (a container needs a
``command``), server-side apply, ConfigMaps, more than one container per pod (only the first runs).
"""

from tests.fakekube.server import FakeKubeServer

__all__ = ["FakeKubeServer"]
