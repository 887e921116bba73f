"""The fake's object store: etcd plus the watch cache, in memory.

Every write bumps one cluster-wide, monotonically increasing resourceVersion and appends an event
to the resource's bounded history (the watch cache). Watches replay history newer than the asked
resourceVersion, or answer ``410 Expired`` once it has been evicted. Stored objects are never
changed in place: an update builds a new dict, so events can share them safely.

Deletion follows the API server's rules: graceful deletion for running pods (deletionTimestamp
in the future), finalizers keep an object until they are removed, and the propagation policy adds
``foregroundDeletion`` or ``orphan`` for the garbage collector to act on.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.fakekube.objects import (
    FOREGROUND_FINALIZER,
    ORDER_META,
    ORDER_TOP,
    ORPHAN_FINALIZER,
    RESOURCES,
    ApiError,
    Obj,
    already_exists,
    conflict,
    generate_name,
    new_uid,
    not_found,
    now_str,
    ordered,
)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


@dataclass(frozen=True, slots=True)
class Event:
    """One change in the store, as a watch sees it."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None  # the previous state, to turn selector transitions into ADDED/DELETED


@dataclass(eq=False)
class Subscription:
    """A live watch: events for one resource (and namespace) are put on ``events``."""

    resource: str
    namespace: str | None
    events: queue.Queue[Event | None] = field(default_factory=queue.Queue)
    dropped: bool = False  # set to make the stream end abruptly instead of cleanly


class Store:
    """In-memory objects, one resourceVersion counter, a bounded history per resource."""

    def __init__(self, *, watch_cache_size: int = 1000, first_rv: int = 100) -> None:
        self.lock = threading.RLock()
        self._rv = first_rv
        self._objects: dict[str, dict[Key, Obj]] = {r: {} for r in RESOURCES}
        self._by_uid: dict[str, tuple[str, Key]] = {}
        self._history: dict[str, deque[Event]] = {r: deque() for r in RESOURCES}
        self._window_start: dict[str, int] = dict.fromkeys(RESOURCES, 0)
        self._cache_size = max(1, watch_cache_size)
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[str, Event], None]] = []

    # --- reading ------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion handed out."""
        with self.lock:
            return self._rv

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        """A deep copy of the object, or None."""
        with self.lock:
            obj = self._objects[resource].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def get_shared(self, resource: str, namespace: str, name: str) -> Obj | None:
        """The stored object itself (read-only by contract; cheaper for internal loops)."""
        with self.lock:
            return self._objects[resource].get((namespace, name))

    def by_uid(self, uid: str) -> Obj | None:
        """The stored object with this uid (read-only), or None."""
        with self.lock:
            where = self._by_uid.get(uid)
            if where is None:
                return None
            return self._objects[where[0]].get(where[1])

    def items(self, resource: str, namespace: str | None = None) -> list[Obj]:
        """Stored objects (read-only), sorted by namespace and name like an etcd range read."""
        with self.lock:
            objs = self._objects[resource]
            keys = sorted(k for k in objs if namespace is None or k[0] == namespace)
            return [objs[k] for k in keys]

    def objects_at(self, resource: str, namespace: str | None, rv: int) -> list[Obj] | None:
        """The objects as they were at ``rv`` (rewound through the history), or None when the
        history no longer reaches back that far."""
        with self.lock:
            if rv < self._window_start[resource]:
                return None
            state = dict(self._objects[resource])
            for event in reversed(self._history[resource]):
                if event.rv <= rv:
                    break
                meta = event.obj["metadata"]
                key = (meta.get("namespace", ""), meta["name"])
                if event.type == "ADDED" or event.old is None:
                    state.pop(key, None)
                else:
                    state[key] = event.old
            keys = sorted(k for k in state if namespace is None or k[0] == namespace)
            return [state[k] for k in keys]

    def namespace_exists(self, namespace: str) -> bool:
        """True when the Namespace object exists."""
        with self.lock:
            return ("", namespace) in self._objects["namespaces"]

    # --- listeners and watches ------------------------------------------------------------------

    def add_listener(self, fn: Callable[[str, Event], None]) -> None:
        """Call ``fn(resource, event)`` after every change (under the lock: keep it quick)."""
        with self.lock:
            self._listeners.append(fn)

    def subscribe(
        self, resource: str, namespace: str | None, since_rv: int | None
    ) -> tuple[Subscription, list[Event], int]:
        """Start a watch.

        With ``since_rv`` the history after it is replayed (``TooOld`` when it has been evicted
        from the watch cache); without it the current objects come back as synthetic ADDED
        events. Returns the subscription, the events to send first and
        the resourceVersion the initial state is as of.
        """
        with self.lock:
            sub = Subscription(resource, namespace)
            if since_rv is not None:
                start = self._window_start[resource]
                if since_rv < start:
                    raise TooOld(f"too old resource version: {since_rv} ({start})")
                first = [
                    e
                    for e in self._history[resource]
                    if e.rv > since_rv and _in_namespace(e.obj, namespace)
                ]
            else:
                first = [
                    Event(int(o["metadata"]["resourceVersion"]), "ADDED", o, None)
                    for o in self.items(resource, namespace)
                ]
            self._subs.add(sub)
            return sub, first, self._rv

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering events to a watch."""
        with self.lock:
            self._subs.discard(sub)

    def subscriptions(self) -> list[Subscription]:
        """Open watches."""
        with self.lock:
            return list(self._subs)

    def _emit(self, resource: str, type_: str, obj: Obj, old: Obj | None) -> None:
        event = Event(int(obj["metadata"]["resourceVersion"]), type_, obj, old)
        history = self._history[resource]
        history.append(event)
        while len(history) > self._cache_size:
            evicted = history.popleft()
            self._window_start[resource] = evicted.rv
        for sub in self._subs:
            if sub.resource == resource and _in_namespace(obj, sub.namespace):
                sub.events.put(event)
        for fn in self._listeners:
            fn(resource, event)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # --- writing ------------------------------------------------------------------------------

    def create(
        self,
        resource: str,
        obj: Obj,
        *,
        prepare: Callable[[Obj], None] | None = None,
        check_namespace: bool = True,
        manager: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """Store a new object: name from generateName, uid, resourceVersion, creationTimestamp.

        ``prepare(obj)`` runs once the name and uid are known and may raise ``ApiError`` (that is
        where defaulting and validation go). Returns a deep copy of the stored object.
        """
        res = RESOURCES[resource]
        with self.lock:
            meta = obj.setdefault("metadata", {})
            namespace = meta.get("namespace", "") if res.namespaced else ""
            if res.namespaced and check_namespace and not self.namespace_exists(namespace):
                raise not_found(RESOURCES["namespaces"], namespace)
            if not meta.get("name") and meta.get("generateName"):
                for _ in range(20):
                    candidate = generate_name(meta["generateName"])
                    if (namespace, candidate) not in self._objects[resource]:
                        meta["name"] = candidate
                        break
            meta["uid"] = new_uid()
            meta["creationTimestamp"] = now_str()
            if res.has_generation:
                meta["generation"] = 1
            for transient in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(transient, None)
            if prepare is not None:
                prepare(obj)
            name = meta.get("name", "")
            if (namespace, name) in self._objects[resource]:
                raise already_exists(res, name)
            if dry_run:
                out = ordered(obj, ORDER_TOP)
                out["metadata"] = ordered(meta, ORDER_META)
                return copy.deepcopy(out)
            meta["resourceVersion"] = self._next_rv()
            meta.pop("managedFields", None)
            if manager:
                meta["managedFields"] = _managed(None, obj, manager, None, res.api_version)
            stored = ordered(obj, ORDER_TOP)
            stored["metadata"] = ordered(meta, ORDER_META)
            self._objects[resource][(namespace, name)] = stored
            self._by_uid[meta["uid"]] = (resource, (namespace, name))
            self._emit(resource, "ADDED", stored, None)
            return copy.deepcopy(stored)

    def update(
        self,
        resource: str,
        namespace: str,
        name: str,
        mutate: Callable[[Obj], Obj | None],
        *,
        expect_rv: str | None = None,
        expect_uid: str | None = None,
        manager: str | None = None,
        subresource: str | None = None,
        announce_removal: bool = False,
    ) -> Obj:
        """Apply ``mutate`` to a deep copy of the object and store the result.

        ``mutate`` edits in place (returning None) or returns the new object; it may raise
        ``ApiError``. A write that changes nothing keeps the resourceVersion and sends no event.
        A changed spec (or a new deletionTimestamp) bumps ``generation``. An object being deleted
        whose last finalizer goes away is removed (DELETED). Returns a deep copy of the result.
        """
        res = RESOURCES[resource]
        with self.lock:
            key = (namespace if res.namespaced else "", name)
            old = self._objects[resource].get(key)
            if old is None:
                raise not_found(res, name)
            if expect_uid is not None and old["metadata"]["uid"] != expect_uid:
                raise not_found(res, name)
            if expect_rv is not None and expect_rv != old["metadata"]["resourceVersion"]:
                raise conflict(res, name)
            draft = copy.deepcopy(old)
            result = mutate(draft)
            new = draft if result is None else result
            meta = new.setdefault("metadata", {})
            for fixed in ("name", "namespace", "uid", "creationTimestamp", "generateName"):
                if fixed in old["metadata"]:
                    meta[fixed] = old["metadata"][fixed]
            meta["resourceVersion"] = old["metadata"]["resourceVersion"]
            if "managedFields" in old["metadata"]:
                meta["managedFields"] = old["metadata"]["managedFields"]
            else:
                meta.pop("managedFields", None)
            if res.has_generation:
                meta["generation"] = old["metadata"].get("generation", 1)
            if not meta.get("finalizers"):
                meta.pop("finalizers", None)
            if new == old:
                return copy.deepcopy(old)
            if res.has_generation and (
                new.get("spec") != old.get("spec")
                or (meta.get("deletionTimestamp") and not old["metadata"].get("deletionTimestamp"))
            ):
                meta["generation"] = int(meta["generation"]) + 1
            meta["resourceVersion"] = self._next_rv()
            if manager:
                meta["managedFields"] = _managed(
                    meta.get("managedFields"), new, manager, subresource, res.api_version
                )
            stored = ordered(new, ORDER_TOP)
            stored["metadata"] = ordered(meta, ORDER_META)
            if _removable(stored["metadata"]) and announce_removal:
                # The kubelet's grace-0 confirmation: first the MODIFIED, then the DELETED.
                self._objects[resource][key] = stored
                self._emit(resource, "MODIFIED", stored, old)
                final = copy.deepcopy(stored)
                final["metadata"]["resourceVersion"] = self._next_rv()
                self._remove(resource, key, final, stored)
            elif _removable(stored["metadata"]):
                # Removing the last finalizer deletes the object; as etcd does, the DELETED
                # event carries the last stored state (finalizer still listed), at a new RV.
                final = copy.deepcopy(old)
                final["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
                self._remove(resource, key, final, old)
                return copy.deepcopy(final)
            else:
                self._objects[resource][key] = stored
                self._emit(resource, "MODIFIED", stored, old)
            return copy.deepcopy(stored)

    def _remove(self, resource: str, key: Key, final: Obj, old: Obj | None) -> None:
        del self._objects[resource][key]
        self._by_uid.pop(final["metadata"]["uid"], None)
        self._emit(resource, "DELETED", final, old)

    def delete(
        self,
        resource: str,
        namespace: str,
        name: str,
        *,
        grace_seconds: int | None = None,
        propagation: str | None = None,
        expect_uid: str | None = None,
        expect_rv: str | None = None,
    ) -> tuple[Obj, bool]:
        """Delete the way the API server does; returns (final object, removed now?).

        Pods bound to a node and not finished are deleted gracefully: ``deletionTimestamp`` is
        set ``grace`` seconds ahead and the kubelet finishes the job with a grace-0 delete.
        ``propagation`` "Foreground" or "Orphan" adds the matching finalizer for the garbage
        collector; objects with finalizers stay until those are removed.
        """
        res = RESOURCES[resource]
        with self.lock:
            key = (namespace if res.namespaced else "", name)
            old = self._objects[resource].get(key)
            if old is None:
                raise not_found(res, name)
            meta_old = old["metadata"]
            if expect_uid is not None and meta_old["uid"] != expect_uid:
                raise conflict(
                    res,
                    name,
                    f"Precondition failed: UID in precondition: {expect_uid}, UID in object meta: "
                    f"{meta_old['uid']}",
                )
            if expect_rv is not None and meta_old["resourceVersion"] != expect_rv:
                raise conflict(
                    res,
                    name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{expect_rv}, ResourceVersion in object meta: {meta_old['resourceVersion']}",
                )
            grace = _effective_grace(resource, old, grace_seconds)
            finalizers = list(meta_old.get("finalizers") or [])
            if propagation == "Foreground" and FOREGROUND_FINALIZER not in finalizers:
                finalizers.append(FOREGROUND_FINALIZER)
            elif propagation == "Orphan" and ORPHAN_FINALIZER not in finalizers:
                finalizers.append(ORPHAN_FINALIZER)

            if meta_old.get("deletionTimestamp"):
                # Already being deleted: only a shorter grace period changes anything.
                current = meta_old.get("deletionGracePeriodSeconds")
                if grace is not None and current is not None and grace < current:
                    stored = self._mark_deleting(resource, key, old, grace, finalizers, True)
                    return stored, key not in self._objects[resource]
                return copy.deepcopy(old), False
            if grace or finalizers:
                stored = self._mark_deleting(resource, key, old, grace or 0, finalizers)
                return stored, key not in self._objects[resource]
            final = copy.deepcopy(old)
            final["metadata"]["resourceVersion"] = self._next_rv()
            self._remove(resource, key, final, old)
            return copy.deepcopy(final), True

    def _mark_deleting(
        self,
        resource: str,
        key: Key,
        old: Obj,
        grace: int,
        finalizers: list[str],
        announce: bool = False,
    ) -> Obj:
        def mark(draft: Obj) -> None:
            meta = draft["metadata"]
            meta["deletionTimestamp"] = now_str(grace)
            meta["deletionGracePeriodSeconds"] = grace
            if finalizers:
                meta["finalizers"] = finalizers

        return self.update(resource, key[0], key[1], mark, announce_removal=announce)

    def all_objects(self) -> Iterator[tuple[str, Obj]]:
        """Every stored object with its resource (read-only), for the garbage collector."""
        with self.lock:
            snapshot = [(r, o) for r, objs in self._objects.items() for o in objs.values()]
        yield from snapshot


class TooOld(ValueError):
    """A watch asked for a resourceVersion the watch cache no longer holds."""


_MAIN_FIELDS = ("spec", "data", "type", "immutable")
_META_FIELDS = ("labels", "annotations", "ownerReferences", "finalizers")


def _fields_v1(value: Any) -> Obj:
    """A FieldsV1 set for a value: maps by key, lists of named items by ``k:{"name":...}``."""
    if isinstance(value, dict):
        return {f"f:{k}": _fields_v1(v) for k, v in value.items()}
    if (
        isinstance(value, list)
        and value
        and all(isinstance(i, dict) and "name" in i for i in value)
    ):
        out: Obj = {}
        for item in value:
            key = 'k:{"name":' + json.dumps(item["name"]) + "}"
            out[key] = {".": {}, **_fields_v1(item)}
        return out
    return {}


def _managed(
    entries: list[Obj] | None, obj: Obj, manager: str, subresource: str | None, api_version: str
) -> list[Obj]:
    """managedFields after ``manager`` wrote ``obj`` (one Update entry per manager/subresource)."""
    if subresource == "status":
        fields: Obj = {"f:status": _fields_v1(obj.get("status") or {})}
    else:
        meta = obj.get("metadata") or {}
        fields = {}
        picked = {k: meta[k] for k in _META_FIELDS if meta.get(k)}
        if picked:
            fields["f:metadata"] = _fields_v1(picked)
        for key in _MAIN_FIELDS:
            if key in obj:
                fields[f"f:{key}"] = _fields_v1(obj[key])
    entry: Obj = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": api_version,
        "time": now_str(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    if subresource:
        entry["subresource"] = subresource
    out = [dict(e) for e in entries or []]
    for i, existing in enumerate(out):
        if existing.get("manager") == manager and existing.get("subresource") == subresource:
            out[i] = entry
            return out
    out.append(entry)
    return out


def _removable(meta: Obj) -> bool:
    """Deleting, no finalizers left, and no grace period still running (pods wait for it)."""
    return (
        bool(meta.get("deletionTimestamp"))
        and not meta.get("finalizers")
        and not meta.get("deletionGracePeriodSeconds")
    )


def _in_namespace(obj: Obj, namespace: str | None) -> bool:
    return namespace is None or obj.get("metadata", {}).get("namespace", "") == namespace


def _effective_grace(resource: str, obj: Obj, asked: int | None) -> int | None:
    """The grace period a delete gets: pods only, and 0 for unbound or finished pods."""
    if resource != "pods":
        return 0
    spec = obj.get("spec") or {}
    phase = (obj.get("status") or {}).get("phase")
    if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
        return 0
    if asked is not None:
        return max(0, asked)
    return int(spec.get("terminationGracePeriodSeconds", 30))


def apierror_or_none(fn: Callable[[], Any]) -> Any:
    """Run fn; return None when it raised an ApiError (for best-effort internal writes)."""
    try:
        return fn()
    except ApiError:
        return None
