#!/usr/bin/env python3
"""Render the exporter-coverage matrix (tests/test_coverage.py) as Markdown.

    ONNXADMM_COVERAGE_LOG=cov.jsonl python -m pytest -m slow tests/test_coverage.py -rs | tee cov.txt
    python scripts/coverage_table.py cov.jsonl [--pytest-output cov.txt] > docs/COVERAGE.md

Each passing cell appended one JSON line (layers found, compressed, left dense with their reasons, seconds).
Cells that pytest reported as skipped or failed have no line; ``--pytest-output`` (the ``-rs`` summary) adds
them with pytest's own words, so the table shows every cell of the matrix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_coverage import ARCHITECTURES, EXPORTERS, OPSETS  # noqa: E402

CELL = re.compile(r"(FAILED|ERROR)[^\[]*\[(?P<id>[^\]]+)\]:?\s*(?P<why>.*)")
SKIP = re.compile(r"SKIPPED .*could not export (?P<name>\S+) \((?P<exporter>\w+), opset (?P<opset>\d+)\): (?P<why>.*)")


def outcomes(pytest_output: Path | None) -> dict[tuple[str, str, int], str]:
    """(model, exporter, opset) -> 'skipped: why' / 'failed: why' from pytest's short summary."""
    found: dict[tuple[str, str, int], str] = {}
    if pytest_output is None:
        return found
    for line in pytest_output.read_text().splitlines():
        skipped = SKIP.search(line)
        if skipped:
            key = (skipped["name"], skipped["exporter"], int(skipped["opset"]))
            found[key] = f"skipped: torch cannot export it: {skipped['why'][:160]}"
            continue
        match = CELL.search(line)
        if not match:
            continue
        name, exporter, opset = match["id"].split("-")[:3]
        why = re.sub(r"^(tests/\S+ )?(- )?", "", match["why"]).strip()
        found[(name, exporter, int(opset))] = f"{match[1].lower()}: {why[:160]}"
    return found


def render(rows: list[dict], other: dict[tuple[str, str, int], str]) -> str:
    done = {(r["model"], r["exporter"], r["opset"]): r for r in rows}
    lines = ["| model | exporter | opset | result | layers | compressed | left dense (reasons) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sorted(ARCHITECTURES):
        for exporter in EXPORTERS:
            for opset in OPSETS:
                row = done.get((name, exporter, opset))
                if row is None:
                    lines.append(f"| {name} | {exporter} | {opset} | {other.get((name, exporter, opset), 'not run')}"
                                 " | | | | |")
                    continue
                reasons = "; ".join(row.get("reasons", [])) or "—"
                lines.append(f"| {name} | {exporter} | {opset} | pass | {row['compressible'] + row['declined']} | "
                             f"{row['layers_compressed']} | {row['layers_left_dense']} ({reasons}) | "
                             f"{row['seconds']} |")
    passed = sum(1 for key in done if key[0] in ARCHITECTURES)
    total = len(ARCHITECTURES) * len(EXPORTERS) * len(OPSETS)
    return "\n".join([f"{passed} of {total} cells pass.", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="the JSON-lines file written via $ONNXADMM_COVERAGE_LOG")
    parser.add_argument("--pytest-output", type=Path, help="pytest's output with the -rs / -rf summary")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    print(render(rows, outcomes(args.pytest_output)))


if __name__ == "__main__":
    main()
