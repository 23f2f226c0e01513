"""Pure parts of `make bench` that its figures depend on: traffic shapes, the soak's pipelines and process
roles, RSS growth, the memory floor's pipeline. (The benchmarks themselves run in `make bench`, not in `make test`.)"""

from __future__ import annotations

import polars as pl

from ingest_defs.bench.common import payload
from ingest_defs.bench.memory import library_floor
from ingest_defs.bench.soak import growth, role_of, soak_skipped, soak_specs
from ingest_defs.bench.traffic import bursty, uniform, with_sent_at
from ingest_defs.config import DEFAULT_PIPELINES_FILE, load_pipelines


def test_uniform_traffic_is_evenly_spaced_and_never_idle():
    ticks = list(uniform(200).ticks(1000.0, 2.0))
    assert sum(n for _, n in ticks) == 400
    gaps = {round(b[0] - a[0], 6) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert gaps == {0.005}  # a message every 5 ms: far below idle_ms


def test_bursty_traffic_sends_a_period_at_once_then_is_silent():
    ticks = list(bursty(200, every=5).ticks(1000.0, 20.0))
    assert ticks == [(1000.0, 1000), (1005.0, 1000), (1010.0, 1000), (1015.0, 1000)]


def test_sent_at_is_added_to_objects_and_bad_payloads_stay_bad():
    assert with_sent_at(b'{"a":1}', 12.5) == b'{"a":1,"sent_at":12.5}'
    for bad in (b"{not json", b"\xff\xfe", b"", b"[1]"):
        assert with_sent_at(bad, 1.0) == bad


def test_the_soak_runs_the_shipped_pipelines_on_broker_objects_of_its_own():
    shipped = load_pipelines(DEFAULT_PIPELINES_FILE)
    specs = {s.name: s for s in soak_specs(shipped, "123")}
    registry = {name for name, spec in shipped.items() if spec.uses_registry}
    assert set(specs) == set(shipped) - registry and len(soak_skipped(shipped)) == len(registry)
    for name, spec in specs.items():
        original = shipped[name]
        assert spec.trigger == original.trigger and spec.batch == original.batch
        assert spec.maintenance == original.maintenance and spec.table == original.table
        assert "sent_at" in spec.payload_schema
        assert spec.source.kind == original.source.kind and spec.source != original.source


def test_process_roles_and_growth():
    assert role_of("/venv/bin/python -m dagster_webserver --port 3070") == "webserver"
    assert role_of("/venv/bin/python -m dagster._daemon run") == "daemon"
    assert role_of("/venv/bin/python -m dagster api grpc --lazy-load-user-code") == "code_server"
    assert role_of("/venv/bin/python -m dagster api execute_run {...}") == "run"
    assert role_of("/venv/bin/python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=4)") == "run"
    assert role_of("/venv/bin/python -m dagster code-server start --socket /tmp/x") == "code_server_proxy"
    assert role_of("/usr/bin/mosquitto -c x") is None
    samples = [{"minute": m, "rss_mb": {"daemon": 200 + (m if m < 5 else 5)}} for m in range(11)]
    g = growth(samples, "daemon")
    assert (g["first_mb"], g["last_mb"], g["peak_mb"]) == (200, 205, 205)
    assert g["slope_first_half_mb_per_min"] > 0.5 and g["slope_second_half_mb_per_min"] == 0


def test_the_memory_floor_writes_every_payload_once_as_a_bare_pipeline_would():
    floor = library_floor(batch=500, batches=3)
    rows = pl.read_delta(floor["table"]).sort("_offset")
    assert rows["_offset"].to_list() == list(range(1500))
    assert rows["_raw"].to_list() == [payload(i) for i in range(1500)]
    assert rows["id"].to_list() == list(range(1500))  # decoded into the schema's columns
    assert floor["above_baseline_mb"] >= floor["anon_above_baseline_mb"] > 0  # the whole peak holds the private one
    assert floor["payload_bytes_per_batch_mb"] * 2**20 == max(
        sum(len(payload(b * 500 + i)) for i in range(500)) for b in range(3))
