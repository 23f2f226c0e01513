"""Draw `make bench` figures as one PNG: one panel per section that ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"kafka": 0.7, "nats": 0.8, "mqtt": 0.9}


def _throughput(ax: Any, rows: list[dict[str, Any]]) -> None:
    names = [r["name"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ratio"] for r in rows], 0.4, label="A: in-run")
    ax.bar([x + 0.2 for x in xs], [r.get("ratio_b") or 0 for r in rows], 0.4, label="B: via Dagster runs")
    for x, r in zip(xs, rows, strict=True):
        target = next((t for k, t in TARGETS.items() if r["name"].startswith(k)), None)
        if target:
            ax.hlines(target, x - 0.4, x + 0.4, colors="red", linestyles="dashed")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("× bare client read")
    ax.set_title("Throughput ratio (dashed: target A)")
    ax.legend(fontsize=7)


def _overhead(ax: Any, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        series = r["per_batch_ms"]
        window = 25
        smooth = [sorted(series[max(0, i - window):i + 1])[len(series[max(0, i - window):i + 1]) // 2]
                  for i in range(len(series))]
        ax.plot(range(1, len(series) + 1), smooth, label=f"maintenance {'on' if r['maintenance'] else 'off'}")
    ax.axhline(150, color="red", linestyle="dashed", linewidth=1)
    ax.set_xlabel("batch #")
    ax.set_ylabel("ms (rolling median)")
    ax.set_title("Per-batch overhead (dashed: p95 target)")
    ax.legend(fontsize=7)


def _memory(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r.get('broker', 'kafka')} {r['backlog'] / 1e6:g}M, batch {r['batch'] // 1000}k" for r in rows]
    ax.bar(labels, [r["baseline_mb"] for r in rows], label="idle baseline")
    private = [r["anon_above_baseline_mb"] for r in rows]
    ax.bar(labels, private, bottom=[r["baseline_mb"] for r in rows], label="private memory above baseline")
    ax.bar(labels, [r["above_baseline_mb"] - p for r, p in zip(rows, private, strict=True)],
           bottom=[r["baseline_mb"] + p for r, p in zip(rows, private, strict=True)],
           label="rest of the peak (mostly code pages mapped in)")
    ax.set_ylabel("MB (RSS)")
    ax.set_title("Memory of a drain")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.legend(fontsize=7)


def _freshness(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['pipeline'].removeprefix('fresh_')} ({r['pipelines_together']}, {r.get('shape', 'uniform')})"
              + (f" linger {r['linger_s']}s" if r.get("linger_s") not in (None, "default") else "") for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["p50_s"] or 0 for r in rows], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p95_s"] or 0 for r in rows], 0.4, label="p95")
    ax.axhline(15, color="red", linestyle="dashed", linewidth=1)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("s, publish → visible")
    ax.set_title("Freshness (n pipelines together; dashed: p95 target)")
    ax.legend(fontsize=7)


def _shards(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['shards']} shard(s)" for r in rows]
    ax.bar(labels, [r["rate"] / 1000 for r in rows], label="msg/s (k), launch to last exit")
    ax.plot(labels, [r["cpu_use"] * max(r["rate"] for r in rows) / 1000 for r in rows], "o--", color="black",
            label="cores used (scaled to the tallest bar = 100%)")
    ax.set_ylabel("k msg/s")
    ax.set_title(f"Shards: {rows[0]['messages']:,} over 12 partitions")
    ax.legend(fontsize=7)


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, fn) for name, fn in (("throughput", _throughput), ("overhead", _overhead),
                                          ("memory", _memory), ("freshness", _freshness), ("shards", _shards))
              if results.get(name)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, fn) in zip(axes[0], panels, strict=True):
        fn(ax, results[name])
    fig.suptitle(f"make bench — {results['started']}" + (" (quick)" if results.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
