"""Plots for docs/benchmarks.md from saved bench results (PNG files in docs/img/).

    python bench/delay_release.py --save docs/bench-results/delay_release.json
    python bench/plots.py docs/bench-results/*.json

Draws the release-lateness distribution (from ``delay_release``) and the throughput figures
against their bars (from every result that has them). Needs matplotlib (``pip install
'.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"

# (result bench, key, label, bar)
THROUGHPUT = [
    ("put_inprocess", ("msg_per_s", "batch"), "put in-process\n(batches of 100)", 100_000),
    ("http_produce", ("batch100_msg_per_s",), "produce HTTP\n(batches of 100)", 30_000),
    ("http_consume", ("msg_per_s",), "receive+ack HTTP\n(batches of 32)", 20_000),
    ("http_schedule", ("embedded_msg_per_s",), "schedule HTTP\nembedded store", 20_000),
    ("http_schedule", ("redis_msg_per_s",), "schedule HTTP\nRedis store", 20_000),
]


def load(paths: list[Path]) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                data = json.loads(line)
                results[data["bench"]] = data
    return results


def dig(data: dict[str, object], keys: tuple[str, ...]) -> float | None:
    value: object = data
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def plot_lateness(result: dict[str, object], out: Path) -> Path:
    hist = {int(k): v for k, v in result["lateness_histogram_ms"].items()}  # type: ignore[union-attr]
    total = sum(hist.values())
    xs, ys, seen = [], [], 0
    for ms in sorted(hist):
        seen += hist[ms]
        xs.append(ms)
        ys.append(100 * seen / total)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(xs, ys, where="post")
    ax.axvline(10, color="tab:orange", linestyle="--", label="p99 bar (10 ms)")
    ax.axvline(50, color="tab:red", linestyle=":", label="max bar (50 ms)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("release lateness: RELEASED_AT - DELIVER_AT (ms)")
    ax.set_ylabel("messages released within (%)")
    ax.set_title(
        f"{total:,} releases at {result['rate_per_s']:,}/s with {result['pending']:,} pending"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    path = out / "lateness.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_throughput(results: dict[str, dict[str, object]], out: Path) -> Path:
    labels, values, bars = [], [], []
    for bench, keys, label, bar in THROUGHPUT:
        value = dig(results.get(bench, {}), keys)
        if value is not None:
            labels.append(label)
            values.append(value / 1000)
            bars.append(bar / 1000)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(labels))
    ax.bar(xs, values, color="tab:blue", label="measured")
    ax.scatter(xs, bars, color="tab:red", marker="_", s=900, linewidths=3, label="bar", zorder=3)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("thousand messages / s")
    ax.set_title("throughput against its bar (2 vCPUs)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    path = out / "throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=OUT, help="where the PNG files go")
    args = ap.parse_args()
    results = load(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    if "delay_release" in results and "lateness_histogram_ms" in results["delay_release"]:
        print(plot_lateness(results["delay_release"], args.out))
    print(plot_throughput(results, args.out))


if __name__ == "__main__":
    main()
