"""``xslim-xdit calibrate PIPELINE --prompts FILE --target-speedup X --output OUT.json``: load a
diffusers pipeline from a local folder, run :func:`xslim_xdit.calibration.calibrate` on one seeded
run per prompt (progress bars on stderr) and save the result; every argument is checked before the
model is loaded.

Example:
    >>> _call_arg("guidance_scale=3.5")
    ('guidance_scale', 3.5)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .info import PROG


def _call_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a keyword of the pipeline call; got {text!r}"
        )
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def _read_prompts(parser: argparse.ArgumentParser, path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        parser.error(f"--prompts: no such file: {path}")
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--prompts: cannot read {path} ({e})")
    prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        parser.error(f"--prompts: {path} holds no prompt (one prompt per line; blank lines are ignored)")
    return prompts


def _validate_calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Every check that needs no model; errors exit with status 2 and name the flag."""
    from ..calibration import check_reachable
    from ..config import ConfigError

    pipe_dir = Path(args.pipeline)
    if not pipe_dir.is_dir():
        parser.error(
            f"PIPELINE: no such folder: {args.pipeline} (a diffusers pipeline saved with save_pretrained)"
        )
    if not (pipe_dir / "model_index.json").is_file():
        parser.error(f"PIPELINE: {args.pipeline} has no model_index.json (not a diffusers pipeline folder)")
    prompts = _read_prompts(parser, args.prompts)
    if not args.target_speedup > 1.0:
        parser.error(
            f"--target-speedup must be > 1 (full compute over cached compute); got {args.target_speedup:g}"
        )
    if args.steps < 1:
        parser.error(f"--steps must be an integer >= 1; got {args.steps}")
    if args.strategy == "optimal" and args.polish not in (None, "none"):
        parser.error(f"--polish {args.polish} needs --strategy threshold (optimal places full steps only)")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0; got {args.warmup_steps}")
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.strategy == "optimal" else 3)
    if args.strategy == "optimal":
        try:
            check_reachable(args.steps, args.target_speedup, warmup)
        except ConfigError as e:
            parser.error(f"--target-speedup {args.target_speedup:g} with --steps {args.steps}: {e}")
    out = Path(args.output)
    if out.is_dir():
        parser.error(f"--output: {args.output} is a folder; give a file name such as calibration.json")
    if not out.parent.exists():
        parser.error(f"--output: the folder {out.parent} does not exist")
    return prompts


class _RunCounter:
    """Progress bars over the calibration runs: the profiled full runs (one per prompt), then
    the closed-loop replays of the candidate schedules (their number is known only as they come)."""

    def __init__(self, num_prompts: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self._enabled, self._n, self._calls = tqdm, enabled, num_prompts, 0
        self._bar = tqdm(total=num_prompts, desc="profiling full runs", unit="run", disable=not enabled)

    def tick(self) -> None:
        self._calls += 1
        self._bar.update(1)
        if self._calls == self._n:  # the profile is done: what follows are replays
            self._bar.close()
            self._bar = self._tqdm(desc="checking candidate schedules", unit="run", disable=not self._enabled)

    def close(self) -> None:
        self._bar.close()


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    prompts = _validate_calibrate(parser, args)
    import torch
    from diffusers import DiffusionPipeline

    from ..calibration import calibrate
    from ..config import ConfigError

    accelerator = torch.accelerator.current_accelerator()  # any kind, not a device literal
    device = args.device or (accelerator.type if accelerator is not None else "cpu")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    print(f"loading {args.pipeline} ({device}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=dtype).to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar per calibration run, not per step
    call_kwargs: dict[str, Any] = {"num_inference_steps": args.steps, "output_type": args.output_type}
    for name in ("height", "width", "guidance_scale"):
        if getattr(args, name) is not None:
            call_kwargs[name] = getattr(args, name)
    call_kwargs.update(dict(args.call_arg or ()))
    counter = _RunCounter(len(prompts), enabled=not args.quiet)

    def run_of(prompt: str):
        def run():
            out = pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **call_kwargs)
            counter.tick()
            return out

        return run

    try:
        result = calibrate(
            pipe,
            [run_of(p) for p in prompts],
            target_speedup=args.target_speedup,
            strategy=args.strategy,
            polish=args.polish,
            warmup_steps=args.warmup_steps,
        )
    except ConfigError as e:
        counter.close()
        print(f"{PROG} calibrate: error: {e}", file=sys.stderr)
        return 1
    counter.close()
    result.save(args.output)
    if not args.quiet:
        print(result.table())
    print(f"saved {args.output} (enable it with CalibrationResult.load(path).config())")
    return 0


def add_parser(sub: Any) -> None:
    """The ``calibrate`` subparser."""
    p = sub.add_parser(
        "calibrate",
        help="calibrate a schedule for a diffusers pipeline on a few prompts",
        description="Load a diffusers pipeline from a local folder, run it in full once per prompt "
        "(each with the same --seed), and save the fastest schedule that reaches --target-speedup "
        "(in transformer FLOPs) as JSON. Enable it with "
        "enable_xslim(pipe, CalibrationResult.load(OUTPUT).config()), or pass it to xDiT runs "
        "with --xslim-schedule OUTPUT.",
    )
    p.add_argument("pipeline", metavar="PIPELINE", help="folder of a diffusers pipeline (model_index.json)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="text file, one prompt per line")
    p.add_argument(
        "--target-speedup", type=float, required=True, metavar="X", help="full compute / cached compute, > 1"
    )
    p.add_argument("--output", required=True, metavar="OUT.json", help="where to write the calibration JSON")
    p.add_argument("--steps", type=int, default=28, help="inference steps of each run (default 28)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run's generator (default 0)")
    p.add_argument(
        "--strategy",
        choices=("optimal", "threshold"),
        default="optimal",
        help="optimal: full steps placed by exact search (default); threshold: the online controller "
        "replayed at searched thresholds (the only one with block/token steps)",
    )
    p.add_argument(
        "--polish",
        choices=("token", "block", "auto", "none"),
        default=None,
        help="polish level between the thresholds (--strategy threshold; default token)",
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="steps always computed at the start")
    p.add_argument("--height", type=int, default=None, help="image height passed to the pipeline")
    p.add_argument("--width", type=int, default=None, help="image width passed to the pipeline")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale passed to the pipeline")
    p.add_argument(
        "--call-arg",
        type=_call_arg,
        action="append",
        metavar="KEY=VALUE",
        help="another keyword of the pipeline call (VALUE read as JSON, else a string); repeatable",
    )
    p.add_argument(
        "--output-type",
        default="latent",
        help="the pipeline's output_type; the closed-loop check compares these outputs (default latent)",
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: the accelerator torch finds, else cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: float32 on CPU, bfloat16 on an accelerator)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    p.set_defaults(subparser=p)
