"""The lead-branch rule through the decision room and a real 2-rank gloo group, without a model:
a family whose step probe sees the text (FLUX, HunyuanVideo: pooled text in the modulation), so
the two guidance branches' probes change by different amounts, and whose branches rank their
blocks differently. A single device calls ``"cond"`` then ``"uncond"`` each step; under CFG
parallelism rank 0 holds ``"uncond"`` and rank 1 ``"cond"`` (xfuser's Wan I2V order).

The executor's part is played by :func:`_execute`: after a full step a branch's caches hold its
stack residual and block statistics, as the block hook leaves them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit.caches import BranchCaches
from xslim_xdit.config import XSlimConfig
from xslim_xdit.controller import StepKind, make_controller
from xslim_xdit.decision import DecisionRoom, DepthLayout
from xslim_xdit.parallel import DecisionSync, LocalSync
from xslim_xdit.parallel.sync import GroupSync

STEPS = 8
BLOCKS = 3
CONFIG = XSlimConfig(warn=0.1, crit=0.3, polish="block", warmup_steps=1, block_first_n=0, block_thresh=1.0)
#: per step, each branch's relative L1 change of its step probe (the text moves them apart)
PROBE_CHANGE = {
    "cond": (0.0, 0.04, 0.04, 0.2, 0.04, 0.35, 0.04, 0.04),
    "uncond": (0.0, 0.4, 0.04, 0.04, 0.3, 0.04, 0.2, 0.4),
}
#: per branch, its probe's magnitude (the uncond branch's dominates any sum over both)
PROBE_SCALE = {"cond": 1.0, "uncond": 30.0}
#: per branch, its blocks' mean residual magnitudes (ranked differently by the two branches)
BLOCK_MAGS = {"cond": (1.0, 0.2, 0.3), "uncond": (0.2, 1.0, 0.9)}
IMG = torch.ones(1, 4, 2)


def _probe(name: str, step: int) -> torch.Tensor:
    value = PROBE_SCALE[name]
    for change in PROBE_CHANGE[name][1 : step + 1]:
        value *= 1.0 + change
    return IMG * value


def _execute(caches: BranchCaches, name: str, step: int, kind: StepKind) -> None:
    """What the block hook leaves in the branch's caches after the call."""
    if kind == StepKind.FULL:
        caches.record_stack(IMG * (step + 1), step, exact=True)
        mags = torch.tensor(BLOCK_MAGS[name], dtype=torch.float64) * IMG.numel() * (1.0 + 0.1 * step)
        caches.block_mag = torch.stack([mags, torch.full_like(mags, IMG.numel())], dim=1)
    elif kind == StepKind.BLOCK:
        caches.record_stack(IMG * (step + 1), step, exact=False)


def run_branches(
    sync: DecisionSync, calls: tuple[tuple[str, str], ...], lead_rule: bool
) -> dict[str, list[tuple]]:
    """One run, each step making ``calls`` in order, each ``(cache_context name, branch whose
    data it holds)`` (one device: both branches; a CFG rank: its own). Returns per branch its
    calls' ``(kind, block mask, indicator)``. ``lead_rule``: the room knows each call's name (the
    xDiT integration's wiring under CFG parallel); without it every rank's statistics add up."""
    room = DecisionRoom(CONFIG, sync, DepthLayout.flat(BLOCKS), use_block=True, use_token=False)
    current: list[str] = [calls[0][0]]
    if lead_rule:
        room.branch_name = lambda: current[0]
    room.start_run(make_controller(CONFIG, STEPS))
    caches = {branch: BranchCaches(linear=True) for _, branch in calls}
    log: dict[str, list[tuple]] = {branch: [] for _, branch in calls}
    for step in range(STEPS):
        for index, (name, branch) in enumerate(calls):
            current[0] = name
            plan = room.decide(step, index, caches[branch], IMG, _probe(branch, step))
            log[branch].append((plan.kind.name, tuple(plan.compute or ()), plan.decision.indicator))
            _execute(caches[branch], branch, step, plan.kind)
    return log


def single_device(lead_rule: bool = True) -> dict[str, list[tuple]]:
    """The single device: ``"cond"`` then ``"uncond"`` each step."""
    return run_branches(LocalSync(), (("cond", "cond"), ("uncond", "uncond")), lead_rule)


def cfg_ranks(rank: int, world: int) -> dict[str, Any]:
    """CFG parallel 2: rank 0 ``"uncond"``, rank 1 ``"cond"``; with the lead-branch rule, with
    the summed rule (the room not told the branch), and with batched guidance (each rank holds
    its branch's row, both calls named ``"cond_uncond"``: the plain sums, as before)."""
    dist.init_process_group("gloo")
    try:
        sync = GroupSync(dist.group.WORLD, timeout_s=60.0)
        branch = ("uncond", "cond")[rank]
        out: dict[str, Any] = {
            "lead": run_branches(sync, ((branch, branch),), lead_rule=True)[branch],
            "summed": run_branches(sync, ((branch, branch),), lead_rule=False)[branch],
            "batched": run_branches(sync, (("cond_uncond", branch),), lead_rule=True)[branch],
        }
        out["collectives"] = sync.collectives
        return out
    finally:
        dist.destroy_process_group()
