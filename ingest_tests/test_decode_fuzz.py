"""Fuzzing decoding and validation (bounded here; `make chaos` runs the long profile in chaos/).

Properties, over structured hostile JSON, raw bytes and mutated good messages:
* decoding never raises, and every message is in exactly one of the rows or the failures;
* a message's outcome (its row, or its reason) is the same alone, among good messages (the fast path)
  and beside an invalid one (the isolating path);
* an accepted message's values are exactly what a careful JSON reader sees;
* every reason is non-empty and free of parser internals;
* the lifecycle's decode + standard columns + validation puts every message in target or quarantine once,
  whatever the keys and broker timestamps.
"""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest_defs.decode import MAX_DEPTH
from ingest_tests import fuzzing

BOUNDED = settings(max_examples=100, deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def nested(levels: int) -> bytes:
    """A message `levels` deep: its `name` field is arrays nested in arrays (the object is level 1)."""
    return b'{"id":0,"name":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


@BOUNDED
@given(fuzzing.payloads(), st.booleans())
@example(nested(MAX_DEPTH), False)  # the deepest accepted: its value kept (the long profile found it once)
@example(nested(MAX_DEPTH + 1), False)  # one level deeper: quarantined with a reason
def test_a_message_decodes_the_same_alone_and_among_others(message: bytes, with_dates: bool):
    fuzzing.check_message_alone_and_among_others(message, with_dates)


@settings(BOUNDED, max_examples=40)
@given(st.lists(fuzzing.payloads(), min_size=1, max_size=8), st.booleans())
def test_decoding_a_batch_never_raises_and_loses_nothing(batch: list[bytes], with_dates: bool):
    outcomes = fuzzing.decode_outcomes(batch, with_dates)
    for kind, detail in outcomes:
        if kind == "quarantined":
            fuzzing.assert_readable(detail)


@settings(BOUNDED, max_examples=30)
@given(st.lists(fuzzing.payloads(), min_size=1, max_size=10),
       st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=10, max_size=10),
       st.lists(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)), min_size=10, max_size=10),
       st.booleans())
def test_a_batch_through_decode_and_validation_lands_each_message_once(batch, keys, timestamps, strict):
    fuzzing.run_rows(batch, keys[: len(batch)], timestamps[: len(batch)], strict)
