"""Trivial work for the benchmarks' pods: ``--call bench.trivial:noop``."""

from __future__ import annotations


def noop(body: bytes) -> None:
    """Accept an item and do nothing with it: what is left is queuejob's own cost per item."""
    del body
