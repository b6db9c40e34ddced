"""The README's demo (examples/digits_demo.py) runs, with the online controller and with a
calibrated schedule, and reports what it computed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("digits_demo", ROOT / "examples" / "digits_demo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--calibrate", "3"]])
def test_demo_draws_and_reports(tmp_path, capsys, extra):
    out = tmp_path / "grid.png"
    res = _demo().main(["--per-class", "2", "--steps", "30", "--repeats", "1", "--out", str(out), *extra])
    text = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 1000
    from PIL import Image

    assert Image.open(out).size[0] > 600  # the labelled figure, not the bare grid
    assert res["accuracy_full"] >= 0.9 and res["accuracy_xslim"] >= 0.9
    assert 20.0 < res["psnr"] < float("inf")
    if extra:
        # 10 of 30 steps planned: exactly a third of the block FLOPs, plus the embeddings
        assert res["flops_fraction"] < 0.36
        assert "calibrated for 3x, full steps [0, " in text
    else:
        assert res["flops_fraction"] < 0.8
        assert "default online controller" in text
    assert "PSNR X-Slim vs full" in text
    assert "demo run time: " in text and "load average" in text
    assert len(res["kinds"]) == 30 and res["kinds"][0] == "full" and res["run_time"] > 0


def test_demo_refuses_two_configs(tmp_path):
    with pytest.raises(SystemExit, match="alternatives"):
        _demo().main(["--preset", "flux-fast", "--calibrate", "3", "--out", str(tmp_path / "x.png")])
