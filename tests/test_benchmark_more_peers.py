"""The benchmark's MagCache (diffusers, ratios from its own calibration mode) and cache-dit's
DBCache with its TaylorSeer and FoCa calibrators: each really skips work, changes the output, and
leaves the pipeline exactly as it was once disabled."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks.methods import DBCache, MagCache, full_methods
from xslim_xdit.testing.pipelines import tiny_flux_embeds_call, tiny_flux_embeds_pipeline

STEPS = 12


def _call(seed: int = 0) -> dict:
    return {**tiny_flux_embeds_call(STEPS), "generator": torch.Generator().manual_seed(seed)}


class _Testbed:
    """What a method's ``prepare`` asks of a testbed: runs on calibration samples (seed 100 on)."""

    def calibration_runs(self, pipe: Any, steps: int, n: int = 4) -> list:
        assert steps == STEPS
        return [lambda i=i: pipe(**_call(100 + i)) for i in range(n)]


def _count_last_block(pipe: Any) -> tuple[list[int], Any]:
    calls: list[int] = []
    block = pipe.transformer.single_transformer_blocks[-1].proj_mlp
    return calls, block.register_forward_hook(lambda *a: calls.append(1))


def _run_method(method: Any) -> dict:
    pipe = tiny_flux_embeds_pipeline()
    calls, handle = _count_last_block(pipe)
    try:
        with torch.no_grad():
            ref = pipe(**_call()).images
        assert len(calls) == STEPS
        method.prepare(pipe, _Testbed(), STEPS)
        method.enable(pipe)
        calls.clear()
        with torch.no_grad():
            out = pipe(**_call()).images
        method.disable(pipe)
        stats = method.run_stats()  # cache-dit's summary is read while disabling
        # fewer block computations than steps, and a different (cached) output
        assert 0 < len(calls) < STEPS, len(calls)
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
        calls.clear()
        with torch.no_grad():
            again = pipe(**_call()).images
        assert len(calls) == STEPS and torch.equal(again, ref)
        return stats
    finally:
        handle.remove()


def test_magcache_calibrates_then_skips() -> None:
    m = MagCache(0.4)
    _run_method(m)
    assert m.mag_ratios is not None and len(m.mag_ratios) == STEPS
    assert m.mag_ratios[0] == 1.0 and all(r > 0 for r in m.mag_ratios)
    assert m.family == "magcache" and "calibration" in m.note


@pytest.mark.parametrize("calibrator", ["taylorseer", "foca"])
def test_cache_dit_calibrators(calibrator: str) -> None:
    m = DBCache(1, 0, 0.5, calibrator=calibrator)
    assert m.family == f"dbcache-{calibrator}"
    stats = _run_method(m)
    assert stats.get("cached_steps"), stats


def test_bad_calibrator_is_named() -> None:
    with pytest.raises(ValueError, match="calibrator"):
        DBCache(1, 0, 0.1, calibrator="dmd")


def test_full_benchmark_lists_the_new_peers() -> None:
    families = {m.family for m in full_methods(28)}
    assert {"magcache", "dbcache-taylorseer", "dbcache-foca"} <= families
