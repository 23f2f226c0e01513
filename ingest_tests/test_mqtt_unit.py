"""Pure MQTT source logic: which redeliveries are duplicates, topics for publishing, URLs, fingerprints."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from ingest_defs.sources.base import SourceError
from ingest_defs.sources.mqtt import (
    SessionLostGap,
    match_redelivered,
    parse_url,
    payload_hash,
    publish_topic,
)


def fp(pid: int, payload: str = "", topic: str = "t/a") -> tuple[int, str, int]:
    return (pid, topic, payload_hash((payload or f"p{pid}").encode()))


COMMITTED = [fp(i) for i in range(1, 11)]  # offsets in order; the last batch was pids 6..10


def test_a_crashed_batch_redelivered_whole_is_skipped_whole():
    lead = COMMITTED[5:] + [fp(11), fp(12)]  # its 5 messages, then 2 never taken (DUP=1 too)
    assert match_redelivered(lead, COMMITTED) == 5


def test_a_partly_acknowledged_batch_skips_only_its_unacknowledged_tail():
    assert match_redelivered(COMMITTED[8:] + [fp(11)], COMMITTED) == 2


def test_messages_beyond_a_full_batch_are_not_duplicates():
    # batch stopped at max_messages: what the broker sent beyond it comes back DUP=1, never written
    assert match_redelivered([fp(11), fp(12), fp(13)], COMMITTED) == 0


def test_a_match_must_reach_the_last_committed_row():
    # pids 6..8 equal a middle part of the tail, but 9 and 10 were acknowledged, not redelivered:
    # a real redelivery cannot look like this, so nothing is skipped
    assert match_redelivered(COMMITTED[5:8] + [fp(11)], COMMITTED) == 0


def test_same_packet_id_with_another_payload_or_topic_is_not_a_duplicate():
    assert match_redelivered([fp(10, "other")], COMMITTED) == 0
    assert match_redelivered([fp(10, topic="t/b")], COMMITTED) == 0
    assert match_redelivered([fp(10)], COMMITTED) == 1


def test_identical_payloads_are_told_apart_by_packet_id_and_position():
    same = [fp(i, "same") for i in range(1, 6)]
    assert match_redelivered(same[3:] + [fp(6, "same")], same) == 2
    assert match_redelivered([fp(6, "same"), fp(7, "same")], same) == 0


def test_the_longest_alignment_wins_when_fingerprints_repeat():
    # packet ids wrapped inside the window: pid 1 appears twice with the same payload
    committed = [fp(1, "x"), fp(2, "y"), fp(1, "x")]
    assert match_redelivered([fp(2, "y"), fp(1, "x")], committed) == 2
    assert match_redelivered([fp(1, "x"), fp(2, "y"), fp(1, "x"), fp(3)], committed) == 3
    assert match_redelivered([fp(1, "x"), fp(5)], committed) == 1


def test_nothing_committed_or_nothing_redelivered_skips_nothing():
    assert match_redelivered([], COMMITTED) == 0
    assert match_redelivered([fp(1)], []) == 0


def test_payload_hash_is_stable_across_processes():
    # the fingerprint is stored in the rows, so it must never depend on the process (unlike hash())
    assert payload_hash(b'{"a":1}') == -3533499026152322017  # BLAKE2b-64, little-endian, signed
    assert -(2**63) <= payload_hash(b"x" * 1000) < 2**63
    assert payload_hash(b"a") != payload_hash(b"b")


def test_publish_topics_fill_wildcards():
    f = "iot/sensors/+/temperature"
    assert publish_topic(f, 7) == "iot/sensors/sensor-2/temperature"
    assert publish_topic(f, 7, b"sensor-9") == "iot/sensors/sensor-9/temperature"
    assert publish_topic(f, 0, b"a/b+c#") == "iot/sensors/a_b_c_/temperature"
    assert publish_topic("plant/#", 0) == "plant/data"
    assert publish_topic("exact/topic", 3, b"k") == "exact/topic"


def test_urls():
    assert parse_url("mqtt://localhost:1883") == ("localhost", 1883, False)
    assert parse_url("tcp://10.0.0.1") == ("10.0.0.1", 1883, False)
    assert parse_url("mqtts://broker.example") == ("broker.example", 8883, True)
    assert parse_url("127.0.0.1:18830") == ("127.0.0.1", 18830, False)
    with pytest.raises(SourceError):
        parse_url("http://x")


def test_a_lost_session_gap_says_so_and_counts_nothing_as_lost():
    gap = SessionLostGap("p/mqtt/c", 0, 101, 100, "broker lost the persistent session", client_id="c")
    assert "lost the persistent session" in gap.describe()
    assert "'c'" in gap.describe() and "after offset 100" in gap.describe()


def test_a_taken_batch_is_packed_and_keeps_every_payload_offset_time_and_fingerprint():
    """`_take` turns the receive buffer's first n messages into a batch of packed columns: what decode, `_raw`
    and the fingerprint columns read must be exactly what arrived (newlines, empty and short payloads too),
    and the rest stays buffered for the next batch."""
    from types import SimpleNamespace

    from ingest_defs.config import parse_pipeline
    from ingest_defs.resources.brokers import source_for
    from ingest_defs.sources.base import PackedPayloads
    from ingest_defs.sources.mqtt import HASH_COLUMN, PID_COLUMN, QOS_COLUMN

    spec = parse_pipeline("unit_take", {"source": {"mqtt": {"topics": ["u/#"]}}, "table": "bronze/unit_take",
                                        "schema": {"columns": {"id": {"dtype": "int64"}}}})
    source = source_for(spec)  # no connection until a plan or read
    payloads = [b'{"id": 1}', b"", b'{"id":\n 3}', b"x" * 12, b"y" * 13, b'{"id": 6}']
    before_ms = int(time.time() * 1000)
    for i, payload in enumerate(payloads):
        source._on_message(None, None, SimpleNamespace(payload=payload, mid=100 + i, qos=0 if i == 3 else 1,
                                                       timestamp=time.monotonic(), topic=f"u/{i % 2}",
                                                       properties=None, dup=False))
    batch = source._take(5, start=41)
    after_ms = int(time.time() * 1000)
    assert isinstance(batch.payloads, PackedPayloads) and list(batch.payloads) == payloads[:5]
    assert batch.offsets.tolist() == [41, 42, 43, 44, 45] and batch.streams == ["u/0", "u/1"] * 2 + ["u/0"]
    assert all(before_ms - 1 <= t <= after_ms + 1 for t in batch.timestamps_ms.tolist())  # ms, wall clock
    assert batch.extra_columns[HASH_COLUMN].to_list() == [payload_hash(p) for p in payloads[:5]]
    assert batch.extra_columns[PID_COLUMN].to_list() == [100, 101, 102, None, 104]  # QoS 0: no packet id
    assert batch.extra_columns[QOS_COLUMN].to_list() == [1, 1, 1, 0, 1]
    assert batch.ack_token[1].tolist() == [100, 101, 102, 104] and batch.nbytes == sum(map(len, payloads[:5]))
    assert list(source._payloads) == payloads[5:] and source._payloads.nbytes == len(payloads[5])  # waits
    assert len(source._take(0, start=46)) == 0
    rest = source._take(1, start=46)
    assert list(rest.payloads) == payloads[5:] and rest.offsets.tolist() == [46]


def test_the_receive_buffer_drops_keeps_and_packs_payloads_by_position():
    """What `_pull`, the redelivery match and the QoS 0 drain read from the receive buffer after partial drops
    and a selection: the same payloads, byte counts and packed batches a list of `bytes` would give."""
    from ingest_defs.sources.mqtt import ReceivedPayloads

    payloads = [b"a", b"", b"line\nbreak", b"x" * 300, b"\n", b"last"]
    received = ReceivedPayloads()
    for payload in payloads:
        received.append(payload)
    assert len(received) == 6 and received.nbytes == sum(map(len, payloads))
    assert [received[i] for i in range(6)] == payloads and received.length(3) == 300
    assert list(received.packed(4)) == payloads[:4] and received.packed(4).joined() == b"\n".join(payloads[:4])
    received.drop(2)
    assert list(received) == payloads[2:] and received.nbytes == sum(map(len, payloads[2:]))
    received.keep([0, 2, 3])
    assert list(received) == [payloads[2], payloads[4], payloads[5]]
    received.append(b"new")
    assert list(received.packed(4)) == [payloads[2], payloads[4], payloads[5], b"new"]
    received.drop(4)
    assert len(received) == 0 and received.nbytes == 0 and len(received.packed(0)) == 0


def test_pubacks_are_v5_success_packets_in_the_given_order():
    from ingest_defs.sources.mqtt import pubacks

    mids = [1, 258, 65535, 7]
    assert pubacks(mids) == b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in mids)
    assert pubacks(np.array(mids, dtype=np.int32)) == pubacks(mids) and pubacks([]) == b""
