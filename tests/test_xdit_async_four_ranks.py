"""Ulysses 2 x asynchronous PipeFusion 2 (4 gloo ranks, xfuser's ``xFuserFluxPipeline`` on the tiny
FLUX, 2 patches, one pipeline warm-up step) with the online controller: the stages decide under the
lagged indicator rule, and every rank's decision log equals a single device that runs the same
rule (``lagged_indicator=True``). Issue #11's untested corner: the 2-rank asynchronous case and the
synchronous 4-rank case are in ``tests/test_parallel_pipefusion.py``."""

from __future__ import annotations

import pytest
from _dist import run_ranks
from _pp_workers import STEPS, pipefusion, single_device

pytestmark = pytest.mark.multiproc


def test_ulysses2_by_async_pipefusion2_matches_single_device_with_the_lagged_rule(tmp_path):
    ref = single_device("online", lagged_indicator=True)
    # 4 ranks: (online, 1 pipeline warm-up step, 2 patches, Ulysses 2)
    ranks = run_ranks(pipefusion, 4, tmp_path, "online", 1, 2, 2, timeout=600)
    assert sorted(r["stage"] for r in ranks) == [0, 0, 1, 1]
    for r in ranks:
        assert r["log"] == ref["log"], (r["calls"], ref["calls"])
    assert {k for k, _, _ in ref["log"]} == {"full", "block", "skip"}
    # every call of a step runs one plan; patch p of a step is branch p
    assert [(s, b) for s, b, _, _ in ranks[0]["calls"]] == [(0, 0)] + [
        (s, b) for s in range(1, STEPS) for b in range(2)
    ]
    # stage 0's indicators: the whole image's, over both shards, up to PipeFusion's stale
    # activations (measured 3e-3 relative)
    mine = [i for s, b, _, i in ranks[0]["calls"] if b == 0]
    theirs = [i for _, _, _, i in ref["calls"]]
    assert mine[:2] == theirs[:2] == [None, None]
    assert mine[2:] == pytest.approx(theirs[2:], rel=1e-2)
    out = [r for r in ranks if r["x"] is not None]
    assert out
    for r in out:
        # asynchronous PipeFusion reuses the other patch's one-step-old activations, and X-Slim's
        # cached residuals (recorded from those activations) extrapolate that difference: measured
        # 9.4e-2 from the single device with X-Slim, against 3.7e-3 for xfuser's own layout
        # without it (the 2-rank asynchronous test allows 0.1); a loose bound, the logs are the test
        assert (r["x"] - ref["x"]).abs().max() < 0.15
