"""Dead letters: what a message in ``<queue>.dead`` says about its item, and its requeue token.

A dead letter is an item the broker (quorum queue, ``x-delivery-limit``) or the worker (classic
queue, failure count in a header) gave up on. `queuejob dead-letters QUEUE --requeue` moves them
back to the work queue; to make that idempotent per item, each dead letter has a *requeue
token*: its run, its item id and how often the item was requeued before. A requeued message
carries the count plus one, so the same item dead-lettered again after a requeue has a new
token, while the same dead letter seen twice (a requeue killed between the publish and the ack)
has the same one.

Pure: the broker adapter reads the headers and hands the values in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# How often the item was moved back from the dead-letter queue (set on each requeue).
HEADER_REQUEUES = "queuejob-requeues"
# x-death reasons: the quorum queue's delivery limit, or a reject without requeue (the worker's
# own limit on a classic queue).
REASON_DELIVERY_LIMIT = "delivery_limit"
REASON_REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of ``<queue>.dead``, as queuejob reads it."""

    item_id: str
    run_id: str | None
    index: int | None
    reason: str | None  # why the broker dead-lettered it (x-first-death-reason)
    attempts: int | None  # None when the headers do not tell (quorum queues)
    requeues: int  # earlier requeues of this item from the dead-letter queue
    size: int  # body bytes

    @property
    def token(self) -> str:
        """The requeue token: equal for the same dead letter, new once the item was requeued."""
        return requeue_token(self.item_id, self.run_id, self.requeues)


def item_id_of(message_id: str | None, body: bytes) -> str:
    """The item id of a message: its message id, else (as the worker does) a digest of its
    body."""
    if message_id:
        return message_id
    return f"msg-{hashlib.blake2b(body, digest_size=6).hexdigest()}"


def requeue_token(item_id: str, run_id: str | None, requeues: int) -> str:
    """A short digest of (run, item, requeues): the key a requeue records per dead letter."""
    key = f"{run_id or ''}\0{item_id}\0{requeues}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def attempts_from(*, reason: str | None, failures: int, delivery_limit: int | None) -> int | None:
    """How many attempts an item had when it was dead-lettered, where that is known.

    The worker counts failed attempts in a header on classic queues and dead-letters the
    message on the attempt after the last counted one (``failures + 1``). A quorum queue
    dead-letters after ``delivery_limit + 1`` deliveries but does not say its limit in the
    message: pass the queue's limit when known (from the run's report), else None.
    """
    if failures > 0:
        return failures + 1
    if reason == REASON_DELIVERY_LIMIT and delivery_limit is not None:
        return delivery_limit + 1
    return None


def plural(n: int, word: str) -> str:
    """'1 dead letter', '3 dead letters'."""
    return f"{n} {word}{'' if n == 1 else 's'}"
