"""Loading the API client: a prefect-kubernetes block's kubeconfig, in-cluster, or KUBECONFIG."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.config.config_exception import ConfigException

from queuejob.flows.adapters.kube.common import kube_config
from queuejob.flows.core.errors import (
    ConfigError,
)

# --- configuration -----------------------------------------------------------------------------


def load_api_client(
    *,
    cluster_config: Mapping[str, Any] | None = None,
    context: str | None = None,
    kubeconfig: str | None = None,
) -> ApiClient:
    """An API client from the first configuration found.

    Order: ``cluster_config`` (the ``config`` dict of a prefect-kubernetes
    ``KubernetesClusterConfig`` block, with ``context`` its ``context_name``); else in-cluster
    service-account config; else ``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``. An
    explicitly given ``cluster_config`` or ``kubeconfig`` that cannot be loaded is an error, not a
    reason to try the next source. Raises `ConfigError` naming every source tried.
    """
    if cluster_config is not None:
        try:
            client: ApiClient = kube_config.new_client_from_config_dict(
                dict(cluster_config), context=context, persist_config=False
            )
        except ConfigException as exc:
            raise ConfigError(
                f"the Kubernetes cluster config block could not be loaded: {exc}; check the "
                "block's config (a kubeconfig as a dict) and its context name"
            ) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # No str(exc): a malformed dict may echo a token back.
            raise ConfigError(
                "the Kubernetes cluster config block is not a usable kubeconfig "
                f"({type(exc).__name__}); save a complete kubeconfig in the block"
            ) from None
        return client
    if kubeconfig is not None:
        return _from_kubeconfig(kubeconfig, context, explicit=True)

    tried = ["a KubernetesClusterConfig / KubernetesCredentials block (none given)"]
    configuration = kubernetes.client.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        tried.append(f"in-cluster service account ({exc})")
    else:
        return ApiClient(configuration)

    path = os.environ.get("KUBECONFIG") or "~/.kube/config"
    if _any_kubeconfig_exists(path):
        return _from_kubeconfig(path, context, explicit=False)
    where = f"$KUBECONFIG={path}" if os.environ.get("KUBECONFIG") else "~/.kube/config"
    tried.append(f"kubeconfig {where} (no such file)")
    raise ConfigError(
        "no Kubernetes configuration found; tried: "
        + "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
        + ". Pass a KubernetesClusterConfig or KubernetesCredentials block, run the flow inside "
        "the cluster, or set KUBECONFIG"
    )


def _any_kubeconfig_exists(paths: str) -> bool:
    return any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p)


def _from_kubeconfig(path: str, context: str | None, *, explicit: bool) -> ApiClient:
    if explicit and not _any_kubeconfig_exists(path):
        raise ConfigError(f"kubeconfig {path} does not exist; pass the path of a kubeconfig file")
    try:
        client: ApiClient = kube_config.new_client_from_config(
            config_file=path, context=context, persist_config=False
        )
    except ConfigException as exc:
        raise ConfigError(
            f"kubeconfig {path} could not be loaded: {exc}; check its current context"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        raise ConfigError(
            f"kubeconfig {path} is not a usable kubeconfig ({type(exc).__name__}); check the file"
        ) from None
    return client
