"""The README's headline table is what ``python -m benchmarks.headline`` prints from the committed
results JSON (no number retyped by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import headline

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_results_section_is_printed_from_the_committed_json() -> None:
    printed = headline.markdown(json.loads(headline.RESULTS.read_text()))
    readme = README.read_text()
    section = readme[readme.index("## Results") : readme.index("## Documentation")]
    assert printed in section
    rows = [ln for ln in printed.splitlines() if ln.startswith("| ") and ln[2:4].isdigit()]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| 20", "2x"], ["| 20", "3x"], ["| 28", "2x"], ["| 28", "3x"], ["| 50", "2x"], ["| 50", "3x"]
    ]  # fmt: skip
    assert "28 steps, 2x: +1 dB over fewer steps:" in printed
    assert "Realism ruler (published FLUX.1-dev vs this testbed, dB): 25 steps 17.9 vs" in printed


def test_cells_read_the_frontier() -> None:
    points = [(2.0, 40.0), (3.0, 30.0), (2.5, 20.0)]  # (2.5x, 20 dB) is dominated
    assert headline.cell(points, 2.5) == "35.0"
    assert headline.cell(points, 3.5) == "30.0 (3.0x)"  # nearest point within 0.85-1.25 s
    assert headline.cell(points, 5.0) == "-"


def test_targets_are_checked_within_each_run() -> None:
    x = {"family": "xslim-optimal", "psnr": 30.0, "flops_speedup": 2.0}
    x3 = {"family": "xslim-optimal", "psnr": 25.0, "flops_speedup": 3.0}
    f = {"family": "fewer-steps", "psnr": 29.5, "flops_speedup": 2.0}
    f3 = {"family": "fewer-steps", "psnr": 20.0, "flops_speedup": 3.0}
    tb = {"methods": {"a": x, "b": x3, "c": f, "d": f3}}
    tbs = {name: tb for runs in headline.RUNS.values() for name in runs}
    lines = headline.target_lines(tbs)
    assert lines[0].startswith("20 steps: X-Slim above every peer where both reach (1.5x-5x FLOPs): met")
    assert lines[-2] == "28 steps, 2x: +1 dB over fewer steps: missed by 0.5 dB (+0.5 dB)"
    assert lines[-1] == "28 steps, 3x: +1 dB over fewer steps: met (+5.0 dB)"
