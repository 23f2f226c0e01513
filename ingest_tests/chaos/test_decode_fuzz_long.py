"""The decoder fuzz, long profile (`make chaos`): the properties of test_decode_fuzz.py, many more examples."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_tests import fuzzing

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]

LONG = settings(max_examples=3000, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@LONG
@given(fuzzing.payloads(), st.booleans())
def test_a_message_decodes_the_same_alone_and_among_others_long(message: bytes, with_dates: bool):
    fuzzing.check_message_alone_and_among_others(message, with_dates)


@settings(LONG, max_examples=800)
@given(st.lists(fuzzing.payloads(), min_size=1, max_size=30), st.booleans())
def test_decoding_a_batch_never_raises_and_loses_nothing_long(batch: list[bytes], with_dates: bool):
    for kind, detail in fuzzing.decode_outcomes(batch, with_dates):
        if kind == "quarantined":
            fuzzing.assert_readable(detail)


@settings(LONG, max_examples=400)
@given(st.lists(fuzzing.payloads(), min_size=1, max_size=30),
       st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=30, max_size=30),
       st.lists(st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)), min_size=30, max_size=30),
       st.booleans())
def test_a_batch_through_decode_and_validation_lands_each_message_once_long(batch, keys, timestamps, strict):
    fuzzing.run_rows(batch, keys[: len(batch)], timestamps[: len(batch)], strict)
