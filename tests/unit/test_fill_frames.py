"""The fill's hand-built AMQP frames are byte for byte what pika would send."""

from __future__ import annotations

import pytest
from pika import frame, spec

from queuejob.flows.adapters.broker import FillFrames

RUN_ID = "0b7c3a52-1f7e-4d8e-9a43-5e0d2b6c9f10"
BODY_MAX = 131072 - 8  # pika's body frame limit for the default frame_max


def pika_bytes(channel: int, queue: str, item_id: str, index: int, body: bytes) -> bytes:
    publish = spec.Basic.Publish(exchange="", routing_key=queue, mandatory=True)
    props = FillFrames.properties(item_id, index, RUN_ID)
    return b"".join(
        (
            frame.Method(channel, publish).marshal(),
            frame.Header(channel, len(body), props).marshal(),
            frame.Body(channel, body).marshal(),
        )
    )


@pytest.mark.parametrize(
    ("item_id", "index", "body"),
    [
        ("0", 0, b"0"),
        ("item-17", 17, b"hello world"),
        ("é-ünïcode-✓", 3, "données".encode()),
        ("x" * 255, 2**31 - 1, b"edge of a 32-bit index"),
        ("big", 2**31, b"a 64-bit index"),
        ("neg", -1, b"-"),
        ("full", 5, b"b" * BODY_MAX),
    ],
)
def test_frames_equal_pikas(item_id: str, index: int, body: bytes) -> None:
    frames = FillFrames(7, "job1", RUN_ID, BODY_MAX)
    assert frames.encode(item_id, index, body) == pika_bytes(7, "job1", item_id, index, body)


def test_frames_decode_to_the_message() -> None:
    data = FillFrames(1, "work.queue", RUN_ID, BODY_MAX).encode("id-1", 42, b"payload")
    assert data is not None
    offset, decoded = 0, []
    while offset < len(data):
        used, f = frame.decode_frame(data[offset:])
        assert used > 0
        decoded.append(f)
        offset += used
    method, header, body = decoded
    assert method.method.routing_key == "work.queue" and method.method.mandatory
    props = header.properties
    assert (props.message_id, props.delivery_mode, props.content_type) == (
        "id-1",
        2,
        "application/octet-stream",
    )
    assert props.headers == {"queuejob-run-id": RUN_ID, "queuejob-index": 42}
    assert header.body_size == 7 and body.fragment == b"payload"


def test_what_needs_pika_is_left_to_pika() -> None:
    frames = FillFrames(1, "job1", RUN_ID, BODY_MAX)
    assert frames.encode("empty", 0, b"") is None  # pika sends no body frame
    assert frames.encode("big", 0, b"b" * (BODY_MAX + 1)) is None  # split over frames
    assert frames.encode("é" * 128, 0, b"x") is None  # 256 bytes: not a shortstr
