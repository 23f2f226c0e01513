"""How the process gives freed memory back, so a drain's memory follows one batch, not the largest so far.

Three allocators serve a batch: polars and deltalake each bring a jemalloc, and everything else (Python's
large objects, librdkafka, nats-py and paho buffers, pyarrow) uses glibc's malloc.

* The jemallocs keep freed pages for 10 s by default. A batch frees its frames before the next one builds
  them, so with decay 0 the peak follows one batch (measured: 110 → 85 MB above the idle baseline for
  100k-message batches), at no measurable CPU cost. They read `_RJEM_MALLOC_CONF` when they load, so
  `configure()` runs from the package's `__init__`, before anything imports them; an explicit setting wins.
  Their per-thread caches hold freed blocks of up to 32 kB by default, in every thread that ever allocated
  (polars' and delta-rs's pools, ours): `tcache_max:1024` keeps ~2 MB less after the batches (40 delta-rs
  writes of 50k rows: 7.7 → 5.4 MB still held; polars' JSON decode as fast). Without any thread cache
  (`tcache:false`) the same decode took 35 times as long.
* glibc keeps what a batch freed inside its heaps (main and per-thread arenas) unless the free space sits at
  a heap's top: after a 100k-message Kafka batch, 25–45 MB that the next batch does not always reuse
  (fragments). `release_after_batch()` hands the free pages back with `malloc_trim(0)`, 4–10 ms for such a
  batch, so only after batches of at least `TRIM_AFTER_BYTES` (micro-batches keep their per-batch cost).
* glibc serves a block from its heaps or maps it apart above a threshold that it raises to the largest block
  freed so far (up to 32 MB): once a batch's 10 MB buffer is freed, every later 300 KB consume chunk lands in
  the heap and fragments it. A fixed `MMAP_THRESHOLD_BYTES` keeps such blocks mapped apart, unmapped when
  freed (with the trim: a 1M Kafka drain's peak 199 → 179 MB above baseline, the 1-partition read as fast
  within noise). An explicit `MALLOC_MMAP_THRESHOLD_` (or `glibc.malloc.mmap_threshold` tunable) wins.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from functools import cache

JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0,tcache_max:1024"
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 << 10
TRIM_AFTER_BYTES = 1 << 20  # payload bytes of a batch worth a malloc_trim (4-10 ms at 10 MB)


def configure() -> None:
    os.environ.setdefault("_RJEM_MALLOC_CONF", JEMALLOC_CONF)
    mallopt = getattr(_libc(), "mallopt", None)
    chosen = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    if mallopt is not None and not chosen:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@cache
def _libc() -> ctypes.CDLL | None:
    """The symbols already loaded, the C library's among them (no library search); None where that is not
    possible (Windows)."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl)."""
    return getattr(_libc(), "malloc_trim", None)


def release_after_batch(nbytes: int) -> bool:
    """Give the C heap's free pages back to the system after a batch of `nbytes` payload bytes (True if done)."""
    trim = _malloc_trim()
    if trim is None or nbytes < TRIM_AFTER_BYTES:
        return False
    trim(0)
    return True
