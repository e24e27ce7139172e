"""The frontier as a Mermaid ``xychart-beta`` block (GitHub renders it in Markdown and job summaries): one bar
per measured candidate, ordered by cost, its height the damage; the gate as a line; the chosen candidate's
label starts with ``*``."""

from __future__ import annotations

CHOSEN_MARK = "*"


def _quoted(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _number(value: float) -> str:
    return f"{value:.4g}"


def mermaid_frontier(rows: list[dict], objective: str, gate_kind: str, gate_value: float) -> str:
    """``rows``: the report's search candidates (label, cost_ratio, accuracy_drop_pt, agreement, chosen).
    ``gate_kind``: "accuracy_drop_pt" (y = top-1 drop, points) or "agreement" (y = agreement)."""
    done = sorted((r for r in rows if r.get("cost_ratio") is not None), key=lambda r: r["cost_ratio"])
    if not done:
        return ""
    labels = [(CHOSEN_MARK if r.get("chosen") else "") + f"{r['label']} ({r['cost_ratio']:.2f}x)" for r in done]
    values = [r.get(gate_kind) if r.get(gate_kind) is not None else 0.0 for r in done]
    what = "top-1 drop (pt)" if gate_kind == "accuracy_drop_pt" else "agreement with the original"
    low, high = min([*values, gate_value]), max([*values, gate_value])
    margin = (high - low) * 0.1 or 0.1
    low = 0.0 if gate_kind == "accuracy_drop_pt" and low >= 0 else low - margin
    cost = "latency" if objective == "latency" else "zipped size"
    return "\n".join([
        "```mermaid",
        "xychart-beta",
        f"    title {_quoted(f'{what} by {cost} ratio (compressed / original); gate as the line')}",
        f"    x-axis {_quoted(f'candidate ({cost} ratio)')} [{', '.join(_quoted(l) for l in labels)}]",
        f"    y-axis {_quoted(what)} {_number(low)} --> {_number(high + margin)}",
        f"    bar [{', '.join(_number(v) for v in values)}]",
        f"    line [{', '.join(_number(gate_value) for _ in values)}]",
        "```",
    ])


def frontier_png(search: dict) -> bytes | None:
    """The same frontier as a PNG (matplotlib, the optional ``plot`` extra; None without it or without a
    measured candidate): every candidate at (cost ratio, damage), the frontier joined, the chosen one starred,
    the gate as a dashed line. ``search``: the report's search section."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    (gate_kind, gate_value), = search["gate"].items()
    done = sorted((r for r in search["candidates"] if r.get("cost_ratio") is not None and r.get(gate_kind) is not None),
                  key=lambda r: r["cost_ratio"])
    if not done:
        return None
    import io

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    axes.scatter([r["cost_ratio"] for r in done], [r[gate_kind] for r in done], color="#888888", label="candidate")
    front = [r for r in done if r.get("on_frontier")]
    axes.plot([r["cost_ratio"] for r in front], [r[gate_kind] for r in front], color="#1f77b4", marker="o",
              label="frontier")
    for row in done:
        axes.annotate(row["label"], (row["cost_ratio"], row[gate_kind]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    chosen = [r for r in done if r.get("chosen")]
    if chosen:
        axes.scatter([chosen[0]["cost_ratio"]], [chosen[0][gate_kind]], marker="*", s=220, color="#d62728",
                     zorder=3, label="chosen")
    axes.axhline(gate_value, color="#d62728", linestyle="--", linewidth=1, label="gate")
    axes.set_xlabel(f"{search['cost']} (compressed / original)")
    axes.set_ylabel("top-1 drop (pt)" if gate_kind == "accuracy_drop_pt" else "agreement with the original")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    plt.close(figure)
    return buffer.getvalue()
