"""The decision room: what one transformer call does (skip, block set, token set or full).

Facts come in (the step and guidance branch, the step probe, what the branch's caches can serve,
the schedule through the controller, the decision of the previous pipeline stage); one
:class:`CallPlan` goes out. The room is the only place that:

* reduces the indicator's partial sums through the :class:`~xslim_xdit.parallel.DecisionSync`
  (exact, so every rank reads the same value), and only when the controller reads it;
* asks the controller for a proposal, downgrades it to what the caches can serve, has the ranks
  agree on it as integers (the online controller only: a schedule is the same on every rank by
  construction and makes no collective), and commits the kind that really runs back to the
  controller;
* takes the block set (whole depth, from reduced block statistics) and the token set.

Later guidance branches of a step follow the step's first branch. Under CFG parallelism with one
branch per rank, the rank holding that first (lead) branch supplies the statistics
(:attr:`DecisionRoom.branch_name`). Under PipeFusion the first stage decides and the later stages
receive, all behind the same sync interface.

Example:
    >>> import torch
    >>> from xslim_xdit.caches import BranchCaches
    >>> from xslim_xdit.config import XSlimConfig
    >>> from xslim_xdit.controller import make_controller
    >>> from xslim_xdit.parallel import LocalSync
    >>> cfg = XSlimConfig(warmup_steps=1)
    >>> room = DecisionRoom(cfg, LocalSync(), DepthLayout.flat(4), use_block=False, use_token=False)
    >>> room.start_run(make_controller(cfg, 3))
    >>> caches, img = BranchCaches(linear=True), torch.ones(1, 4, 2)
    >>> room.decide(0, 0, caches, img, probe=img).decision.kind.name
    'FULL'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .adapters.attention import flat_rows
from .caches import BranchCaches
from .config import XSlimConfig
from .controller import Controller, StepDecision, StepKind, tokens_per_group
from .depth import DepthLayout, depth_mask, image_block_partials
from .parallel.sync import LEAD_BRANCHES, DecisionSync, sum_from_lead_branch

__all__ = ["CallPlan", "DecisionRoom", "DepthLayout", "depth_mask", "image_block_partials"]


@dataclass
class CallPlan:
    """What the current call does, fixed before its first block runs."""

    decision: StepDecision
    compute: list[bool] | None = None  # whole-depth mask (global block indices), BLOCK steps
    token_index: torch.Tensor | None = None  # (B, k) image-token positions, TOKEN steps
    token_flat: torch.Tensor | None = None  # flat_rows(token_index, N), shared by every block
    token_count: int = 0  # refreshed image tokens per sample, over every sequence shard

    @property
    def kind(self) -> StepKind:
        return self.decision.kind


class DecisionRoom:
    """Assembles each call's :class:`CallPlan`; holds the run's controller.

    Args:
        config: the run's configuration.
        sync: where ranks agree (reductions, agreement, PipeFusion forwarding).
        layout: the whole depth (:class:`DepthLayout`).
        use_block, use_token: which polish levels have caches to serve them.
        sequence_shards: sequence-parallel shards (token counts are reported over all of them).
    """

    def __init__(
        self,
        config: XSlimConfig,
        sync: DecisionSync,
        layout: DepthLayout,
        use_block: bool,
        use_token: bool,
        sequence_shards: int = 1,
    ) -> None:
        self.config = config
        self.sync = sync
        self.layout = layout
        self.use_block = use_block
        self.use_token = use_token
        self.sequence_shards = sequence_shards
        self.controller: Controller | None = None
        self.num_steps = 0
        #: the current call's reference-image tokens (bool over the image tokens), or None
        #: (:meth:`~xslim_xdit.adapters.ModelAdapter.reference_tokens`)
        self.reference: torch.Tensor | None = None
        self._step_plans: dict[int, CallPlan] = {}  # the first branch's plan, per step
        #: decide step ``s`` on step ``s - 1``'s whole-image indicator (``config.lagged_indicator``;
        #: the engine turns it on under PipeFusion with patches when the config leaves it ``None``)
        self.lagged = config.lagged_indicator is True
        self._lag_step = -1  # the step whose probe rows are being collected
        self._lag_rows: list[torch.Tensor] = []  # its probes, one per image part, in call order
        self._lag_prev: torch.Tensor | None = None  # the whole probe of the step before it
        self._lag_value: float | None = None  # the indicator of step _lag_step - 1
        #: explicit token groups (None: ``config.token_groups`` equal chunks): the image's group
        #: sizes, or ``() -> (sizes, part)``, ``part`` the group the call holds (PipeFusion's patch;
        #: None: the whole image); one device given PipeFusion's sizes selects the same tokens.
        self.token_group_sizes: (
            Sequence[int] | Callable[[], tuple[Sequence[int] | None, int | None]] | None
        ) = None
        self._token_whole: int | None = None
        #: PipeFusion's token selection across stages (``parallel.pipeline.PipelineTokens``)
        self.pipeline_tokens: Any = None
        #: reduce the step indicator with :meth:`~xslim_xdit.parallel.DecisionSync.sum_exact`
        #: (calibration's recording mode: the value is written into the profile, so every rank
        #: must hold the same bytes; decisions never need it, the kind is agreed as an integer)
        self.exact_sums = False
        #: ``() -> name`` of the current call's guidance branch (its ``cache_context`` name), or
        #: None (the default): set under CFG parallelism (the xDiT integration: the clock's name),
        #: so that the statistics of the rank holding a branch in :attr:`lead_branches` decide,
        #: as the single device's first call of a step does (``docs/parallel.md``). Override it
        #: where a pipeline names its ranks' branches alike (e.g. by CFG rank).
        self.branch_name: Callable[[], str | None] | None = None
        #: the branch names a single device calls first in each step
        self.lead_branches: frozenset[str] = LEAD_BRANCHES

    def start_run(self, controller: Controller) -> None:
        self.controller = controller
        self.num_steps = controller.num_steps
        self._step_plans.clear()
        self._lag_step, self._lag_rows, self._lag_prev, self._lag_value = -1, [], None, None
        self.sync.start_run()

    @property
    def wants_probe(self) -> bool:
        """The controller reads the step indicator and this rank decides."""
        return self.controller is not None and self.controller.wants_indicator and self.sync.is_decider

    def decide(
        self,
        step: int,
        branch: int,
        caches: BranchCaches,
        img: torch.Tensor,
        probe: torch.Tensor | None,
        token_kv_ready: bool = True,
        parts: Sequence[BranchCaches] = (),
    ) -> CallPlan:
        """The plan of one call. ``probe``: this call's step probe (or None); ``caches``: the
        branch's caches (their probe is read here and replaced by ``probe``); ``parts``: when
        the image is split over several calls of a step (PipeFusion's patches, branches
        ``0..len(parts)-1``), the caches of every part, in order; empty: one call holds it."""
        controller = self.controller
        if controller is None:
            raise RuntimeError("DecisionRoom.decide before start_run")
        lead = self._step_plans.get(step) if branch > 0 else None
        indicator = None
        if self.lagged:
            if probe is not None and branch < max(1, len(parts)):
                indicator = self._lagged_indicator(step, probe)
        elif lead is None and probe is not None and caches.probe_prev is not None:
            indicator = self._indicator(probe, caches.probe_prev)
        if probe is not None:
            caches.probe_prev = probe.detach()
        received: list[int] | None = None
        if lead is not None:
            # Follow the step's first branch, as far as this branch's own caches can (a guidance
            # branch that starts after the first step has nothing cached yet).
            decision = self._feasible(lead.decision, caches, img, token_kv_ready)
        elif not self.sync.is_decider:
            received = self.sync.receive_decision(1 + self.layout.total_blocks)
            assert received is not None
            decision = StepDecision(step, StepKind(received[0]), None, 0.0, "from the previous stage")
        else:
            decision = self._decide_here(controller, step, indicator, caches, img, token_kv_ready)
        plan = CallPlan(decision)
        if decision.kind == StepKind.BLOCK:
            if received is not None:
                plan.compute = [bool(c) for c in received[1:]]
            elif lead is not None and lead.compute is not None:
                plan.compute = list(lead.compute)
            else:
                plan.compute = self._select_blocks(caches, parts)
        if branch == 0:
            if self.sync.is_decider:
                mask = plan.compute if plan.compute is not None else [True] * self.layout.total_blocks
                statistics_follow = (
                    self.use_block and decision.kind == StepKind.FULL and step < self.num_steps - 1
                )
                self.sync.publish_decision([int(decision.kind)] + [int(c) for c in mask], statistics_follow)
            self._step_plans = {step: plan}
        if decision.kind == StepKind.TOKEN:
            plan.token_index = self._select_tokens(caches)
            plan.token_flat = flat_rows(plan.token_index, img.shape[1])
            whole = self._token_whole if self._token_whole is not None else int(plan.token_index.shape[1])
            plan.token_count = whole * self.sequence_shards
        return plan

    # ------------------------------------------------------------------ the steps of a decision
    def _lagged_indicator(self, step: int, probe: torch.Tensor) -> float | None:
        """Collect ``probe`` (one part of ``step``'s image); on a step's first call, close the
        step before: its parts, joined in call order (PipeFusion's patches are contiguous row
        bands in token order), are compared with the whole probe of the step before that. The
        value returned is step ``step - 1``'s indicator (reduced over the ranks once per step,
        at the step's first call, where every rank of the decision group is)."""
        if step != self._lag_step:
            whole = torch.cat(self._lag_rows, dim=1) if self._lag_rows else None
            value = None
            if whole is not None and self._lag_prev is not None and step == self._lag_step + 1:
                value = self._indicator(whole, self._lag_prev)
            self._lag_prev = whole if step == self._lag_step + 1 else None
            self._lag_step, self._lag_rows, self._lag_value = step, [], value
        self._lag_rows.append(probe.detach())
        return self._lag_value

    def _indicator(self, probe: torch.Tensor, previous: torch.Tensor) -> float | None:
        """Relative L1 change of the probe, from partial sums reduced over the ranks."""
        if previous.shape != probe.shape:
            return None
        sums = torch.stack(
            [(probe - previous).abs().sum(dtype=torch.float64), previous.abs().sum(dtype=torch.float64)]
        )
        sums = self._reduce(sums, self.sync.sum_exact if self.exact_sums else self.sync.sum_partials)
        return float(sums[0] / sums[1]) if float(sums[1]) > 0 else None

    def _reduce(self, partials: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``reduce(partials)``; with :attr:`branch_name` set, from the lead branch's ranks when
        the group's calls hold different guidance branches (CFG parallel, separate calls)."""
        if self.branch_name is None:
            return reduce(partials)
        return sum_from_lead_branch(partials, reduce, self.branch_name(), self.lead_branches)

    def _decide_here(
        self,
        controller: Controller,
        step: int,
        indicator: float | None,
        caches: BranchCaches,
        img: torch.Tensor,
        token_kv_ready: bool,
    ) -> StepDecision:
        self.sync.begin_decision()
        forced = controller.forced_full(step)
        proposal = controller.propose(step, None if forced else indicator)
        decision = self._feasible(proposal, caches, img, token_kv_ready)
        # A schedule is the same on every rank by construction (configs agree): no broadcast.
        if not forced and controller.wants_indicator:
            agreed = self.sync.agree([int(decision.kind)], device=img.device)[0]
            if agreed != int(decision.kind):
                kind = StepKind(agreed)
                decision = replace(decision, kind=kind, reason="agreed")
        decision = controller.commit(decision)
        if decision.indicator is None and indicator is not None:
            # keep the raw probe change of forced-full steps for the statistics and profiles
            decision = replace(decision, indicator=indicator)
        return decision

    def _feasible(
        self, d: StepDecision, caches: BranchCaches, img: torch.Tensor, token_kv_ready: bool
    ) -> StepDecision:
        """Downgrade a decision the caches cannot serve yet (identically on every rank: cache
        presence and shapes depend only on the decision history and the layout, which ranks
        share; PipeFusion's switch from whole images to patches changes the shapes)."""
        kind = d.kind
        if kind != StepKind.FULL and not caches.can_reuse_stack(img):
            kind = StepKind.FULL
        if kind == StepKind.BLOCK and (not self.use_block or caches.block_mag is None):
            kind = StepKind.FULL
        if kind == StepKind.TOKEN and (not self.use_token or not token_kv_ready):
            kind = StepKind.FULL
        if kind == d.kind:
            return d
        return replace(d, kind=kind, error=0.0, reason=d.reason + " -> full (no cache yet)")

    def _select_blocks(self, caches: BranchCaches, parts: Sequence[BranchCaches] = ()) -> list[bool]:
        """The whole-depth block mask (global indices), from every stage's magnitudes, summed
        over the image's parts (``parts``: PipeFusion's patches) as one call over the whole
        image sums them."""
        if caches.block_mag is None:
            raise RuntimeError(
                "block step without block statistics (the feasibility check should prevent it)"
            )
        local = image_block_partials(caches, parts)
        local = self.sync.whole_depth_block_partials(local)
        sums = self._reduce(local.clone(), self.sync.sum_block_partials)
        if sums.shape[0] != self.layout.total_blocks:
            raise RuntimeError(
                f"block statistics cover {sums.shape[0]} blocks, the model has {self.layout.total_blocks}"
            )
        compute = depth_mask(self.config, self.layout, sums)
        agreed = self.sync.agree([int(c) for c in compute], device=sums.device)
        return [bool(c) for c in agreed]

    def _token_groups(self, n: int) -> tuple[list[int], list[int], int]:
        """This call's token groups over its ``n`` image tokens: their sizes, the tokens each
        refreshes, and the tokens refreshed over the whole image (a PipeFusion patch holds one
        group of the image; the record counts the whole image's, as one device's call does)."""
        spec, part = self.token_group_sizes, None
        if callable(spec):
            spec, part = spec()
        if spec is None:
            counts = tokens_per_group(n, self.config.token_ratio, self.config.token_groups)
            sizes = [n // len(counts) + (1 if g < n % len(counts) else 0) for g in range(len(counts))]
            return sizes, counts, sum(counts)
        sizes = [int(x) for x in spec]
        counts = [tokens_per_group(x, self.config.token_ratio)[0] for x in sizes]
        if part is None and sum(sizes) == n:
            return sizes, counts, sum(counts)
        if part is not None and 0 <= part < len(sizes) and sizes[part] == n:
            return [n], [counts[part]], sum(counts)
        raise RuntimeError(f"token groups {sizes} (part {part}) do not cover this call's {n} image tokens")

    def _select_tokens(self, caches: BranchCaches, change: torch.Tensor | None = None) -> torch.Tensor:
        """Per sample, the tokens whose stack residual changed most since the token history (``change``:
        PipeFusion's whole depth, from ``PipelineTokens.select``), top ``token_ratio`` per token group
        (:meth:`_token_groups`), sorted; the count over the whole image in ``_token_whole``."""
        self._token_whole = None
        if self.pipeline_tokens is not None and change is None:
            return self.pipeline_tokens.select(self, caches)
        if change is None:  # after only one computed step: where the residual is largest
            change, history = caches.residual, caches.token_history
            assert change is not None
            change = change - history if history is not None and history.shape == change.shape else change
        score = change.abs().mean(-1)
        n = score.shape[1]
        ref = self.reference
        if ref is not None and ref.shape[0] == n and not bool(ref.all()):
            return self._select_output_tokens(score, ref.to(score.device))
        sizes, counts, self._token_whole = self._token_groups(n)
        parts, start = [], 0
        for size, k in zip(sizes, counts, strict=True):
            parts.append(score[:, start : start + size].float().topk(k, dim=1).indices + start)
            start += size
        return torch.cat(parts, 1).sort(dim=1).values

    def _select_output_tokens(self, score: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """:meth:`_select_tokens` with reference-image tokens (``ref``): within each chunk the top
        ``token_ratio`` of the output tokens only. The reference tokens keep the K/V of the last
        full step (the model's output for them is discarded); measured on the tiny FLUX Kontext
        pipeline at equal tokens refreshed, this is closer to the full run than selecting among
        all image tokens (mean error 0.0033 against 0.0059 at 11 tokens) or refreshing every
        reference token beside the output ones (0.0060 at 21 tokens)."""
        n, groups = score.shape[1], self.config.token_groups
        if n < groups:
            raise ValueError(f"token_groups={groups} needs at least that many tokens; got {n}")
        parts, start = [], 0
        for g in range(groups):
            size = n // groups + (1 if g < n % groups else 0)
            chunk_ref = ref[start : start + size]
            n_out = size - int(chunk_ref.sum())
            if n_out:
                k = min(n_out, max(1, math.ceil(self.config.token_ratio * n_out)))
                chunk = score[:, start : start + size].float().masked_fill(chunk_ref, float("-inf"))
                parts.append(chunk.topk(k, dim=1).indices + start)
            start += size
        return torch.cat(parts, 1).sort(dim=1).values
