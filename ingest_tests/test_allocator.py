"""The process gives a batch's freed memory back (ingest_defs/allocator.py): jemalloc decay for polars and
delta-rs, glibc's heap trimmed after large batches, its mmap threshold fixed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest_defs import allocator


def _anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_jemalloc_decay_is_set_before_polars_loads_and_an_explicit_setting_wins():
    script = "import os, ingest_defs; print(os.environ['_RJEM_MALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == allocator.JEMALLOC_CONF
    out = subprocess.run([sys.executable, "-c", script], env={**env, "_RJEM_MALLOC_CONF": "narenas:2"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "narenas:2"


@pytest.mark.skipif(allocator._malloc_trim() is None, reason="a C library without malloc_trim (not glibc)")
def test_freed_heap_pages_go_back_after_a_large_batch_only():
    # 96 MB in 64 KB blocks (below the mmap threshold: they come from the heap), then all freed but the last,
    # which pins the heap's top: glibc keeps the free space below it until malloc_trim.
    blocks = [b"x" * (64 << 10) for _ in range(1536)]  # written, so every page is resident
    last = blocks[-1]
    del blocks
    before = _anon_mb()
    assert not allocator.release_after_batch(allocator.TRIM_AFTER_BYTES - 1)  # a micro-batch: not worth it
    assert allocator.release_after_batch(allocator.TRIM_AFTER_BYTES)
    assert before - _anon_mb() > 48, f"{before:.0f} MB -> {_anon_mb():.0f} MB"
    del last
