"""The README's table of supported models x features says what ``xslim-xdit info --json`` says,
row by row (both read ``xslim_xdit/support.py``; the README is written by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = (
    "| family | transformer classes | levels | xDiT layouts tested | diffusers pipelines tested | notes |"
)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _items(cell: str) -> list[str]:
    return [] if cell == "-" else [i.strip().strip("`") for i in cell.split(",")]


def readme_rows() -> list[dict]:
    lines = README.read_text().splitlines()
    assert HEADER in lines, f"README.md: the support table's header is missing:\n{HEADER}"
    i = lines.index(HEADER) + 2  # after the header and the --- line
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        family, classes, levels, layouts, pipelines, notes = _cells(lines[i])
        rows.append(
            {
                "family": family,
                "model_classes": _items(classes),
                "levels": _items(levels),
                "xdit_layouts": [x.strip() for x in layouts.split(", ")] if layouts != "-" else [],
                "pipelines": _items(pipelines),
                "note": "" if notes == "-" else notes,
            }
        )
        i += 1
    return rows


def test_readme_table_matches_info():
    # a fresh interpreter: the package's own families, not those a test file registered
    done = subprocess.run(
        [sys.executable, "-m", "xslim_xdit.cli", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)["families"]
    readme = readme_rows()
    assert [r["family"] for r in readme] == [f["family"] for f in info], (
        "README rows: one per family, in order"
    )
    for row, fam in zip(readme, info, strict=True):
        expected = {k: fam[k] for k in row}
        assert row == expected, f"README.md row {row['family']!r} differs from `xslim-xdit info --json`"


def test_the_parser_reads_a_changed_row():
    lines = README.read_text().splitlines()
    row = next(line for line in lines if line.startswith("| flux |"))
    assert _items(_cells(row)[2]) == ["step", "block", "token"]
    assert _items("-") == [] and _items("`A`, `B`") == ["A", "B"]
