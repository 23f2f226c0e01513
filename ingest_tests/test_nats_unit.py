"""Pure logic of the NATS source (no broker): delivery metadata, publish subjects, durable drift."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import api

from ingest_defs.sources.nats import (
    _drifted,
    _Reader,
    fast_path_supported,
    headers_from_dict,
    install_frame_scanner,
    parse_ack_reply,
    parse_headers,
    subject_for,
)


def test_parse_ack_reply_reads_both_reply_subject_forms():
    # nats-server 2.9: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
    assert parse_ack_reply("$JS.ACK.S.d.1.42.7.1795735762899746606.3") == (1, 42, 7, 1795735762899746606, 3)
    # newer servers: domain and account hash before the stream, a random token at the end
    assert parse_ack_reply("$JS.ACK._.ACCHASH.S.d.2.43.8.1795735762899746607.0.tok") == (2, 43, 8, 1795735762899746607, 0)
    assert parse_ack_reply(b"$JS.ACK.S.d.3.44.9.1795735762899746608.0") == (3, 44, 9, 1795735762899746608, 0)
    with pytest.raises(ValueError):
        parse_ack_reply("_INBOX.abc")


def test_parse_headers_reads_status_lines_and_keeps_repeated_keys():
    assert parse_headers(b"NATS/1.0\r\ntrace: t-1\r\nNats-Msg-Id: m1\r\ntrace: t-2\r\n\r\n") == (
        None, "", [("trace", "t-1"), ("Nats-Msg-Id", "m1"), ("trace", "t-2")])
    assert parse_headers(b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 12\r\nNats-Last-Stream: 40\r\n\r\n") == (
        "100", "Idle Heartbeat", [("Nats-Last-Consumer", "12"), ("Nats-Last-Stream", "40")])
    assert parse_headers(b"NATS/1.0 100 FlowControl Request\r\n\r\n") == ("100", "FlowControl Request", [])
    assert parse_headers(b"NATS/1.0 409 Consumer Deleted\r\n\r\n")[:2] == ("409", "Consumer Deleted")
    # nats-py's parsed form (the plain subscription path) maps to the same shape
    assert headers_from_dict({"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "12"}) == (
        "100", "Idle Heartbeat", [("Nats-Last-Consumer", "12")])


def test_publish_subject_replaces_wildcards_with_a_safe_token():
    assert subject_for("events.page_loaded", b"7") == "events.page_loaded"
    assert subject_for("events.*", None) == "events.sample"
    assert subject_for("events.*", b"user 7/x.y") == "events.user_7_x_y"
    assert subject_for("jobs.>", b"42") == "jobs.42"
    assert subject_for("a.*.c", b"") == "a.sample.c"


def test_durable_drift_is_detected_on_the_fields_a_batch_depends_on():
    want = api.ConsumerConfig(durable_name="d", deliver_subject="_INBOX.x", filter_subject="s.*",
                              ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
                              max_ack_pending=100, ack_wait=60.0, flow_control=True)
    # as the server returns it: enums as strings
    have = api.ConsumerConfig.from_response({
        "durable_name": "d", "deliver_subject": "_INBOX.x", "filter_subject": "s.*", "ack_policy": "explicit",
        "deliver_policy": "all", "max_ack_pending": 100, "ack_wait": 60_000_000_000, "flow_control": True})
    assert not _drifted(have, want)
    assert _drifted(have, want.evolve(max_ack_pending=200))
    assert _drifted(have, want.evolve(ack_wait=2.0))
    assert _drifted(have, want.evolve(filter_subject="s.a"))


def test_the_pinned_nats_py_supports_the_fast_path(monkeypatch):
    # If a nats-py upgrade changes the parser hook, reads fall back to plain subscriptions (slower): notice it.
    assert fast_path_supported(Client())
    monkeypatch.setenv("INGEST_NATS_FAST_PATH", "0")
    assert not fast_path_supported(Client())


# ---------------------------------------------------------------- the frame scanner
class _Recorder:
    """What nats-py's parser calls on its client, recorded in order (a pure-logic stand-in for the client's
    callbacks: no connection, no broker)."""

    def __init__(self, handlers: dict[int, Any]) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.handlers = handlers

    async def _process_msg(self, sid, subject, reply, data, headers):
        entry = self.handlers.get(sid)
        if entry is None:
            self.events.append(("other", sid, subject, reply, data, headers))
            return
        out = entry[1](subject, reply, data, parse_headers(headers) if headers else None)
        if out:
            await self.publish(out.decode())

    async def publish(self, subject: str) -> None:
        self.events.append(("publish", subject))

    async def _process_ping(self):
        self.events.append(("ping",))

    async def _process_pong(self):
        self.events.append(("pong",))

    async def _process_err(self, err):
        self.events.append(("err", err))

    async def _process_info(self, info):
        self.events.append(("info", info))


def _wire() -> bytes:
    """Frames of every shape: ours with and without reply and headers, flow control, another subscription's
    message, control lines, payloads holding CRLF and protocol words, an empty payload."""
    frames = [b"INFO {\"server_id\":\"x\"}\r\n", b"+OK\r\n"]
    for i in range(40):
        payload = [b"{\"id\":%d}" % i, b"MSG 1 2 3\r\nPING\r\n", b"", b"x" * 300][i % 4]
        if i % 5 == 0:
            headers = b"NATS/1.0\r\nNats-Msg-Id: m-%d\r\nk: v\r\n\r\n" % i
            frames.append(b"HMSG s.%d 7 $JS.ACK.S.c.1.%d.%d.1700000000000000000.0 %d %d\r\n%s%s\r\n"
                          % (i, i + 1, i + 1, len(headers), len(headers) + len(payload), headers, payload))
        elif i % 7 == 0:
            frames.append(b"MSG other 9 _INBOX.r %d\r\n%s\r\n" % (len(payload), payload))  # not ours
        elif i % 11 == 0:
            frames.append(b"MSG s.%d 7 %d\r\n%s\r\n" % (i, len(payload), payload))  # no reply
        else:
            frames.append(b"MSG s.%d 7 $JS.ACK.S.c.1.%d.%d.1700000000000000000.0 %d\r\n%s\r\n"
                          % (i, i + 1, i + 1, len(payload), payload))
        if i % 13 == 0:
            fc = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
            frames.append(b"HMSG fc 7 $JS.FC.S.c.%d %d %d\r\n%s\r\n" % (i, len(fc), len(fc), fc))
        if i % 17 == 0:
            frames.append(b"PING\r\n")
    return b"".join(frames)


def _parse_in_chunks(wire: bytes, cuts: list[int], fast: bool) -> list[tuple[Any, ...]]:
    from nats.protocol.parser import Parser

    handlers: dict[int, Any] = {}
    recorder = _Recorder(handlers)

    def handle(subject, reply, data, headers):
        recorder.events.append(("ours", subject, reply, data, headers))
        return reply if reply.startswith(b"$JS.FC.") else None  # answer flow control, as a reader does

    handlers[7] = (None, handle)
    parser = Parser(recorder)
    if fast:
        install_frame_scanner(parser, handlers, recorder.publish)

    async def feed() -> None:
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            await parser.parse(wire[a:b])

    asyncio.run(feed())
    assert not parser.buf, "everything parsed"
    return recorder.events


def test_the_frame_scanner_hands_over_what_nats_py_parser_would_however_the_reads_are_cut():
    """The scanner replaces nats-py's parser for our subscriptions' frames: for any way the socket reads cut
    the stream (every single cut, then random cuts down to 1 byte), the deliveries, their order, the flow
    control answers and everything handed to nats-py (pings, other subscriptions) are the same."""
    wire = _wire()
    reference = _parse_in_chunks(wire, [], fast=False)
    kinds = [e[0] for e in reference]
    others = [i for i in range(40) if i % 5 and not i % 7]
    flow_control = [i for i in range(40) if not i % 13]
    assert kinds.count("ours") == 40 - len(others) + len(flow_control) and kinds.count("other") == len(others)
    assert kinds.count("publish") == len(flow_control) and kinds.count("ping") == 3 and kinds[:1] == ["info"]
    for cut in range(1, len(wire)):
        assert _parse_in_chunks(wire, [cut], fast=True) == reference, cut
    rng = random.Random(3)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randrange(1, 200)))
        assert _parse_in_chunks(wire, cuts, fast=True) == reference, cuts


@pytest.mark.parametrize("line", [b"MSG s 7 abc\r\n", b"MSG s x 3\r\nabc\r\n", b"HMSG s 7 r 2\r\n", b"BOGUS\r\n",
                                  b"MSG s 7 -15\r\nPING\r\n", b"MSG s 7 +3\r\nabc\r\n", b"HMSG s 7 r -1 3\r\nabc\r\n",
                                  b"MSG s 7 r x 3\r\nabc\r\n", b"HMSG s 7 r x y 3\r\nabc\r\n", b"HMSG s 7 3\r\nabc\r\n"])
def test_a_malformed_line_is_the_protocol_error_nats_py_reports(line: bytes):
    """The scanner never raises inside nats-py's read loop (that would end it silently): a line it cannot read
    goes to nats-py's parser, which reports a protocol error as it would without the scanner."""
    from nats.errors import ProtocolError

    wire = b"MSG s 7 2\r\nok\r\n" + line
    for fast in (False, True):
        with pytest.raises(ProtocolError):
            _parse_in_chunks(wire, [], fast=fast)


def test_a_flow_control_answer_that_cannot_be_sent_fails_the_read_not_the_read_loop():
    """An exception out of the parser would end nats-py's read loop (it logs and stops reading); a failed
    answer fails the batch's read instead, and the frames after it are still handled."""
    from nats.protocol.parser import Parser

    class Reader:
        failed: str | None = None

        def fail(self, reason: str) -> None:
            self.failed = reason

    reader, taken = Reader(), []

    def handle(subject, reply, data, headers):
        taken.append(data)
        return reply if reply.startswith(b"$JS.FC.") else None

    async def closed(_subject: str) -> None:
        raise ConnectionError("connection closed")

    fc = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
    wire = (b"MSG s 7 r 1\r\na\r\n" + b"HMSG fc 7 $JS.FC.x %d %d\r\n%s\r\n" % (len(fc), len(fc), fc)
            + b"MSG s 7 r 1\r\nb\r\n")
    parser = Parser(_Recorder({}))
    install_frame_scanner(parser, {7: (reader, handle)}, closed)
    asyncio.run(parser.parse(wire))
    assert taken == [b"a", b"", b"b"] and not parser.buf
    assert reader.failed is not None and "connection closed" in reader.failed


def _delivery(seq: int, cseq: int, delivered: int = 1) -> tuple[bytes, bytes, bytes, None]:
    return b"q.s", b"$JS.ACK.Q.c.%d.%d.%d.1700000000000000000.0" % (delivered, seq, cseq), b"{\"id\":%d}" % seq, None


def test_a_work_queue_batch_takes_each_sequence_once_whatever_is_redelivered():
    """Within a batch, a sequence redelivered after ack_wait is taken once (counted as a duplicate), also one
    taken after the first redelivery; a redelivered sequence not taken before is taken."""
    reader = _Reader(version=2, max_messages=100, max_bytes=None, idle=60.0, max_wait=60.0)
    deliveries = [(3, 1), (4, 1), (3, 2), (5, 1), (5, 2), (4, 3), (1, 2), (6, 2), (6, 3)]
    answers = [reader.on_queue(*_delivery(seq, cseq, n)) for cseq, (seq, n) in enumerate(deliveries, start=1)]
    assert list(reader.offsets) == [3, 4, 5, 6]
    assert (reader.duplicates, reader.acked_early) == (4, 1)
    assert answers[6] is not None and sum(a is not None for a in answers) == 1  # sequence 1 is in Delta: acked now
    assert len(reader.replies) == 4 and not reader.finished
