"""Several gloo processes on CPU: CFG-parallel ranks share one decision and match a single
device; data-parallel replicas decide alone; a failing rank does not hang the others."""

from __future__ import annotations

import time

import pytest
import torch
from _dist import run_ranks
from _dist_workers import CFG_CONFIG, cfg_parallel, data_parallel, failing_rank, single_device_cfg

pytestmark = pytest.mark.multiproc


def _first_divergent_label():
    """A class label for which per-branch (unreduced) decisions differ between the branches."""
    return 3


def test_cfg_parallel_matches_single_device(tmp_path):
    label = _first_divergent_label()
    ref = single_device_cfg(label, CFG_CONFIG)
    ranks = run_ranks(cfg_parallel, 2, tmp_path, label, True)
    assert ranks[0]["log"] == ranks[1]["log"] == ref["log"]
    assert {k for k, _, _ in ref["log"]} == {"skip", "block", "token", "full"}  # the check has teeth
    # batched vs separate forwards differ only by float round-off in the reductions and matmuls
    torch.testing.assert_close(ranks[0]["x"], ref["x"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ranks[1]["x"], ranks[0]["x"], rtol=0, atol=0)
    assert ranks[0]["collectives"] > 0


def test_without_reductions_cfg_ranks_diverge(tmp_path):
    """The control: each branch deciding on its own indicator disagrees with the other branch,
    which is what the reductions above prevent."""
    ranks = run_ranks(cfg_parallel, 2, tmp_path, _first_divergent_label(), False)
    assert ranks[0]["log"] != ranks[1]["log"]
    assert ranks[0]["collectives"] == 0


def test_data_parallel_replicas_decide_independently(tmp_path):
    ranks = run_ranks(data_parallel, 2, tmp_path)
    assert ranks[0]["collectives"] == ranks[1]["collectives"] == 0  # single-rank groups: no traffic
    assert ranks[0]["log"] != ranks[1]["log"] or not torch.equal(ranks[0]["x"], ranks[1]["x"])


def test_a_failing_rank_ends_every_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception) as err:  # noqa: B017 - torch's ProcessRaisedException
        run_ranks(failing_rank, 2, tmp_path, timeout=90)
    assert "injected failure on rank 1" in str(err.value)
    assert time.monotonic() - start < 90
