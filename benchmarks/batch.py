"""The cost of per-sample decisions: a batch of N samples against the N samples run one by one.

Usage::

    python -m benchmarks.batch                       # tiny FLUX, batch 4, 20 steps
    python -m benchmarks.batch --family dit --batch 4 --steps 20 --repeats 5 --json out.json

For the full computation, X-Slim with per-sample decisions (``per_sample=True``) and X-Slim with
one decision per batch (the default) it prints the transformer FLOPs and the median wall clock of
one batch of N and of N single runs (same seeds), the largest difference between a sample in the
batch and the same sample alone, and the machine's load average before and after (the timings
of a loaded machine say little; the FLOPs do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.flops import counter
from xslim_xdit.testing import denoise, make_batch_inputs, tiny_model

#: thresholds under which the tiny models' samples decide differently (see tests/_batch_workers.py)
ONLINE = {
    "dit": dict(warmup_steps=2, warn=0.1, crit=0.3, polish="block"),
    "flux": dict(warmup_steps=2, warn=0.08, crit=0.2, polish="block"),
    "pixart": dict(warmup_steps=2, warn=0.1, crit=0.3, polish="none"),
}


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def _flops_of(engine: Any, fn: Callable[[], Any]) -> tuple[int, Any]:
    """``fn()``'s transformer FLOPs: torch's counter for the full computation, X-Slim's statistics
    (blocks computed, per sample, plus the rest of the model) under X-Slim."""
    if engine is None:
        with counter() as mode:
            out = fn()
        return int(mode.get_total_flops()), out
    before = len(engine.statistics.records)
    out = fn()
    return sum(r.flops for r in engine.statistics.records[before:]), out


def measure(family: str, batch: int, steps: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """FLOPs, wall clock and batch-vs-single differences of each method (see the module doc)."""
    model = tiny_model(family)
    seeds = list(range(seed, seed + batch))
    x, cond = make_batch_inputs(family, seeds)
    singles = [make_batch_inputs(family, [s]) for s in seeds]
    methods: dict[str, XSlimConfig | None] = {
        "full": None,
        "per_sample": XSlimConfig(per_sample=True, guidance_pairs="none", **ONLINE[family]),
        "whole_batch": XSlimConfig(**ONLINE[family]),
    }
    rows: dict[str, Any] = {}
    for name, cfg in methods.items():
        engine = enable_xslim(model, cfg, num_inference_steps=steps) if cfg is not None else None

        def run_batch() -> torch.Tensor:
            return denoise(model, family, x, cond, steps)

        def run_singles() -> list[torch.Tensor]:
            return [denoise(model, family, xi, ci, steps) for xi, ci in singles]

        run_batch()  # warm-up (and the FLOP meter's first count of each shape)
        run_singles()
        flops_batch, out_batch = _flops_of(engine, run_batch)
        kinds = engine.statistics.sample_kinds() if engine is not None else []
        flops_single, out_single = _flops_of(engine, run_singles)
        rows[name] = {
            "flops_batch": flops_batch,
            "flops_singles": flops_single,
            "seconds_batch": _median_seconds(run_batch, repeats),
            "seconds_singles": _median_seconds(run_singles, repeats),
            "max_abs_batch_vs_single": max(
                (out_batch[i : i + 1] - o).abs().max().item() for i, o in enumerate(out_single)
            ),
            "samples_decide_differently": len({tuple(k) for k in kinds}) > 1 if kinds else None,
        }
        if engine is not None:
            disable_xslim(model)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--family", default="flux", choices=sorted(ONLINE), help="tiny model family (default flux)"
    )
    p.add_argument("--batch", type=int, default=4, help="samples per batch (default 4)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, median taken (default 5)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i gets seed + i")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    for name, v, lo in (("--batch", a.batch, 1), ("--steps", a.steps, 3), ("--repeats", a.repeats, 1)):
        if v < lo:
            p.error(f"{name} must be >= {lo}; got {v}")
    load_before = os.getloadavg()
    rows = measure(a.family, a.batch, a.steps, a.repeats, a.seed)
    load_after = os.getloadavg()
    print(
        f"tiny {a.family}, batch {a.batch} vs {a.batch} single runs, {a.steps} steps, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}"
    )
    print(
        f"{'method':<12} {'GFLOP batch':>11} {'GFLOP singles':>13} {'s batch':>8} {'s singles':>9} {'max |diff|':>10}"
    )
    for name, r in rows.items():
        print(
            f"{name:<12} {r['flops_batch'] / 1e9:>11.4f} {r['flops_singles'] / 1e9:>13.4f} "
            f"{r['seconds_batch']:>8.3f} {r['seconds_singles']:>9.3f} {r['max_abs_batch_vs_single']:>10.2e}"
        )
    if a.json:
        meta = {"family": a.family, "batch": a.batch, "steps": a.steps, "repeats": a.repeats}
        meta |= {"load_before": load_before, "load_after": load_after, "threads": torch.get_num_threads()}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "methods": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
