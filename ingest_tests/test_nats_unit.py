"""Pure logic of the NATS source (no broker): delivery metadata, publish subjects, durable drift."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.js import api

from ingest_defs.sources.nats import (
    _drifted,
    fast_path_supported,
    headers_from_dict,
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
