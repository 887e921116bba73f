"""Constants shared by the Kubernetes backend's modules."""

from __future__ import annotations

import http.client
import re
from typing import Any, TypeVar

import kubernetes
import urllib3

# The config loaders are untyped; one Any-typed alias keeps that out of the typed code below.
kube_config: Any = kubernetes.config

T = TypeVar("T")

RBAC_HINT = "deployments/k8s/rbac.yaml"
# A single back-off step never waits longer than this, whatever Retry-After says.
MAX_BACKOFF_S = 8.0
# Extra read time granted to a watch beyond its timeoutSeconds, so the server's clean close (not
# our socket timeout) normally ends it, while a silent dead connection still cannot hang us.
WATCH_READ_SLACK_S = 5.0
# A watch stream open this long before it dropped counts as healthy (resets the failure count).
HEALTHY_STREAM_S = 1.0

FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,  # MaxRetryError, ProtocolError, ReadTimeoutError, ...
    http.client.HTTPException,
    OSError,  # ConnectionResetError, socket.timeout, ...
)
