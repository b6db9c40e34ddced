"""The benchmark runner: every method side by side on every testbed, in one process.

Usage::

    python -m benchmarks.run --out bench_out                 # full run, 50 steps, 100 samples
    python -m benchmarks.run --quick --out /tmp/q            # CI: 3 methods, 4 samples, 20 steps
    python -m benchmarks.run --steps 20 --samples 200 --methods "X-Slim,steps/"
    python -m benchmarks.run --pipeline flux --model /ckpt/FLUX.1-dev --out real_out   # a real checkpoint

Per testbed it

1. samples every evaluated condition with every method (same seeds), for the quality metrics:
   PSNR (per image on ``[0, 1]``, averaged over images) and SSIM against the full computation of
   the same seed, classifier accuracy and Frechet distance with the real-vs-real floor;
2. counts the transformer FLOPs of one batch per method (torch's FLOP counter, plus X-Slim's own
   accounting from its statistics);
3. times one batch per method, methods interleaved (the order rotates every repeat), several
   repeats, and reports the ratio of medians against the full computation;
4. writes ``results.json``, PNG plots, ``report.html`` and ``report.md`` into ``--out`` and prints a
   table and the realism ruler (:mod:`benchmarks.ruler`).

With ``--pipeline FAMILY --model PATH`` it runs a real checkpoint instead of the testbeds, with
prompts from ``--prompts`` (:mod:`benchmarks.real`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.methods import Method, MethodRefused, full_methods, quick_methods
from benchmarks.suites import TESTBEDS, Testbed


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="X-Slim vs. fewer steps, uniform reuse, First-Block-Cache, TaylorSeer, TeaCache and "
        "cache-dit DBCache on small trained diffusion transformers: speed, FLOPs and quality.",
    )
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out)")
    p.add_argument("--quick", action="store_true", help="CI mode: 3 methods, 4 samples, 20 steps, 2 repeats")
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps of the reference (default 50; quick 20)"
    )
    p.add_argument("--samples", type=int, default=None, help="evaluated samples (default 100; quick 4)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="samples per pipeline call (default 50; --pipeline: 1)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timing repeats per method (default 5; quick 2)")
    p.add_argument(
        "--timing-samples", type=int, default=None, help="batch size of the timed runs (default 20)"
    )
    p.add_argument("--testbeds", default="digits", help=f"comma-separated, among {sorted(TESTBEDS)}")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="testbed checkpoint folder (default: the committed one); 'random' for untrained weights",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated substrings: keep only matching methods ('=name' matches the name exactly)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed; batch b uses seed+b")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    from benchmarks.real import add_arguments

    add_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------


def _matches(key: str, name: str) -> bool:
    """``--methods`` filter: ``=name`` is an exact name, anything else a substring."""
    return name == key[1:] if key.startswith("=") else key in name


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    return float(x) if math.isfinite(x) else (float("inf") if x > 0 else float("-inf"))


def _plain_state(pipe: Any) -> tuple[bool, bool]:
    """True where something is left patched on the transformer or the scheduler instance."""
    return "forward" in pipe.transformer.__dict__, "set_timesteps" in pipe.scheduler.__dict__


def _generate_all(
    testbed: Testbed, pipe: Any, method: Method, conds: list[Any], steps: int, batch: int, seed: int
) -> tuple[torch.Tensor, list[dict[str, Any]], float]:
    images, stats = [], []
    t0 = time.perf_counter()
    for b, (s, e) in enumerate(_batches(len(conds), batch)):
        method.enable(pipe, measure=True)
        try:
            images.append(testbed.generate(pipe, conds[s:e], method.num_steps(steps), seed + b))
        finally:
            method.disable(pipe)
        stats.append(method.run_stats())
    return torch.cat(images), stats, time.perf_counter() - t0


def _count_flops(testbed: Testbed, pipe: Any, method: Method, conds: list[Any], steps: int, seed: int) -> int:
    from xslim_xdit.flops import counter

    method.enable(pipe, measure=False)
    try:
        with counter() as mode:
            testbed.generate(pipe, conds, method.num_steps(steps), seed)
    finally:
        method.disable(pipe)
    return int(mode.get_total_flops())


def _step_profile(
    testbed: Testbed, pipe: Any, conds: list[Any], steps: int, seed: int
) -> list[dict[str, Any]]:
    """One full run with X-Slim in its recording mode (every step full): per-step indicators."""
    import xslim_xdit
    from xslim_xdit import XSlimConfig
    from xslim_xdit.observers import ProfileRecorder

    recorder = ProfileRecorder()
    xslim_xdit.enable_xslim(pipe, XSlimConfig(), observers=[recorder], record=True)
    try:
        testbed.generate(pipe, conds, steps, seed)
    finally:
        xslim_xdit.disable_xslim(pipe)
    return [
        {"step": p["step"], "probe_change": p["probe_change"], "residual_change": p["residual_change"]}
        for p in recorder.profile
    ]


def run_testbed(
    testbed: Testbed,
    pipe: Any,
    methods: list[Method],
    *,
    steps: int,
    samples: int,
    batch_size: int,
    timing_samples: int,
    repeats: int,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method on one testbed; return the testbed's part of ``results.json``."""
    from benchmarks.metrics import psnr, psnr_per_image, ssim

    conds = testbed.conditions(samples)
    timing_conds = conds[:timing_samples]
    out: dict[str, Any] = {"testbed": testbed.describe(), "methods": {}, "refused": {}}
    entries: dict[str, dict[str, Any]] = out["methods"]
    images: dict[str, torch.Tensor] = {}

    # 0. the plain pipeline, for the "disable restores it" check at the end
    plain_first = testbed.generate(pipe, timing_conds, steps, seed)

    # 1. preparation (calibration) and refusals
    active: list[Method] = []
    for m in tqdm(methods, desc=f"[{testbed.name}] prepare", disable=not progress):
        try:
            m.prepare(pipe, testbed, steps)
        except MethodRefused as e:
            out["refused"][m.name] = {"family": m.family, "params": m.params, "reason": str(e)}
            continue
        if any(_plain_state(pipe)):
            raise RuntimeError(f"{m.name}: prepare() left the pipeline patched")
        active.append(m)
    if not active or active[0].family != "reference":
        raise RuntimeError("the reference (full computation) must be the first method")

    # 2. quality pass: every sample with every method
    for m in tqdm(active, desc=f"[{testbed.name}] sample {samples}x{steps} steps", disable=not progress):
        try:
            imgs, stats, secs = _generate_all(testbed, pipe, m, conds, steps, batch_size, seed)
        except Exception as e:  # noqa: BLE001 - a crash of a peer is a result too
            out["refused"][m.name] = {
                "family": m.family,
                "params": m.params,
                "reason": f"crashed while sampling: {type(e).__name__}: {e}",
            }
            if any(_plain_state(pipe)):
                raise
            continue
        if any(_plain_state(pipe)):
            raise RuntimeError(f"{m.name}: disable() left the pipeline patched")
        images[m.name] = imgs
        entries[m.name] = {
            "family": m.family,
            "params": m.params,
            "note": m.note,
            "steps": m.num_steps(steps),
            "quality_pass_seconds": secs,
            "run_stats": stats,
        }
    active = [m for m in active if m.name in entries]

    # 3. FLOPs of one batch (torch's counter over the whole pipeline call)
    for m in tqdm(active, desc=f"[{testbed.name}] FLOPs", disable=not progress):
        entries[m.name]["flops"] = _count_flops(testbed, pipe, m, timing_conds, steps, seed)
    ref_flops = entries[active[0].name]["flops"]
    for m in active:
        entries[m.name]["flops_fraction"] = entries[m.name]["flops"] / ref_flops if ref_flops else None

    # 4. timing: every method next to a run of the reference, order rotated every repeat;
    # a method's speedup is the median of its per-pair ratios, so a load that drifts over minutes
    # (other jobs on the machine) cancels out of each ratio
    times: dict[str, list[float]] = {m.name: [] for m in active}
    pair_ratios: dict[str, list[float]] = {m.name: [] for m in active}
    bookkeeping: dict[str, list[float]] = {m.name: [] for m in active}
    ref = active[0]

    def timed(m: Method) -> float:
        m.enable(pipe, measure=False)
        try:
            t0 = time.perf_counter()
            testbed.generate(pipe, timing_conds, m.num_steps(steps), seed)
            return time.perf_counter() - t0
        finally:
            m.disable(pipe)

    testbed.generate(pipe, timing_conds, steps, seed)  # warm-up
    load_before = _loadavg()
    others = active[1:]
    bar = tqdm(total=repeats * max(1, len(others)), desc=f"[{testbed.name}] timing", disable=not progress)
    for r in range(repeats):
        k = r % max(1, len(others))
        for m in others[k:] + others[:k] or [ref]:
            if m is ref:
                t_ref = t = timed(ref)
            elif r % 2 == 0:  # alternate which of the pair runs first
                t_ref, t = timed(ref), timed(m)
            else:
                t, t_ref = timed(m), timed(ref)
            times[ref.name].append(t_ref)
            if m is not ref:
                times[m.name].append(t)
            pair_ratios[m.name].append(t_ref / t)
            bk = m.run_stats().get("bookkeeping_seconds")
            if bk is not None:
                bookkeeping[m.name].append(bk)
            bar.update()
    bar.close()
    out["timing_load_average"] = {"before": load_before, "after": _loadavg(), "cpu_count": os.cpu_count()}

    # 5. metrics
    ref_name = active[0].name
    ref_images = images[ref_name]
    t_ref = statistics.median(times[ref_name])
    full_step_seconds = t_ref / steps
    for m in tqdm(active, desc=f"[{testbed.name}] metrics", disable=not progress):
        e = entries[m.name]
        imgs = images[m.name]
        t_med = statistics.median(times[m.name])
        e["times"] = times[m.name]
        e["median_seconds"] = t_med
        e["speedup"] = statistics.median(pair_ratios[m.name]) if m.name != ref_name else 1.0
        ff = e.get("flops_fraction")
        e["flops_speedup"] = 1.0 / ff if ff else None
        e["speedup_vs_flops"] = e["speedup"] / e["flops_speedup"] if e["flops_speedup"] else None
        view, ref_view = testbed.as_images(imgs), testbed.as_images(ref_images)  # frames, for video
        per = psnr_per_image(view, ref_view)
        e["psnr"] = _finite(psnr(view, ref_view))
        e["psnr_median"] = _finite(float(per.median()))
        e["psnr_min"] = _finite(float(per.min()))
        e["ssim"] = ssim(view, ref_view)
        e.update(testbed.sample_quality(imgs, conds))
        xs = [
            s.get("xslim_flops_fraction") for s in e["run_stats"] if s.get("xslim_flops_fraction") is not None
        ]
        e["xslim_flops_fraction"] = sum(xs) / len(xs) if xs else None
        if bookkeeping[m.name]:
            bk = statistics.median(bookkeeping[m.name])
            e["bookkeeping_seconds_per_run"] = bk
            e["bookkeeping_fraction_of_full_step"] = bk / steps / full_step_seconds
            e["bookkeeping_fraction_of_run"] = bk / t_med
    out["full_step_seconds"] = full_step_seconds

    # 6. the pipeline is the plain one again
    again = testbed.generate(pipe, timing_conds, steps, seed)
    out["restored_bit_identical"] = bool(torch.equal(again, plain_first))

    # 7. per-step indicator of a full run, real-vs-real floors
    out["step_profile"] = _step_profile(testbed, pipe, conds[: min(len(conds), batch_size)], steps, seed)
    out["floors"] = testbed.floors(samples, seed)
    out["_images"] = images  # removed before JSON; used by the report
    return out


def _loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none): a load above the core
    count while timing means the wall-clock ratios are noisier than usual."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _code_version() -> str:
    """The git version of this code (:func:`benchmarks.report.code_version`), for the report."""
    from benchmarks.report import code_version

    return code_version()


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def summary_rows(tb: dict[str, Any]) -> list[list[str]]:
    """Rows of the printed/HTML summary table for one testbed."""

    def f(v: Any, fmt: str) -> str:
        if v is None:
            return "-"
        if (isinstance(v, float) and math.isinf(v)) or v == "inf":  # "inf" as results.json stores it
            return "inf"
        return format(v, fmt)

    rows = []
    for name, e in tb["methods"].items():
        rows.append(
            [
                name,
                str(e["steps"]),
                f(e.get("speedup"), ".2f") + "x",
                f(e.get("flops_fraction"), ".3f"),
                f(e.get("xslim_flops_fraction"), ".3f"),
                f(e.get("psnr"), ".2f"),
                f(e.get("ssim"), ".3f"),
                f(e.get("accuracy"), ".3f"),
                f(e.get("frechet_distance"), ".2f"),
                f(
                    100 * e["bookkeeping_fraction_of_full_step"]
                    if e.get("bookkeeping_fraction_of_full_step") is not None
                    else None,
                    ".2f",
                ),
            ]
        )
    return rows


def sensitivity_line(tb: dict[str, Any], steps: int) -> str:
    """The realism figure of the issue: PSNR of half the steps against the full step count."""
    e = tb["methods"].get("steps/2")
    if e is None or not isinstance(e.get("psnr"), float):
        return "testbed sensitivity: no steps/2 run"
    return (
        f"testbed sensitivity: {e['steps']} vs {steps} steps PSNR {e['psnr']:.2f} dB "
        "(realism criterion: at most 35 dB required, 30 dB or less is the aim)"
    )


#: Wall clock counts as quiet only when the 1-minute load average stayed below this many per core
#: before and after timing (issue 13: under 1.2 on 2 cores); otherwise it is marked noisy.
QUIET_LOAD_PER_CORE = 0.6


def timing_was_noisy(tb: dict[str, Any]) -> bool:
    """Whether the wall-clock column of a run is noisy (load at or above
    :data:`QUIET_LOAD_PER_CORE` per core, or not recorded).

    Example:
        >>> timing_was_noisy({"timing_load_average": {"before": [1.21], "after": [1.17], "cpu_count": 2}})
        True
        >>> timing_was_noisy({"timing_load_average": {"before": [0.9], "after": [1.1], "cpu_count": 2}})
        False
    """
    load = tb.get("timing_load_average") or {}
    before, after, cores = load.get("before"), load.get("after"), load.get("cpu_count")
    if not before or not after or not cores:
        return True
    return max(before[0], after[0]) >= QUIET_LOAD_PER_CORE * cores


def load_line(tb: dict[str, Any]) -> str:
    """The machine's load while the wall clock was measured, with a warning when it was busy."""
    load = tb.get("timing_load_average") or {}
    before, after, cores = load.get("before"), load.get("after"), load.get("cpu_count")
    if not before or not after or not cores:
        return "load while timing: unknown"
    busy = timing_was_noisy(tb)
    text = f"load average while timing: {before[0]:.2f} -> {after[0]:.2f} (1 min) on {cores} cores"
    return text + (
        f" -- busy machine (>= {QUIET_LOAD_PER_CORE * cores:g}): wall-clock speedups are noisy"
        if busy
        else ""
    )


SUMMARY_HEADER = [
    "method",
    "steps",
    "speedup",
    "FLOPs",
    "X-Slim FLOPs",
    "PSNR",
    "SSIM",
    "acc",
    "FD",
    "bk %step",
]


def format_table(rows: list[list[str]], header: list[str] = SUMMARY_HEADER) -> str:
    """A plain-text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.pipeline is not None:  # a real checkpoint instead of the testbeds
        from benchmarks.real import main_real

        return main_real(args, argv)
    if args.model is not None:
        raise SystemExit("--model needs --pipeline FAMILY (for the testbeds use --checkpoint)")
    steps = args.steps or (20 if args.quick else 50)
    samples = args.samples or (4 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 5)
    timing_samples = min(samples, args.timing_samples or (4 if args.quick else 20))
    batch_size = max(1, args.batch_size or 50)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    names = [n.strip() for n in args.testbeds.split(",") if n.strip()]
    unknown = [n for n in names if n not in TESTBEDS]
    if unknown:
        raise SystemExit(f"unknown testbed(s) {unknown}; known: {sorted(TESTBEDS)}")

    results: dict[str, Any] = {
        "meta": {
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": steps,
            "samples": samples,
            "batch_size": batch_size,
            "timing_samples": timing_samples,
            "repeats": repeats,
            "seed": args.seed,
            "quick": args.quick,
            "machine": _machine(),
            "code_version": _code_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "testbeds": {},
    }
    t_start = time.perf_counter()
    all_images: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        testbed = TESTBEDS[name]()
        pipe = testbed.load(args.checkpoint)
        methods = quick_methods() if args.quick else full_methods(steps)
        if args.methods:
            keys = [k.strip() for k in args.methods.split(",") if k.strip()]
            methods = [m for i, m in enumerate(methods) if i == 0 or any(_matches(k, m.name) for k in keys)]
        tb = run_testbed(
            testbed,
            pipe,
            methods,
            steps=steps,
            samples=samples,
            batch_size=batch_size,
            timing_samples=timing_samples,
            repeats=repeats,
            seed=args.seed,
            progress=progress,
        )
        all_images[name] = tb.pop("_images")
        results["testbeds"][name] = tb
    results["meta"]["seconds"] = time.perf_counter() - t_start

    from benchmarks.report import write_outputs
    from benchmarks.ruler import markdown as ruler_markdown

    write_outputs(results, all_images, out_dir)
    for name, tb in results["testbeds"].items():
        print(
            f"\n== {name}: {steps} steps, {samples} samples, timing batch {timing_samples}, {repeats} repeats =="
        )
        print(format_table(summary_rows(tb)))
        fl = tb["floors"]
        print(
            f"real-vs-real floor: accuracy {fl['accuracy_real_n']:.3f}, FD {fl['frechet_distance_real_n']:.2f} "
            f"({samples} real digits); train-vs-test FD {fl['frechet_distance_train_vs_test']:.2f}"
        )
        print(sensitivity_line(tb, steps))
        print(load_line(tb))
        for m, r in tb["refused"].items():
            print(f"refused: {m}: {r['reason']}")
        print(f"plain pipeline restored bit-identically after all methods: {tb['restored_bit_identical']}")
        print("\n" + ruler_markdown(name, tb))  # every run's text report carries the realism ruler
    print(
        f"\nwrote {out_dir / 'results.json'}, {out_dir / 'report.html'}, {out_dir / 'report.md'} and plots ({results['meta']['seconds']:.0f} s)"
    )
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def dump_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results.json`` (infinite PSNR is written as the string ``"inf"``)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(results), indent=1, default=_json_default))


if __name__ == "__main__":
    raise SystemExit(main())
