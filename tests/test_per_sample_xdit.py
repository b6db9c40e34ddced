"""Per-sample decisions under xDiT's Ulysses sequence parallelism (2 gloo ranks on CPU, batch of
2): every rank takes, per sample, the single device's decisions (per-row partial sums reduced in
one exact all-reduce, the samples' kinds agreed as integers)."""

from __future__ import annotations

import pytest
import torch
from _batch_workers import (
    CFG_SEEDS,
    cfg_parallel_batch,
    single_device_cfg_batch,
    single_device_flux,
    ulysses_batch,
)
from _dist import run_ranks

pytestmark = pytest.mark.multiproc

SEEDS = [0, 1]
# as in test_parallel_xdit.py: the sharded run sums and attends in another order (measured ~1e-6)
ATOL = 1e-4


def test_ulysses2_batch2_per_sample_decisions_equal_single_device(tmp_path):
    ref = single_device_flux(SEEDS)
    assert ref["kinds"][0] != ref["kinds"][1]  # the two samples decide differently
    ranks = run_ranks(ulysses_batch, 2, tmp_path, SEEDS, timeout=240)
    for r in ranks:
        assert r["log"] == ref["log"]
        assert r["kinds"] == ref["kinds"]
        torch.testing.assert_close(r["x"], ref["x"], rtol=0, atol=ATOL)
        assert r["collectives"] > 0


def test_cfg_parallel2_batch2_per_sample_decisions_equal_single_device(tmp_path):
    """CFG parallel 2, batch of 2: each rank holds one guidance branch of both samples; the
    reduction adds the branches' per-row sums, as the single device adds a sample's two rows.
    The control (same processes, second run): a rank that pairs its own rows as halves takes
    sample 0 and sample 1 for one prompt's two branches, and leaves the single device's decisions."""
    ref = single_device_cfg_batch(CFG_SEEDS)
    kinds = ref["kinds"][:2]  # rows 0, 1 (conditional); rows 2, 3 are their pairs
    assert ref["kinds"][2:] == kinds  # a sample's rows share every decision
    assert kinds[0] != kinds[1]  # the two samples decide differently
    ranks = run_ranks(cfg_parallel_batch, 2, tmp_path, CFG_SEEDS, timeout=180)
    for r in (rank["with"] for rank in ranks):
        assert r["kinds"] == kinds
        # the single device's log lists 4 rows per call (2 per sample): a rank's are the first 2
        assert r["log"] == [(k, m, n, rows[:2]) for k, m, n, rows in ref["log"]]
        assert r["collectives"] > 0
        torch.testing.assert_close(r["x"], ref["x"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ranks[0]["with"]["x"], ranks[1]["with"]["x"], rtol=0, atol=0)
    control = [rank["without"] for rank in ranks]
    assert control[0]["kinds"] == control[1]["kinds"]  # still agreed (one decision per group)
    assert control[0]["kinds"] != kinds
