"""Shared plumbing of the X-Slim xDiT examples: the command line, device and dtype, timing, report.

Not an example itself; ``flux_example.py``, ``pixart_example.py`` and
``hunyuan_video_example.py`` import it (it sits next to them, so ``python`` and ``torchrun`` find
it on ``sys.path``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from xslim_xdit.integrations.cli import calibration_from_args
from xslim_xdit.integrations.xfuser import add_xslim_args, config_from_args, timeout_from_args
from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

# xfuser 0.7 cannot be imported without an accelerator unless its CPU compatibility layer is in
# place first; where an accelerator exists this does nothing.
apply_xfuser_cpu_compat()

from xfuser.config import FlexibleArgumentParser, xFuserArgs  # noqa: E402  # isort: skip


def ensure_single_process_env() -> None:
    """Let ``python example.py ...`` run as a world of one: torchrun's variables, if missing.

    Example:
        >>> ensure_single_process_env()  # doctest: +SKIP
    """
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def build_parser(description: str, tiny_defaults: dict[str, Any]) -> FlexibleArgumentParser:
    """xDiT's ``xFuserArgs`` flags, X-Slim's ``--xslim-*`` flags and the example's own flags.

    ``--model`` (required by xDiT) becomes optional: ``--tiny`` replaces it with a tiny random
    checkpoint. ``tiny_defaults`` are applied with ``--tiny`` to every flag left at its default.

    Example:
        >>> p = build_parser("FLUX", {"height": 128})  # doctest: +SKIP
        >>> args = parse_args(p, ["--tiny", "--ulysses_degree", "2", "--xslim"])  # doctest: +SKIP
    """
    parser = FlexibleArgumentParser(description=description)
    parser = xFuserArgs.add_cli_args(parser)
    for action in parser._actions:
        if action.dest == "model":
            action.required = False
            action.default = None
            action.help = "checkpoint directory (diffusers layout); omit with --tiny"
    add_xslim_args(parser)
    g = parser.add_argument_group("example")
    g.add_argument(
        "--tiny", action="store_true", help="tiny random components built offline instead of --model"
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="model dtype (auto: bfloat16 on an accelerator, float32 on CPU)",
    )
    g.add_argument("--skip_baseline", action="store_true", help="do not run (and time) plain xDiT")
    g.add_argument("--no_warmup", action="store_true", help="time the first call of each variant")
    g.add_argument("--save_dir", default=None, help="save the images/video here (last rank of each DP group)")
    parser.set_defaults(_tiny_defaults=tiny_defaults)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, apply the ``--tiny`` defaults, check that a model is given.

    Example:
        >>> args = parse_args(build_parser("x", {}), ["--tiny"])  # doctest: +SKIP
    """
    args = parser.parse_args(argv)
    tiny_defaults = args._tiny_defaults
    del args._tiny_defaults
    if args.tiny:
        for key, value in tiny_defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    elif not args.model:
        parser.error("give --model PATH (a checkpoint directory) or --tiny")
    pick_ring_backend(args)
    return args


def pick_ring_backend(args: argparse.Namespace) -> None:
    """Ring attention merges partial attention through the log-sum-exp, so xDiT refuses its
    default backend (SDPA) for ``--ring_degree > 1``; the one that returns it, ``SDPA_FLASH``,
    runs on CPU only through X-Slim's compatibility layer (``docs/xfuser_cpu.md``). Without an
    accelerator and without ``--attention_backend``, pick it and say so.

    Example:
        >>> a = argparse.Namespace(ring_degree=2, attention_backend=None)
        >>> pick_ring_backend(a)  # doctest: +SKIP
        >>> a.attention_backend  # doctest: +SKIP
        'SDPA_FLASH'
    """
    from xslim_xdit.integrations.xfuser_compat import has_accelerator

    if getattr(args, "ring_degree", 1) > 1 and args.attention_backend is None and not has_accelerator():
        args.attention_backend = "SDPA_FLASH"
        if os.environ.get("RANK", "0") == "0":
            print(
                "note: --ring_degree > 1 on CPU: using --attention_backend SDPA_FLASH (Ring needs the "
                "log-sum-exp; xDiT's default SDPA backend refuses Ring)",
                flush=True,
            )


def pick_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype of ``--dtype``; ``auto`` is bfloat16 with an accelerator and float32 on CPU."""
    from xfuser.envs import get_device_name

    if args.dtype == "auto":
        return torch.float32 if get_device_name() == "cpu" else torch.bfloat16
    return getattr(torch, args.dtype)


def local_device() -> torch.device:
    """This rank's device as xDiT picks it (``cuda:<local_rank>``, ``npu:...``, ``mps``, ``cpu``)."""
    from xfuser.core.distributed import get_world_group
    from xfuser.envs import get_device

    return get_device(get_world_group().local_rank)


def generator(seed: int) -> torch.Generator:
    """A generator on this machine's device type, seeded (as xDiT's examples make it)."""
    from xfuser.envs import get_device_name

    return torch.Generator(device=get_device_name()).manual_seed(seed)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (the device is synchronised around it)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def is_reporting_rank() -> bool:
    """The last rank prints, as xDiT's examples do."""
    from xfuser.core.distributed import get_world_group

    return get_world_group().rank == get_world_group().world_size - 1


def report(
    name: str,
    parallel_info: str,
    engine: Any,
    seconds_baseline: float | None,
    seconds_xslim: float | None,
    baseline: torch.Tensor | None,
    xslim: torch.Tensor | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Print the cache statistics, the speedup and one machine-readable ``RESULT {...}`` line
    (with ``extra``'s keys)."""
    if not is_reporting_rank():
        return
    result: dict[str, Any] = {"example": name, "parallel": parallel_info, **(extra or {})}
    if seconds_baseline is not None:
        print(f"[{name}] {parallel_info} plain xDiT: {seconds_baseline:.3f} s", flush=True)
        result["seconds_baseline"] = seconds_baseline
    if engine is not None:
        stats = engine.statistics
        print(stats.table(), flush=True)
        summary = stats.summary()
        result.update(
            seconds_xslim=seconds_xslim,
            kinds=summary["kinds"],
            flops_fraction=summary["flops_fraction"],
            theoretical_speedup=summary["theoretical_speedup"],
            collectives=summary["collectives"],
        )
        line = f"[{name}] {parallel_info} X-Slim: {seconds_xslim:.3f} s"
        if seconds_baseline is not None and seconds_xslim:
            result["speedup"] = seconds_baseline / seconds_xslim
            line += f", speedup {result['speedup']:.2f}x (theoretical {summary['theoretical_speedup']:.2f}x)"
        print(line, flush=True)
        if baseline is not None and xslim is not None and baseline.shape == xslim.shape:
            diff = (xslim.float() - baseline.float()).abs().max().item()
            result["max_abs_diff_vs_baseline"] = diff
            print(f"[{name}] max |X-Slim - plain| = {diff:.3e}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()


def xslim_config(args: argparse.Namespace) -> Any:
    """The :class:`~xslim_xdit.XSlimConfig` of the ``--xslim-*`` flags (None without ``--xslim``)."""
    return config_from_args(args)


def pipeline_output_tensor(out: object) -> torch.Tensor | None:
    """A pipeline output as one float tensor (None on ranks that return nothing)."""
    import numpy as np

    if out is None:
        return None
    images = out.images  # type: ignore[attr-defined]
    if isinstance(images, list):  # PIL images
        return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))
    return torch.as_tensor(images).float()


def compare_and_report(
    name: str,
    pipe: Any,
    generate: Callable[[], Any],
    args: argparse.Namespace,
    engine_args: Any,
    engine_config: Any,
    input_config: Any,
    device: torch.device,
    seeded: Callable[[int], Any] | None = None,
) -> None:
    """Run the plain pipeline, then with X-Slim (each after a warm-up run unless --no_warmup),
    print the statistics and speedup, and save PIL images if --save_dir is given.

    With ``--xslim-calibrate N`` the X-Slim run follows a schedule calibrated first on every rank
    (``calibrate_xdit``) on ``seeded(seed)`` for seeds ``--seed`` .. ``--seed + N - 1``;
    ``--xslim-save PATH`` writes its JSON from global rank 0."""
    baseline = t_baseline = None
    if not args.skip_baseline:
        if not args.no_warmup:
            generate()
        baseline, t_baseline = timed(generate, device)

    out, engine, t_xslim = baseline, None, None
    config = xslim_config(args)
    extra: dict[str, Any] = {}
    request = calibration_from_args(args)
    if request is not None:
        config, extra = calibrated_config(pipe, seeded, request, args, input_config, config)
    if config is not None:
        engine = pipe.enable_xslim(config, timeout_s=timeout_from_args(args))
        if not args.no_warmup:
            generate()
        out, t_xslim = timed(generate, device)

    parallel_info = (
        f"dp{engine_args.data_parallel_degree}_cfg{engine_config.parallel_config.cfg_degree}_"
        f"ulysses{engine_args.ulysses_degree}_ring{engine_args.ring_degree}_"
        f"pp{engine_args.pipefusion_parallel_degree}_patch{engine_args.num_pipeline_patch}"
    )
    report(
        name,
        parallel_info,
        engine,
        t_baseline,
        t_xslim,
        pipeline_output_tensor(baseline),
        pipeline_output_tensor(out),
        extra,
    )
    if args.save_dir and out is not None and input_config.output_type == "pil" and pipe.is_dp_last_group():
        os.makedirs(args.save_dir, exist_ok=True)
        tag = "xslim" if engine is not None else "plain"
        for i, image in enumerate(out.images):
            image.save(os.path.join(args.save_dir, f"{name}_{parallel_info}_{tag}_{i}.png"))


def calibrated_config(
    pipe: Any,
    seeded: Callable[[int], Any] | None,
    request: Any,
    args: argparse.Namespace,
    input_config: Any,
    overrides: Any,
) -> tuple[Any, dict[str, Any]]:
    """Calibrate on every rank (``--xslim-calibrate N``), save the JSON from global rank 0
    (``--xslim-save``), print its table on the reporting rank; returns the schedule's config (with
    ``--xslim-token-ratio`` / ``--xslim-block-thresh`` applied) and the ``RESULT`` keys."""
    import torch.distributed as dist

    from xslim_xdit.integrations.xfuser import calibrate_xdit

    if seeded is None:
        raise SystemExit(
            "--xslim-calibrate: this example does not support calibration (flux_example.py does)"
        )
    seed = int(input_config.seed)
    runs = [functools.partial(seeded, seed + k) for k in range(request.runs)]
    result = calibrate_xdit(
        pipe.pipe, runs, target_speedup=request.target_speedup, timeout_s=timeout_from_args(args)
    )
    # every rank holds the same result; one writes the file (no two processes writing one path)
    if request.save and (not dist.is_initialized() or dist.get_rank() == 0):
        result.save(request.save)
    if is_reporting_rank():
        print(result.table(), flush=True)
    config = result.config(token_ratio=overrides.token_ratio, block_thresh=overrides.block_thresh)
    return config, {"calibrated_schedule": result.schedule.to_dict(), "calibration_saved": request.save}
