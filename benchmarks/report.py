"""Results: JSON (the issue's schema), a markdown table and a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def write_json(path: Path, card: str, date: str, versions: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"card": card, "date": date, "versions": versions, "rows": rows},
                               indent=1))


def markdown(rows: list[dict], tokens: int | None = None) -> str:
    """TFLOP/s per (impl, op) x shape, at one token count, with the ratio to the reference
    implementation of the same framework and op (torch_grouped_mm / lax_ragged_dot)."""
    rows = [r for r in rows if tokens is None or r["tokens"] == tokens]
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [r["shape"] for r in rows].index(s))
    table: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        table[(r["impl"], r["op"])][r["shape"]] = r
    lines = ["| impl | op | " + " | ".join(shapes) + " |",
             "|---|---|" + "---|" * len(shapes)]
    for (impl, op), by_shape in table.items():
        cells = []
        for s in shapes:
            r = by_shape.get(s)
            if r is None:
                cells.append("—")
            elif r.get("error"):
                cells.append("error")
            else:
                cells.append(f"{r['tflops']:.0f}")
        lines.append(f"| {impl} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], num: str, den: str, op_num: str, op_den: str | None = None,
           tokens: int | None = None) -> dict[str, float]:
    """Same-run TFLOP/s ratio num/den per shape."""
    op_den = op_den or op_num
    pick = {}
    for r in rows:
        if tokens is not None and r["tokens"] != tokens or r.get("error"):
            continue
        pick[(r["impl"], r["op"], r["shape"])] = r["tflops"]
    out = {}
    for (impl, op, shape), v in pick.items():
        if impl == num and op == op_num and (den, op_den, shape) in pick:
            out[shape] = v / pick[(den, op_den, shape)]
    return out


def plot(path: Path, rows: list[dict], tokens: int, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if r["tokens"] == tokens and not r.get("error")]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    series = list(dict.fromkeys(f"{r['impl']} {r['op']}" for r in rows))
    values = {(f"{r['impl']} {r['op']}", r["shape"]): r["tflops"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(series)), 5))
    width = 0.8 / max(1, len(shapes))
    for i, shape in enumerate(shapes):
        xs = [j + i * width for j in range(len(series))]
        ax.bar(xs, [values.get((s, shape), 0) for s in series], width, label=shape)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(series))])
    ax.set_xticklabels(series, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (bf16)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
