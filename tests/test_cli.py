"""The ``xslim-xdit`` console script: every subcommand's help, ``info`` against the registry,
``calibrate`` on a tiny pipeline saved to disk, ``show`` on its output and on statistics, and bad
arguments refused before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xslim_xdit.adapters import registered_adapters
from xslim_xdit.calibration import CalibrationResult
from xslim_xdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# the tiny PixArt pipeline (the fastest to save, load and run): 64 px, 8 text tokens
TINY_PIXART_ARGS = [
    "--height",
    "64",
    "--width",
    "64",
    "--call-arg",
    "max_sequence_length=8",
    "--call-arg",
    "use_resolution_binning=false",
    "--call-arg",
    "clean_caption=false",
]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "xslim_xdit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from xslim_xdit.testing.pipelines import save_tiny_pipeline

    d = tmp_path_factory.mktemp("cli")
    save_tiny_pipeline("pixart", d / "pixart")
    (d / "prompts.txt").write_text("a cat\n\na red house\n")
    return d


@pytest.fixture(scope="module")
def calibration_json(workdir):
    """The console script run as a user runs it: a subprocess of ``python -m xslim_xdit.cli``."""
    out = workdir / "cal.json"
    proc = _cli(
        "calibrate",
        str(workdir / "pixart"),
        "--prompts",
        str(workdir / "prompts.txt"),
        "--target-speedup",
        "2",
        "--steps",
        str(STEPS),
        "--output",
        str(out),
        *TINY_PIXART_ARGS,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_pyproject_points_the_console_script_at_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"xslim-xdit": "xslim_xdit.cli:main"}


@pytest.mark.parametrize("argv", [[], ["info"], ["calibrate"], ["show"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: xslim-xdit {' '.join(argv)}".rstrip())
    if argv == ["calibrate"]:
        for flag in ("--prompts", "--target-speedup", "--steps", "--output", "--strategy", "--seed"):
            assert flag in text


def test_info_lists_every_family_and_class(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for cls in registered_adapters():
        assert f"  {cls.name}: " in text
        for name in cls.model_class_names:
            assert name in text
    assert "torch " in text and "diffusers " in text and "xfuser " in text
    assert "accelerator: " in text


def test_info_json_parses_and_matches_the_registry(capsys):
    from importlib.metadata import version

    import torch

    import xslim_xdit

    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["version"] == xslim_xdit.__version__
    assert [f["family"] for f in d["families"]] == [c.name for c in registered_adapters()]
    for f, cls in zip(d["families"], registered_adapters(), strict=True):
        assert f["model_classes"] == list(cls.model_class_names)
        assert set(f["levels"]) <= {"step", "block", "token"} and f["levels"][:2] == ["step", "block"]
        assert f["presets"] == sorted(cls.presets)
    assert d["packages"]["torch"] == version("torch") and d["packages"]["diffusers"] == version("diffusers")
    assert d["accelerator"]["available"] == torch.cuda.is_available()


def test_info_does_not_import_xfuser():
    code = "import sys; from xslim_xdit.cli import main; main(['info']); print('xfuser' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_calibrate_writes_a_result_with_the_asked_steps(calibration_json):
    out, proc = calibration_json
    result = CalibrationResult.load(out)
    assert result.schedule.num_steps == STEPS
    assert result.num_runs == 2  # the blank line is not a prompt
    assert result.estimated_fraction <= 0.5 + 1e-9
    assert "profiling full runs" in proc.stderr  # the progress bar
    assert f"saved {out}" in proc.stdout


def test_show_prints_a_calibration_table(calibration_json, capsys):
    out, _ = calibration_json
    assert main(["show", str(out)]) == 0
    text = capsys.readouterr().out
    result = CalibrationResult.load(out)
    assert text.splitlines()[1].split() == ["step", "kind", "indicator", "error"]
    assert text.rstrip().endswith(result.table().splitlines()[-1])
    kinds = [line.split()[1] for line in text.splitlines()[2 : 2 + STEPS]]
    assert kinds == [result.schedule.kind_of(i) for i in range(STEPS)]


def test_show_prints_statistics_as_table_prints_them(tmp_path, capsys):
    from xslim_xdit import XSlimConfig, enable_xslim
    from xslim_xdit.stats import CacheStatistics
    from xslim_xdit.testing import sample, tiny_model

    m = tiny_model("dit")
    engine = enable_xslim(m, XSlimConfig(warn=0.05, crit=0.3, polish="token"), num_inference_steps=8)
    sample(m, "dit", steps=8)
    path = tmp_path / "stats.json"
    engine.statistics.to_json(path)
    assert CacheStatistics.from_json(path).table() == engine.statistics.table()
    assert main(["show", str(path)]) == 0
    assert capsys.readouterr().out == f"statistics {path}\n{engine.statistics.table()}\n"


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"pipeline": "missing"}, "PIPELINE"),
        ({"prompts": "empty.txt"}, "--prompts"),
        ({"prompts": "absent.txt"}, "--prompts"),
        ({"--target-speedup": "1"}, "--target-speedup"),
        ({"--target-speedup": "0.5"}, "--target-speedup"),
        ({"--steps": "0"}, "--steps"),
        ({"--target-speedup": "9", "--steps": "4"}, "--target-speedup"),  # 4 steps cannot make 9x
        ({"--polish": "token"}, "--polish"),  # strategy optimal places full steps only
    ],
)
def test_bad_calibrate_arguments_exit_before_loading(workdir, tmp_path, capsys, monkeypatch, change, flag):
    import diffusers

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = {
        "pipeline": str(workdir / "pixart"),
        "prompts": str(workdir / "prompts.txt"),
        "--target-speedup": "2",
        "--steps": str(STEPS),
    }
    for k, v in change.items():
        args[k] = str(tmp_path / v) if k in ("pipeline", "prompts") else v
    argv = [
        "calibrate",
        args.pop("pipeline"),
        "--prompts",
        args.pop("prompts"),
        "--output",
        str(tmp_path / "o.json"),
    ]
    for k, v in args.items():
        argv += [k, v]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"xslim-xdit calibrate: error: {flag}" in err
    assert not (tmp_path / "o.json").exists()


def test_bad_arguments_through_the_console_script(tmp_path):
    proc = _cli(
        "calibrate", str(tmp_path), "--prompts", "p.txt", "--target-speedup", "1", "--output", "o.json"
    )
    assert proc.returncode == 2
    assert "PIPELINE" in proc.stderr and "model_index.json" in proc.stderr
    proc = _cli("show", str(tmp_path / "nothing.json"))
    assert proc.returncode == 2 and "FILE: no such file" in proc.stderr


def test_show_refuses_a_json_of_neither_kind(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    assert main(["show", str(path)]) == 1
    assert "neither a calibration result" in capsys.readouterr().err


def test_calibrate_in_process_with_the_threshold_strategy(workdir, tmp_path, capsys):
    out = tmp_path / "threshold.json"
    argv = ["calibrate", str(workdir / "pixart"), "--prompts", str(workdir / "prompts.txt")]
    argv += ["--target-speedup", "1.5", "--steps", "8", "--strategy", "threshold", "--polish", "token"]
    argv += ["--seed", "3", "--quiet", "--output", str(out), *TINY_PIXART_ARGS]
    assert main(argv) == 0
    result = CalibrationResult.load(out)
    assert result.strategy == "threshold" and result.polish == "token"
    assert result.schedule.num_steps == 8 and result.warn is not None
    captured = capsys.readouterr()
    assert "profiling full runs" not in captured.err  # --quiet: no bars
    assert main(["show", str(out)]) == 0
    assert "strategy threshold" in capsys.readouterr().out
