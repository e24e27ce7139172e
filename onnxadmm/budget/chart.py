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
