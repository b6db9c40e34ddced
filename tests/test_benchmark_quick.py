"""The ``--quick`` benchmark runs end to end and writes its files with finite numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.testbeds.digits import DEFAULT_CHECKPOINT

EXPECTED_METHODS = {"full", "steps/2", "X-Slim step 0.1/0.3"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.run import main

    out = tmp_path_factory.mktemp("bench_quick")
    threads = torch.get_num_threads()
    argv = ["--quick", "--out", str(out), "--no-progress", "--samples", "4", "--steps", "12"]
    if not (DEFAULT_CHECKPOINT / "transformer").is_dir():
        argv += ["--checkpoint", "random"]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_files_exist(quick_run: Path) -> None:
    for name in (
        "results.json",
        "report.html",
        "digits_frontier.png",
        "digits_decisions.png",
        "digits_indicator.png",
        "report.md",
    ):
        assert (quick_run / name).stat().st_size > 0, name
    html = (quick_run / "report.html").read_text()
    assert "data:image/png;base64," in html
    for m in EXPECTED_METHODS:
        assert f"data-method='{m}'" in html  # a labelled sample row per method
    assert "{'" not in html  # metadata as tables, not dict reprs
    # the realism ruler: 6 of the 12 steps stands in for FLUX.1-dev's 25 of 50 (17.92 dB)
    assert "<tr class='ruler-row'><td>25 steps</td>" in html and "17.92 dB" in html
    md = (quick_run / "report.md").read_text()
    assert "realism ruler" in md and "| 25 steps | 1.98x | 17.92 dB | steps/2 (6 of 12 steps) |" in md


def test_json_has_methods_with_finite_numbers(quick_run: Path) -> None:
    res = json.loads((quick_run / "results.json").read_text())
    tb = res["testbeds"]["digits"]
    assert set(tb["methods"]) == EXPECTED_METHODS
    assert tb["restored_bit_identical"] is True
    for name, e in tb["methods"].items():
        keys = ["speedup", "flops_fraction", "ssim", "accuracy", "frechet_distance", "median_seconds"]
        if name != "full":
            keys.append("psnr")  # the reference against itself is "inf"
        for k in keys:
            assert isinstance(e[k], (int, float)) and math.isfinite(e[k]), (name, k, e[k])
        # every other method is timed next to a run of the reference, once per repeat
        per_repeat = len(EXPECTED_METHODS) - 1 if name == "full" else 1
        assert len(e["times"]) == res["meta"]["repeats"] * per_repeat
    assert tb["methods"]["full"]["psnr"] == "inf"
    assert tb["methods"]["full"]["speedup"] == 1.0
    load = tb["timing_load_average"]
    assert load["cpu_count"] >= 1 and (load["before"] is None or len(load["before"]) == 3)
    assert tb["methods"]["full"]["flops_fraction"] == pytest.approx(1.0)
    assert tb["methods"]["steps/2"]["flops_fraction"] == pytest.approx(0.5)
    xs = tb["methods"]["X-Slim step 0.1/0.3"]
    assert 0 < xs["xslim_flops_fraction"] <= 1
    assert math.isfinite(xs["bookkeeping_fraction_of_full_step"])
    assert len(xs["run_stats"][0]["kinds"]) == 12
    for k in ("accuracy_real_n", "frechet_distance_real_n", "frechet_distance_train_vs_test"):
        assert math.isfinite(tb["floors"][k])
