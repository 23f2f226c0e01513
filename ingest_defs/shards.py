"""Shards: one Kafka pipeline split over N concurrent runs, each owning a fixed subset of the partitions.

Shard *i* of *N* owns every partition *p* with ``p % N == i``. The rule needs no state: a partition added
to the topic later belongs to its shard from the next plan on, and changing N needs no migration, because
the Delta transaction ids stay per partition (``{pipeline}/kafka/{topic}/{partition}``) whoever commits
them. Two shards therefore never share a transaction id: their commits into the one target table are
blind appends that delta-rs rebases onto each other, and a commit that still loses a race (another
writer changed the table's metadata) is retried by the sink after re-reading this shard's versions.

Planning owns shards: a shard is the pipeline's source restricted to its partitions (see
``KafkaSource(shard=...)``); read, decode, validate, commit and acknowledge are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ingest_defs.config import PipelineSpec


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist (0 ≤ shard < {self.count})")

    def owns(self, partition: int) -> bool:
        return partition % self.count == self.index

    def partitions(self, partitions: Iterable[int]) -> list[int]:
        """The partitions of `partitions` this shard owns, sorted."""
        return sorted(p for p in partitions if self.owns(p))

    @property
    def label(self) -> str:
        """How runs, tags and logs name it: `1/3` is the second of three shards."""
        return f"{self.index}/{self.count}"


def shards_of(spec: PipelineSpec) -> list[Shard]:
    """Every shard of a pipeline (one for an unsharded pipeline)."""
    return [Shard(i, spec.shards) for i in range(spec.shards)]


def assignment(partitions: Iterable[int], count: int) -> dict[int, list[int]]:
    """Shard index → the partitions it owns (every shard listed, even one with no partition yet)."""
    out: dict[int, list[int]] = {i: [] for i in range(count)}
    for p in sorted(partitions):
        out[p % count].append(p)
    return out


def shard_of_app_id(app_id: str, count: int) -> int | None:
    """The shard a Kafka transaction id (`.../kafka/{topic}/{partition}`) belongs to; None for other ids."""
    head, _, tail = app_id.rpartition("/")
    if "/kafka/" not in f"/{head}/" or not tail.isdigit():
        return None
    return int(tail) % count


# ------------------------------------------------------------ Dagster names (one job, op and pool per shard)
def shard_job_name(spec: PipelineSpec, index: int) -> str:
    return f"{spec.name}_shard_{index}_job"


def shard_op_name(spec: PipelineSpec, index: int) -> str:
    return f"ingest_{spec.name}_shard_{index}"


def shard_pool_name(spec: PipelineSpec, index: int) -> str:
    """Each shard's own concurrency pool: one run per shard at a time (dagster.yaml: limit 1, per run)."""
    return f"ingest_{spec.name}_shard_{index}"
