"""Rank functions that fail on purpose: one rank is killed, hangs, or is configured differently,
under each layout the xDiT integration sets up (Ulysses 2, CFG parallel 2, PipeFusion 2).

Importing this module applies xfuser's CPU compatibility layer and imports xfuser, torch and the
package once: the failure tests preload it in a fork server, so that each of their processes
starts in a fraction of a second instead of importing everything again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

apply_xfuser_cpu_compat()  # before xfuser is imported (an import sorter would reorder imports)
import xfuser  # noqa: E402, F401 - preloaded for the fork server

from xslim_xdit import XSlimConfig, disable_xslim  # noqa: E402
from xslim_xdit.integrations.xfuser import enable_xslim_xdit  # noqa: E402
from xslim_xdit.testing import tiny_model  # noqa: E402
from xslim_xdit.testing.pipelines import tiny_flux_embeds_call, tiny_flux_embeds_pipeline  # noqa: E402

STEPS = 6
#: the call (0-based, counted per rank) at which the failing rank is killed or hangs: after the
#: warm-up, so that X-Slim's per-step collectives are running
FAIL_AT_CALL = 3
HW = 4  # 4x4 image tokens (64x64 pixels for xfuser)
#: online mode: X-Slim reduces the indicator and broadcasts the step kind every step
CONFIG = dict(warn=0.12, crit=0.3, polish="block", warmup_steps=2, block_thresh=2.0)


def _inject(rank: int, mode: str, out_dir: Path) -> Any:
    """A transformer pre-hook (registered after X-Slim's, so it runs after the step started) that
    kills or hangs this rank at its FAIL_AT_CALL-th call."""
    calls = [0]

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] - 1 != FAIL_AT_CALL:
            return
        (out_dir / "inject").write_text(repr(time.time()))
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":  # stuck in its own computation: it waits on nobody
            time.sleep(3600)

    return hook


def _usp_or_cfg(
    rank: int, failing: int, layout: str, cfg: XSlimConfig, timeout_s: float, mode: str, out_dir: Path
) -> None:
    """Ulysses 2: xfuser's FLUX wrapper shards the image tokens. CFG 2: each rank runs its own
    guidance branch through the plain tiny FLUX and the branches are all-gathered over xfuser's
    CFG group after each call, as xDiT's pipelines do (xfuser's FLUX wrapper splits only the
    text over CFG ranks)."""
    from xfuser.core.distributed import get_cfg_group

    from xslim_xdit.adapters import adapter_named
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, to_xfuser_flux1

    model = tiny_model("flux")
    init_xfuser_runtime(
        model,
        height=HW * 16,
        width=HW * 16,
        max_condition_sequence_length=6,
        batch_size=2 if layout == "cfg" else 1,
        ulysses_degree=2 if layout == "usp" else 1,
        use_cfg_parallel=layout == "cfg",
    )
    net = to_xfuser_flux1(model) if layout == "usp" else model
    engine = enable_xslim_xdit(net, cfg, timeout_s=timeout_s)
    engine.default_steps = STEPS
    if rank == failing and mode in ("kill", "hang"):
        net.register_forward_pre_hook(_inject(rank, mode, out_dir), with_kwargs=True)
    if rank == failing and mode == "misconfig":
        (out_dir / "inject").write_text(repr(time.time()))
    adapter = adapter_named("flux")
    x, _ = adapter.tiny_inputs(1, 0, height=HW, width=HW)
    _, cond = adapter.tiny_inputs(1, 10 + (rank if layout == "cfg" else 0), height=HW, width=HW)
    with torch.no_grad():
        for t in adapter.timesteps(STEPS):
            out = adapter.tiny_forward(net, x, adapter.timestep_input(t, 1), cond)
            if layout == "cfg":
                both = get_cfg_group().all_gather(out, dim=0)
                out = both[:1] + 2.0 * (both[:1] - both[1:])
            x = x - (1.0 / STEPS) * out
    disable_xslim(net)


def _pipefusion(
    rank: int, failing: int, cfg: XSlimConfig, timeout_s: float, mode: str, out_dir: Path
) -> None:
    from xfuser import xFuserFluxPipeline

    from xslim_xdit.testing.xfuser import xfuser_engine_config

    engine_config, _ = xfuser_engine_config(
        torch.float32,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        max_sequence_length=8,
        pipefusion_parallel_degree=2,
        num_pipeline_patch=1,
        warmup_steps=STEPS,  # synchronous PipeFusion (see docs/xfuser_cpu.md)
    )
    xpipe = xFuserFluxPipeline(tiny_flux_embeds_pipeline(), engine_config)
    engine = enable_xslim_xdit(xpipe, cfg, timeout_s=timeout_s)
    if rank == failing and mode in ("kill", "hang"):
        engine.model.register_forward_pre_hook(_inject(rank, mode, out_dir), with_kwargs=True)
    if rank == failing and mode == "misconfig":
        (out_dir / "inject").write_text(repr(time.time()))
    with torch.no_grad():
        xpipe(generator=torch.Generator().manual_seed(3), **tiny_flux_embeds_call(STEPS, 64, 64, 8))


def failing_cell(
    rank: int, world: int, port: int, layout: str, mode: str, failing: int, timeout_s: float, out_dir: str
) -> None:
    """One rank of one cell: ``layout`` (``usp``, ``cfg``, ``pipefusion``) with rank ``failing``
    failing as ``mode`` (``kill``, ``hang``, ``misconfig``) says. Writes ``error{rank}`` (the
    traceback) when it raises, and exits 1, as torch.multiprocessing's own wrapper does."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    (out / f"started{rank}").write_text(repr(time.time()))  # the test reports start-up times
    (out / f"cpu_at_start{rank}").write_text(repr(time.process_time()))  # ~0 when preloaded
    cfg = XSlimConfig(**CONFIG)
    if rank == failing and mode == "misconfig":
        cfg = cfg.replace(polish="none")  # one field off (it used to end in an AssertionError)
    try:
        dist.init_process_group("gloo")
        if layout == "pipefusion":
            _pipefusion(rank, failing, cfg, timeout_s, mode, out)
        else:
            _usp_or_cfg(rank, failing, layout, cfg, timeout_s, mode, out)
        (out / f"done{rank}").write_text("finished")
    except Exception:
        (out / f"error{rank}").write_text(traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":  # one cell under torchrun: python -m torch.distributed.run ... _fail_workers.py
    layout, mode, timeout, out_dir = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    failing_cell(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ["MASTER_PORT"]),
        layout,
        mode,
        1,
        timeout,
        out_dir,
    )
