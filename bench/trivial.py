"""Trivial work for the benchmarks' pods: ``--call bench.trivial:noop``."""

from __future__ import annotations


def noop(body: bytes) -> None:
    """Accept an item and do nothing with it: what is left is queuejob's own cost per item."""
    del body


RESULT_BYTES = 100


def result100(body: bytes) -> str:
    """Return a 100-byte result made from the item (``r<body>`` padded with dots): figure 6's
    run with results, whose ledger is then checked against this function item by item."""
    return ("r" + body.decode()).ljust(RESULT_BYTES, ".")[:RESULT_BYTES]
