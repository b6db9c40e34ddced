"""The class-token testbed training scripts share one command line (``training.text_flow_parser``)
and the testbed pipelines one ``__call__`` (``sampling.ClassConditionalPipeline``): each script
still lists its own options with its own defaults, a 2-step run resumes from its ``--state``, and
the pipelines keep their call contract."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

COMMON = ["--minutes", "--out", "--seed", "--threads", "--batch-size"]
OPTIMIZER = ["--lr", "--warmup", "--ema-decay", "--cfg-dropout"]
TWO_STREAM = ["--width", "--double-blocks", "--single-blocks", "--head-dim", "--text-dim"]
FLOW = ["--logit-mean", "--train-shift"]
SAVE_STATE = ["--save-dtype", "--save-every", "--log-every", "--state", "--resume"]

# Each script's options in --help order and the defaults that differ between scripts (as they
# were before the shared builder).
SCRIPTS = {
    "train_flux_testbed": (
        COMMON + OPTIMIZER + TWO_STREAM + FLOW + ["--max-shift"] + SAVE_STATE,
        {"minutes": 30.0, "batch_size": 64, "lr": 5e-4, "ema_decay": 0.998, "width": 128, "log_every": 50},
    ),
    "train_video_testbed": (
        COMMON
        + ["--frames"]
        + OPTIMIZER
        + ["--width", "--double-blocks", "--single-blocks", "--refiner-blocks", "--head-dim", "--text-dim"]
        + FLOW
        + ["--flow-shift"]
        + SAVE_STATE,
        {"minutes": 30.0, "batch_size": 12, "lr": 4e-4, "single_blocks": 2, "refiner_blocks": 1, "frames": 4},
    ),
    "train_wan_testbed": (
        COMMON
        + ["--frames"]
        + OPTIMIZER
        + ["--width", "--blocks", "--head-dim", "--text-dim"]
        + FLOW
        + ["--flow-shift"]
        + SAVE_STATE,
        {"minutes": 35.0, "batch_size": 8, "lr": 4e-4, "blocks": 4, "flow_shift": 5.0},
    ),
    "train_flux2_testbed": (
        COMMON + OPTIMIZER + TWO_STREAM + FLOW + SAVE_STATE,
        {"minutes": 35.0, "batch_size": 32, "lr": 4e-4, "single_blocks": 4},
    ),
    "train_emoji_flux": (
        COMMON
        + OPTIMIZER
        + TWO_STREAM
        + FLOW
        + ["--max-shift", "--flip", "--max-steps", "--init-from"]
        + SAVE_STATE,
        {
            "minutes": 90.0,
            "batch_size": 16,
            "ema_decay": 0.995,
            "width": 192,
            "head_dim": 64,
            "log_every": 20,
        },
    ),
}


def _script(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.testbeds.{name}")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_lists_the_scripts_options_in_order_with_their_defaults(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    options, defaults = SCRIPTS[name]
    module = _script(name)
    with pytest.raises(SystemExit) as done:
        module.parse_args(["--help"])
    assert done.value.code == 0
    options_section = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    listed = re.findall(r"^  (--[a-z-]+)", options_section, re.MULTILINE)  # not help continuations
    assert listed == options  # after "-h, --help"
    args = vars(module.parse_args([]))
    assert {k: args[k] for k in defaults} == defaults
    assert args["state"] is None and args["resume"] is False and args["cfg_dropout"] == 0.1


@pytest.mark.parametrize(
    ("name", "shape_args"),
    [
        ("train_flux_testbed", ["--double-blocks", "1", "--single-blocks", "1"]),
        ("train_wan_testbed", ["--blocks", "1", "--frames", "2"]),
    ],
)
def test_a_two_step_run_resumes_from_its_state(
    name: str,
    shape_args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """2 steps, then ``--resume`` to step 3: the state continues (step counter, weights moved on)
    and the checkpoint written loads into the testbed's pipeline and samples."""
    module = _script(name)
    argv = ["--batch-size", "2", "--width", "32", "--head-dim", "16", "--warmup", "1", *shape_args]
    argv += ["--out", str(tmp_path / "ckpt"), "--state", str(tmp_path / "state.pt")]

    parse_args = module.parse_args

    def run(steps: int, extra: list[str]) -> dict:
        args = parse_args(argv + extra)
        args.max_steps = steps  # run_training stops there (the scripts' wall budget is minutes)
        monkeypatch.setattr(module, "parse_args", lambda _argv=None: args)
        module.main([])
        return torch.load(tmp_path / "state.pt", weights_only=False)

    first = run(2, [])
    second = run(3, ["--resume"])
    assert (first["step"], second["step"]) == (2, 3)
    assert f"resumed from {tmp_path / 'state.pt'} at step 2" in capsys.readouterr().out
    moved = [not torch.equal(first["ema"][k], second["ema"][k]) for k in first["ema"]]
    assert any(moved)
    pipeline_cls = {
        "train_flux_testbed": "benchmarks.testbeds.flux_testbed:DigitsFluxPipeline",
        "train_wan_testbed": "benchmarks.testbeds.wan_testbed:MovingDigitsWanPipeline",
    }[name]
    module_name, cls_name = pipeline_cls.split(":")
    pipe = getattr(importlib.import_module(module_name), cls_name).from_checkpoint(tmp_path / "ckpt")
    out = pipe([1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape[:2] == (2, 1) and torch.isfinite(out).all()


def test_the_shared_call_takes_the_testbeds_default_guidance_and_refuses_unknown_options() -> None:
    from benchmarks.testbeds.flux_testbed import DEFAULT_GUIDANCE_SCALE, DigitsFluxPipeline
    from benchmarks.testbeds.video_testbed import MovingDigitsVideoPipeline

    torch.manual_seed(0)
    pipe = DigitsFluxPipeline.from_checkpoint()

    def call(**kwargs: object) -> torch.Tensor:
        return pipe(
            [3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False, **kwargs
        )

    assert torch.equal(call(), call(guidance_scale=DEFAULT_GUIDANCE_SCALE))
    assert not torch.equal(call(), call(guidance_scale=1.0))
    with pytest.raises(TypeError, match="num_frames"):
        call(num_frames=2)  # an image testbed has no clip length
    assert MovingDigitsVideoPipeline.default_guidance_scale == 7.0
