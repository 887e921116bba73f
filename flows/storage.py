"""Which ledger storage a run uses: a Prefect filesystem block by name, or the default directory.

The storage itself (`queuejob.flows.adapters.ledger_storage.LedgerStorage`) is plain fsspec and
knows nothing of Prefect; resolving a block name needs Prefect's block registry, so it lives here,
above the adapters, for the flow, its tasks and the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from queuejob.flows.adapters.ledger_storage import (
    LEDGER_DIR_ENV,
    LedgerStorage,
    default_ledger_dir,
    local_storage,
)
from queuejob.flows.core.errors import InvalidInput, LedgerStorageError


def open_storage(block_name: str | None) -> LedgerStorage:
    """The ledger storage: the `LocalFileSystem` or `RemoteFileSystem` block of that name, or
    (None) the default local directory. A missing block, or a block of another type, raises
    `InvalidInput` saying what to create."""
    if not block_name:
        return local_storage(default_ledger_dir(), f"default, {LEDGER_DIR_ENV}")
    from prefect.blocks.core import Block
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    try:
        block = Block.load(block_name) if "/" in block_name else None
        if block is None:
            block = _load_by_name(block_name, LocalFileSystem, RemoteFileSystem)
    except ValueError as exc:
        raise InvalidInput(
            f"no ledger storage block named {block_name!r}: create a LocalFileSystem or "
            "RemoteFileSystem block of that name (Prefect UI: Blocks; or "
            f"RemoteFileSystem(basepath='s3://bucket/queuejob-ledgers').save({block_name!r})), "
            "or fix ledger_storage (--ledger-storage)"
        ) from exc
    source = f"block {block_name!r}"
    if isinstance(block, LocalFileSystem):
        base = Path(block.basepath).expanduser() if block.basepath else Path.cwd()
        return local_storage(base, source)
    if isinstance(block, RemoteFileSystem):
        basepath = str(block.basepath)
        try:
            fs = block.filesystem
        except (RuntimeError, ValueError, ImportError) as exc:
            raise LedgerStorageError(
                f"cannot open the ledger storage {basepath} ({source}): {exc}; install the "
                "fsspec package for that scheme (s3fs, gcsfs, adlfs) in the flow's image"
            ) from exc
        local = basepath.startswith("file://") or "://" not in basepath
        return LedgerStorage(fs, basepath, local=local, source=source)
    raise InvalidInput(
        f"block {block_name!r} is a {type(block).__name__}, not a LocalFileSystem or "
        "RemoteFileSystem: name a filesystem block for ledger_storage"
    )


def _load_by_name(name: str, *kinds: Any) -> Any:
    """Load `name` as the first of the block types that has a block of that name."""
    last: Exception | None = None
    for kind in kinds:
        try:
            return kind.load(name)
        except ValueError as exc:
            last = exc
    assert last is not None
    raise last
