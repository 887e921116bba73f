"""Where a local Job's state lives: its files, the controller lock, and their removal."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

# --- paths and locks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paths:
    """Where one Job's files live."""

    ns_dir: Path
    name: str

    @property
    def job(self) -> Path:
        return self.ns_dir / f"{self.name}.json"

    @property
    def lock(self) -> Path:
        return self.ns_dir / f"{self.name}.lock"

    @property
    def tombstone(self) -> Path:
        return self.ns_dir / f"{self.name}.deleting"

    @property
    def logs(self) -> Path:
        return self.ns_dir / f"{self.name}.logs"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    @property
    def secrets(self) -> Path:
        return self.ns_dir / "secrets"

    def secret(self, name: str) -> Path:
        return self.secrets / f"{name}.json"

    @classmethod
    def for_job_file(cls, path: Path) -> Paths:
        return cls(ns_dir=path.parent, name=path.name.removesuffix(".json"))


def lock_is_free(path: Path) -> bool:
    """True when no supervisor (or its watchdog) holds the Job's lock."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True  # never taken: the supervisor creates it
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return True


def remove_job_files(paths: Paths) -> None:
    shutil.rmtree(paths.logs, ignore_errors=True)
    for path in (paths.job, paths.lock):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
