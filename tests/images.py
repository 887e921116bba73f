"""What a node's image pulls do, for the two kubelet stand-ins (the fake API server's and the
real control plane's): the states and messages a real kubelet writes for an image.

- An image reference the container runtime cannot parse waits in ``InvalidImageName`` for ever
  (the kubelet never retries it): ``Failed to apply default image tag "...": couldn't parse image
  reference "...": invalid reference format``. The grammar is the distribution project's
  (``reference.ParseNormalizedNamed``), which is stricter than queuejob's own check.
- An image a `PullFailure` rule matches cannot be pulled: each attempt reports ``ErrImagePull``
  (the runtime's "not found"), then ``ImagePullBackOff`` (``Back-off pulling image "..."``) until
  the next attempt, the back-off doubling as a kubelet's does; phase ``Pending`` throughout. With
  ``imagePullPolicy: Never`` such an image is not on the node: ``ErrImageNeverPull``.
- A rule with ``for_s`` lets the pull succeed at the first attempt after that long (a registry's
  rate limit, a pull secret created late); with ``pods`` only the first N pods pulling the image
  fail (a node that cannot reach the registry, beside ones that can).

Every other image is on the node. Standard library only: the real control plane's stand-in runs
as a program of its own.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from dataclasses import dataclass, field

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)(?::{_TAG})?(?:@{_DIGEST})?$",
    re.ASCII,
)
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


def reference_error(image: str) -> str | None:
    """The kubelet's message for an image reference it cannot parse (``InvalidImageName``), or
    None for a good one."""
    prefix = (
        f'Failed to apply default image tag "{image}": couldn\'t parse image reference '
        f'"{image}": invalid reference format'
    )
    if not image:
        return prefix
    if _HEX64.match(image):
        return f"{prefix}: cannot specify 64-byte hexadecimal strings"
    m = _REFERENCE.match(image)
    if m is None:
        lowered = image.lower()
        if lowered != image and _REFERENCE.match(lowered) is not None:
            return f"{prefix}: repository name must be lowercase"
        return prefix
    if len(m.group("name")) > 255:
        return f"{prefix}: repository name must not be more than 255 characters"
    return None


def pull_error_message(image: str) -> str:
    """What a container runtime answers for an image its registry does not have."""
    return (
        f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed '
        f'to resolve reference "{image}": {image}: not found'
    )


def backoff_message(image: str) -> str:
    """The kubelet's waiting message between two pull attempts."""
    return f'Back-off pulling image "{image}"'


def never_pull_message(image: str) -> str:
    """The kubelet's message for an image that is not on the node under ``Never``."""
    return f'Container image "{image}" is not present with pull policy of Never'


@dataclass(frozen=True)
class PullFailure:
    """Images matching ``pattern`` (shell-style, fnmatch) cannot be pulled; after ``for_s``
    seconds (from a pod's first attempt) they can; only the first ``pods`` pods fail (None:
    every pod)."""

    pattern: str
    for_s: float | None = None
    pods: int | None = None

    def matches(self, image: str) -> bool:
        """True when the rule is about this image."""
        return fnmatch.fnmatchcase(image, self.pattern)


@dataclass
class _PodPull:
    first: float
    attempts: int = 0
    failed_at: float = 0.0
    next_attempt: float = 0.0


@dataclass(frozen=True)
class PullState:
    """What a pod's container shows now: ``ready`` (the image is there: start it), or a
    waiting ``reason`` and ``message``; ``wake_at`` is when to look again (None: never, the
    state cannot change by itself)."""

    ready: bool
    reason: str | None = None
    message: str | None = None
    wake_at: float | None = None


@dataclass
class Puller:
    """A node's image pulls (thread-safe). ``backoff_s`` is the first back-off between two
    attempts (a kubelet's is 10 s), doubling up to ``backoff_max_s`` (300 s)."""

    failures: tuple[PullFailure, ...] = ()
    backoff_s: float = 10.0
    backoff_max_s: float = 300.0
    _pods: dict[str, _PodPull] = field(default_factory=dict)
    _assigned: dict[int, set[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _rule(self, uid: str, image: str) -> PullFailure | None:
        for i, rule in enumerate(self.failures):
            if not rule.matches(image):
                continue
            if rule.pods is None:
                return rule
            chosen = self._assigned.setdefault(i, set())
            if uid in chosen:
                return rule
            if len(chosen) < rule.pods:
                chosen.add(uid)
                return rule
        return None

    def state(self, uid: str, image: str, policy: str | None, now: float) -> PullState:
        """What the pod ``uid``'s container with ``image`` shows at ``now`` (call again at
        ``wake_at``)."""
        invalid = reference_error(image)
        if invalid is not None:
            return PullState(False, "InvalidImageName", invalid)
        with self._lock:
            rule = self._rule(uid, image)
            if rule is None:
                return PullState(True)
            if policy == "Never":
                return PullState(False, "ErrImageNeverPull", never_pull_message(image))
            pod = self._pods.setdefault(uid, _PodPull(first=now, next_attempt=now))
            if now >= pod.next_attempt:
                if rule.for_s is not None and now - pod.first >= rule.for_s:
                    return PullState(True)
                pod.attempts += 1
                pod.failed_at = now
                delay = min(self.backoff_s * 2 ** (pod.attempts - 1), self.backoff_max_s)
                pod.next_attempt = now + delay
            shown = min(1.0, (pod.next_attempt - pod.failed_at) / 2)
            if now < pod.failed_at + shown:
                return PullState(
                    False, "ErrImagePull", pull_error_message(image), pod.failed_at + shown
                )
            return PullState(False, "ImagePullBackOff", backoff_message(image), pod.next_attempt)

    def forget(self, uid: str) -> None:
        """A pod is gone: drop its pull state."""
        with self._lock:
            self._pods.pop(uid, None)
