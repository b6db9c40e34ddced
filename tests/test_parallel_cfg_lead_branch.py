"""CFG parallel with separate guidance calls: the lead-branch rule (issue #11, docs/parallel.md).

A single device that calls the transformer once per guidance branch decides each step at its
first call, ``"cond"``, from that branch's step probe and block statistics; under CFG parallel
(one branch per rank) the rank holding ``"cond"`` supplies the statistics and the other rank's
are zeroed in the same exact reduction. Checked through the decision room on 2 gloo ranks for a
family whose probe sees the text (the branches' step indicators differ, not only their block
rankings); xfuser's real Wan I2V pipeline is in tests/test_parallel_xdit_wan.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _cfg_lead_workers import cfg_ranks, single_device
from _dist import run_ranks

from xslim_xdit.clock import StepClock
from xslim_xdit.parallel.sync import LocalSync, sum_from_lead_branch


@pytest.mark.multiproc
def test_cfg_parallel_ranks_decide_as_the_single_devices_first_branch(tmp_path):
    got = run_ranks(cfg_ranks, 2, tmp_path, timeout=120)
    ref = single_device()
    assert ref["uncond"] == ref["cond"]  # one device: the second branch follows the first
    assert {k for k, _, _ in ref["cond"]} == {"FULL", "SKIP", "BLOCK"}
    assert any(mask and not all(mask) for _, mask, _ in ref["cond"])  # a partial block mask
    # every rank's kinds, block masks and indicators (bit for bit) are the single device's
    for rank, branch in enumerate(("uncond", "cond")):
        assert got[rank]["lead"] == ref[branch]
    # the summed rule (the room not told the branch): the ranks agree with each other but not
    # with the single device, in the step kinds too (the probe sees the text)
    assert got[0]["summed"] == got[1]["summed"]
    assert [k for k, _, _ in got[0]["summed"]] != [k for k, _, _ in ref["cond"]]
    # batched guidance (both ranks' calls alike, "cond_uncond"): the plain sums, as before
    assert got[0]["batched"] == got[1]["batched"] == got[0]["summed"]
    assert got[0]["collectives"] > 0


def test_lead_branch_sums_choose_the_plain_sums_without_separate_branches():
    stats = torch.tensor([[3.0, 2.0], [1.0, 4.0]])
    for name in ("cond", "uncond", "cond_uncond", None):  # one device: nothing to choose from
        assert torch.equal(sum_from_lead_branch(stats, LocalSync().sum_partials, name), stats.double())

    def other_rank_holds(branch: str, values: torch.Tensor):  # a 2-rank all-reduce, simulated
        lead = branch == "cond"
        extra = torch.tensor([float(lead), float(not lead)], dtype=torch.float64)
        theirs = torch.cat([values.reshape(-1), values.reshape(-1) * lead, extra]).double()
        return lambda packed: packed + theirs

    cond = torch.tensor([[5.0, 2.0], [7.0, 4.0]])
    assert sum_from_lead_branch(stats, other_rank_holds("cond", cond), "uncond").tolist() == cond.tolist()
    assert sum_from_lead_branch(cond, other_rank_holds("uncond", stats), "cond").tolist() == cond.tolist()
    both_cond = sum_from_lead_branch(stats, other_rank_holds("cond", cond), "cond")  # both alike
    assert both_cond.tolist() == (stats + cond).tolist()


def test_clock_names_the_calls_branch():
    clock = StepClock()
    clock.start_run()
    assert clock.tick(900.0, SimpleNamespace(name="uncond", step_index=None))[2] == 0  # its index: 0
    assert clock.name == "uncond"  # the name says which branch it is
    clock.tick(800.0)
    assert clock.name is None
