"""Per-sample decisions under xDiT's Ulysses sequence parallelism (2 gloo ranks on CPU, batch of
2): every rank takes, per sample, the single device's decisions (per-row partial sums reduced in
one exact all-reduce, the samples' kinds agreed as integers)."""

from __future__ import annotations

import pytest
import torch
from _batch_workers import single_device_flux, ulysses_batch
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
