"""The three PATCH flavours the API server accepts for built-in types.

- ``application/merge-patch+json`` (RFC 7386): maps merge, ``null`` deletes, lists are replaced.
- ``application/strategic-merge-patch+json`` (the Python clients' default for dict bodies): like a
  merge patch, but lists with a merge key (containers by name, ownerReferences by uid, ...) are
  merged item by item, and ``finalizers`` are merged as a set; ``$patch: delete|replace`` work.
- ``application/json-patch+json`` (RFC 6902): add, remove, replace, move, copy, test.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.fakekube.objects import ApiError, Obj, status_body, unsupported_media_type

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH)

# Lists merged by key in a strategic merge patch (patchMergeKey in the Go types).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "ports": "containerPort",
    "conditions": "type",
    "containerStatuses": "name",
}
# Lists of scalars merged as a set (patchStrategy:"merge").
_SET_LISTS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic merge patch for the fields the fake knows merge keys for."""
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        out = copy.deepcopy(target) if isinstance(target, dict) else {}
        for k, value in patch.items():
            if k.startswith("$"):
                continue
            if k.startswith("$deleteFromPrimitiveList/"):
                continue
            if value is None:
                out.pop(k, None)
                continue
            merged = strategic_merge_patch(out.get(k), value, k)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        for k, value in patch.items():
            if k.startswith("$deleteFromPrimitiveList/"):
                field = k.split("/", 1)[1]
                out[field] = [v for v in out.get(field) or [] if v not in value]
        return out
    if isinstance(patch, list) and key in _SET_LISTS:
        current = list(target or [])
        return current + [v for v in patch if v not in current]
    if isinstance(patch, list) and key in _MERGE_KEYS and isinstance(target, list):
        merge_key = _MERGE_KEYS[key]
        if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
            return [copy.deepcopy(p) for p in patch if not (isinstance(p, dict) and "$patch" in p)]
        out_list = copy.deepcopy(target)
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                out_list.append(copy.deepcopy(item))
                continue
            index = next(
                (
                    i
                    for i, cur in enumerate(out_list)
                    if isinstance(cur, dict) and cur.get(merge_key) == item[merge_key]
                ),
                None,
            )
            if item.get("$patch") == "delete":
                if index is not None:
                    out_list.pop(index)
                continue
            if index is None:
                out_list.append({k: v for k, v in item.items() if not k.startswith("$")})
            else:
                out_list[index] = strategic_merge_patch(out_list[index], item)
        return out_list
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _patch_error(f'invalid JSON pointer "{path}"')
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _patch_error(message: str) -> ApiError:
    return ApiError(422, status_body(422, "UnprocessableEntity", message))


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def json_patch(target: Obj, ops: Any) -> Obj:
    """RFC 6902; a failed op or test is a 422 as the server words it (loosely)."""
    if not isinstance(ops, list):
        raise _patch_error("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc: Any = copy.deepcopy(target)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))
        try:
            if kind == "test":
                if _walk(doc, parts) != op.get("value"):
                    raise _patch_error(f"testing value {op.get('path')} failed: test failed")
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(_walk(doc, _pointer(op.get("from", ""))))
                if kind == "move":
                    doc = _remove(doc, _pointer(op["from"]))
                doc = _add(doc, parts, value)
            elif kind == "add":
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            elif kind == "remove":
                doc = _remove(doc, parts)
            elif kind == "replace":
                _walk(doc, parts)  # must exist
                doc = _remove(doc, parts)
                doc = _add(doc, parts, copy.deepcopy(op.get("value")))
            else:
                raise _patch_error(f"Unexpected kind: {kind}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise _patch_error(
                f"the server rejected our request due to an error in our request: "
                f'{kind} operation does not apply: doc is missing path: "{op.get("path")}"'
            ) from None
    return dict(doc)


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            parent.insert(int(last), value)
    else:
        parent[last] = value
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        parent.pop(int(last))
    else:
        del parent[last]
    return doc


def apply_patch(content_type: str, target: Obj, patch: Any) -> Obj:
    """Dispatch on the PATCH's Content-Type; anything else is 415."""
    base = content_type.split(";", 1)[0].strip().lower()
    if base == MERGE_PATCH:
        result = merge_patch(target, patch)
    elif base == STRATEGIC_PATCH:
        result = strategic_merge_patch(target, patch)
    elif base == JSON_PATCH:
        result = json_patch(target, patch)
    else:
        raise unsupported_media_type()
    if not isinstance(result, dict):
        raise _patch_error("the patch did not produce an object")
    return result
