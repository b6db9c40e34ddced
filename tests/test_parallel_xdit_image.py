"""X-Slim on FLUX.2 under xDiT's real sequence parallelism (xfuser 0.7's FLUX.2 wrapper, Ulysses 2),
on CPU with gloo: both ranks make the single device's decisions and produce its output."""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from _xdit_image_workers import flux2_usp, single_device

pytestmark = pytest.mark.multiproc

ATOL = 1e-4  # as tests/test_parallel_xdit.py: other reduction and key orders, ~1e-6 measured


def test_flux2_ulysses_ranks_agree_with_single_device(tmp_path):
    """A schedule with every level (one case: two spawned ranks importing xfuser take most of a
    minute on a loaded CPU; the online controller's reductions are FLUX.1's, tested there)."""
    ref = single_device(2, "schedule")
    ranks = run_ranks(flux2_usp, 2, tmp_path, 2, "schedule", timeout=240)
    assert ranks[0]["log"] == ranks[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "token", "full"}  # every level ran
    torch.testing.assert_close(ranks[0]["plain"], ref["plain"], rtol=0, atol=ATOL)  # xfuser itself
    for r in ranks:
        torch.testing.assert_close(r["x"], ref["x"], rtol=0, atol=ATOL)
    assert ranks[0]["collectives"] > 0
