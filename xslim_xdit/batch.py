"""Per-sample decisions in a batch (``XSlimConfig(per_sample=True)``).

By default a call takes one decision for its whole batch, from the indicator reduced over the
batch. With ``per_sample`` every sample of the batch decides for itself, so that each sample's
output is the one it gets when generated alone with the same seed:

* a **sample** is one batch row, or, with batched classifier-free guidance, the two rows of one
  prompt (rows ``i`` and ``i + B/2``, diffusers' ``torch.cat([latents] * 2)``): they share every
  decision, as they do when that prompt runs alone (``XSlimConfig.guidance_pairs``);
* each row keeps its own controller state and its own caches (:class:`SampleRoom`); a sample's
  indicator is the relative L1 change of its rows' step probe, from per-row partial sums reduced
  over the ranks in one exact all-reduce, and the samples' kinds are agreed as integers in one
  broadcast (the same :class:`~xslim_xdit.parallel.DecisionSync` path as whole-batch decisions);
* in each block, the rows that compute it (full samples, and block-refresh samples whose block
  set holds it) run as one sub-batch (:meth:`~xslim_xdit.adapters.ModelAdapter.select_samples`
  indexes the streams and every per-sample argument); the others reuse their cached residual;
  the rows are put back in batch order (:class:`~xslim_xdit.batch_executor.SampleExecutor`).
  When every row computes, the block runs on the batch as it is.

Levels: skip, block refresh and full, per sample. Token refresh is refused with ``per_sample``
(its K/V cache is one tensor per branch for the whole batch; in the whole-batch path each sample
already selects its own tokens). PipeFusion is refused too (its stages forward one decision).

Example:
    >>> import torch
    >>> from xslim_xdit import XSlimConfig, enable_xslim, disable_xslim
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> cfg = XSlimConfig(warmup_steps=1, warn=0.5, crit=0.9, per_sample=True, guidance_pairs="none")
    >>> engine = enable_xslim(m, cfg, num_inference_steps=4)
    >>> out = sample(m, "dit", steps=4, batch=2)
    >>> engine.statistics.records[1].sample_kinds
    ['skip', 'skip']
    >>> disable_xslim(m)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .batch_executor import SampleExecutor  # noqa: F401 (re-exported: the executor half)
from .caches import BranchCaches
from .config import ConfigError, XSlimConfig
from .controller import Controller, StepDecision, StepKind
from .decision import CallPlan, DecisionRoom, depth_mask
from .parallel.sync import DecisionSync

if TYPE_CHECKING:
    from .adapters.base import ModelAdapter
    from .stats import StepRecord


def refuse_per_sample(adapter: ModelAdapter) -> None:
    """Raise :class:`~xslim_xdit.config.ConfigError` for a family that per-sample decisions cannot
    serve: the per-sample executor keeps one stack residual per row for the image stream only, so a
    skipped row would pass a second stream the output reads (LTX-2's audio) through unchanged (the
    whole-batch path estimates it)."""
    if adapter.text_output_used:
        raise ConfigError(
            f"family {adapter.name!r}: per_sample=True is not supported (its output reads the "
            "blocks' second stream, which per-sample skips do not estimate); use per_sample=False"
        )


def sample_groups(batch: int, pairs: str, paired: list[bool] | None = None) -> list[list[int]]:
    """The batch rows of each sample, in order of their first row.

    ``pairs``: ``"none"`` (a row each), ``"halves"`` (rows ``i`` and ``i + batch/2``) or
    ``"auto"`` (``"halves"`` where ``paired[i]``, the rows alone elsewhere).

    Example:
        >>> sample_groups(4, "halves")
        [[0, 2], [1, 3]]
        >>> sample_groups(4, "auto", [True, False])
        [[0, 2], [1], [3]]
        >>> sample_groups(3, "auto")
        [[0], [1], [2]]
    """
    half = batch // 2
    if pairs == "none" or batch < 2 or batch % 2:
        return [[r] for r in range(batch)]
    groups: list[list[int]] = []
    for r in range(half):
        if pairs == "halves" or (paired is not None and paired[r]):
            groups.append([r, r + half])
        else:
            groups += [[r], [r + half]]
    return sorted(groups)


@dataclass
class SamplePlan:
    """What each row of the current call does, fixed before its first block runs."""

    groups: list[list[int]]
    decisions: list[StepDecision]  # per row (the rows of a sample share theirs)
    masks: list[list[bool] | None]  # per row: the whole-depth block mask of block-refresh rows
    caches: list[BranchCaches]  # per row, of the call's guidance branch
    indicators: list[float | None]  # per row: its sample's indicator
    #: the row indices of each sub-batch, as tensors on the model's device (built once per call:
    #: the blocks of a call mostly share their sub-batch, and a host-to-device copy per block
    #: would stall an accelerator)
    _index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        key = tuple(rows)
        t = self._index.get(key)
        if t is None:
            t = self._index[key] = torch.tensor(rows, device=device)
        return t

    def annotate(self, record: StepRecord) -> None:
        """Add each row's kind, indicator and block mask to the call's statistics record."""
        record.sample_kinds = [k.name.lower() for k in self.kinds]
        record.sample_indicators = list(self.indicators)
        record.sample_masks = [None if m is None else [int(c) for c in m] for m in self.masks]

    @property
    def kinds(self) -> list[StepKind]:
        return [d.kind for d in self.decisions]

    def computes(self, g: int) -> list[int]:
        """The rows that run global block ``g``."""
        return [
            r
            for r, d in enumerate(self.decisions)
            if d.kind == StepKind.FULL or (d.kind == StepKind.BLOCK and self.masks[r][g])  # type: ignore[index]
        ]

    def summary(self) -> CallPlan:
        """One :class:`CallPlan` for the call's record: the heaviest kind any row runs, the
        largest error, and the indicator where every sample read the same (one sample)."""
        heaviest = max(self.decisions, key=lambda d: int(d.kind))
        step = self.decisions[0].step
        error = max(d.error for d in self.decisions)
        shared = {d.indicator for d in self.decisions}
        indicator = self.decisions[0].indicator if len(shared) == 1 else None
        kinds = ",".join(k.name.lower() for k in self.kinds)
        return CallPlan(StepDecision(step, heaviest.kind, indicator, error, f"per sample: {kinds}"))


class SampleRoom:
    """Per-row controllers and caches, and each call's :class:`SamplePlan`.

    Args:
        config: the run's configuration (``per_sample=True``).
        room: the engine's whole-batch :class:`~xslim_xdit.decision.DecisionRoom`, whose sync
            (where ranks agree) and depth layout this room uses.
        use_block: block residuals and statistics are cached.
    """

    def __init__(self, config: XSlimConfig, room: DecisionRoom, use_block: bool) -> None:
        self.config = config
        self.room = room
        self.use_block = use_block
        self._make: Callable[[], Controller] | None = None
        self.controllers: list[Controller] = []
        self.branches: dict[int, list[BranchCaches]] = {}
        self._step_plans: dict[int, SamplePlan] = {}
        #: this rank holds one guidance branch of every sample (CFG parallel): row ``i`` is sample
        #: ``i``, and its pair is row ``i`` of the other branch's rank, whose partial sums the
        #: reduction adds; so the rows are not paired here, whatever ``guidance_pairs`` says
        #: (set by :func:`~xslim_xdit.integrations.xfuser.enable_xslim_xdit` when ``cfg > 1``)
        self.branch_per_rank = False

    @property
    def sync(self) -> DecisionSync:
        return self.room.sync

    def start_run(self, make: Callable[[], Controller]) -> None:
        """A new run: every row gets a fresh controller from ``make`` at the first call."""
        self._make = make
        self.reset()

    def reset(self) -> None:
        self.controllers = []
        self.branches.clear()
        self._step_plans.clear()

    def nbytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rows in self.branches.values():
            for caches in rows:
                for name, n in caches.nbytes().items():
                    out[name] = out.get(name, 0) + n
        return out

    def _rows(self, batch: int, branch: int) -> list[BranchCaches]:
        if not self.controllers:
            assert self._make is not None, "SampleRoom.decide before start_run"
            self.controllers = [self._make() for _ in range(batch)]
        elif len(self.controllers) != batch:
            raise RuntimeError(
                f"per_sample: this call has {batch} batch rows and the run started with "
                f"{len(self.controllers)}: the batch changed within a run; start a new run "
                "(engine.start_run) for the new batch"
            )
        rows = self.branches.get(branch)
        if rows is None:
            linear = self.config.extrapolate == "linear"
            rows = self.branches[branch] = [BranchCaches(linear=linear) for _ in range(batch)]
        return rows

    def decide(self, step: int, branch: int, img: torch.Tensor, probe: torch.Tensor | None) -> SamplePlan:
        """The plan of one call: ``img`` is block 0's image input (B, N, D), ``probe`` the step
        probe of every row (or None when the controller reads none)."""
        batch = img.shape[0]
        caches = self._rows(batch, branch)
        lead = self._step_plans.get(step) if branch > 0 else None
        if lead is not None:
            plan = self._follow(lead, caches, img)
        else:
            plan = self._decide_here(step, caches, img, probe)
        if probe is not None:
            for r in range(batch):
                caches[r].probe_prev = probe[r : r + 1].detach()
        if branch == 0:
            self._step_plans = {step: plan}
        return plan

    # ------------------------------------------------------------------ the steps of a decision
    def _measure(
        self, img: torch.Tensor, probe: torch.Tensor | None, caches: list[BranchCaches]
    ) -> tuple[list[list[int]], list[float | None]]:
        """The samples (groups of rows) and each one's indicator, from one exact reduction of
        per-row partial sums: ``[sum|probe - previous|, sum|previous|, rows differ]``."""
        batch = img.shape[0]
        pairs = "none" if self.branch_per_rank else self.config.guidance_pairs
        if pairs == "halves" and batch % 2:
            raise RuntimeError(
                f"guidance_pairs='halves' needs an even batch (uncond and cond halves); got {batch} rows"
            )
        has = [
            probe is not None and c.probe_prev is not None and c.probe_prev.shape == probe[r : r + 1].shape
            for r, c in enumerate(caches)
        ]
        auto = pairs == "auto" and batch >= 2 and batch % 2 == 0
        if not any(has) and not auto:
            return sample_groups(batch, pairs), [None] * batch
        cols = torch.zeros(batch, 3, dtype=torch.float64, device=img.device)
        for r in range(batch):
            if has[r]:
                assert probe is not None
                prev = caches[r].probe_prev
                assert prev is not None
                # row by row, so a row's sums are the same arithmetic in any batch
                cols[r, 0] = (probe[r : r + 1] - prev).abs().sum(dtype=torch.float64)
                cols[r, 1] = prev.abs().sum(dtype=torch.float64)
        if auto:
            half = batch // 2
            for r in range(half):
                cols[r, 2] = 0.0 if torch.equal(img[r], img[r + half]) else 1.0
        sums = self.sync.sum_partials(cols).tolist()
        groups = sample_groups(batch, pairs, [sums[r][2] == 0.0 for r in range(batch // 2)])
        indicators: list[float | None] = [None] * batch
        for rows in groups:
            if all(has[r] for r in rows):
                num = sum(sums[r][0] for r in rows)
                den = sum(sums[r][1] for r in rows)
                for r in rows:
                    indicators[r] = num / den if den > 0 else None
        return groups, indicators

    def _feasible(
        self, d: StepDecision, rows: list[int], caches: list[BranchCaches], img: torch.Tensor
    ) -> StepDecision:
        """Downgrade a decision the rows' caches cannot serve yet (as the whole-batch room does)."""
        kind = d.kind
        if kind != StepKind.FULL and not all(caches[r].can_reuse_stack(img[r : r + 1]) for r in rows):
            kind = StepKind.FULL
        if kind == StepKind.BLOCK and (not self.use_block or any(caches[r].block_mag is None for r in rows)):
            kind = StepKind.FULL
        if kind == StepKind.TOKEN:  # refused by the config; a schedule rescaled onto one is computed
            kind = StepKind.FULL
        if kind == d.kind:
            return d
        return replace(d, kind=kind, error=0.0, reason=d.reason + " -> full (no cache yet)")

    def _decide_here(
        self, step: int, caches: list[BranchCaches], img: torch.Tensor, probe: torch.Tensor | None
    ) -> SamplePlan:
        sync = self.sync
        groups, indicators = self._measure(img, probe, caches)
        sync.begin_decision()
        lead_ctl = self.controllers[0]
        forced = lead_ctl.forced_full(step)  # the step alone says it: the same for every sample
        proposals = []
        for rows in groups:
            ctl = self.controllers[rows[0]]
            proposal = ctl.propose(step, None if forced else indicators[rows[0]])
            proposals.append(self._feasible(proposal, rows, caches, img))
        if not forced and lead_ctl.wants_indicator:
            agreed = sync.agree([int(p.kind) for p in proposals], device=img.device)
            proposals = [
                p if a == int(p.kind) else replace(p, kind=StepKind(a), reason="agreed")
                for p, a in zip(proposals, agreed, strict=True)
            ]
        batch = img.shape[0]
        decisions: list[StepDecision | None] = [None] * batch
        for rows, proposal in zip(groups, proposals, strict=True):
            for r in rows:  # every row of a sample moves its state the same way
                d = self.controllers[r].commit(proposal)
                if d.indicator is None and indicators[r] is not None:
                    d = replace(d, indicator=indicators[r])
                decisions[r] = d
        masks = self._select_blocks(groups, decisions, caches, img.device)  # type: ignore[arg-type]
        return SamplePlan(groups, decisions, masks, caches, indicators)  # type: ignore[arg-type]

    def _select_blocks(
        self,
        groups: list[list[int]],
        decisions: list[StepDecision],
        caches: list[BranchCaches],
        device: torch.device,
    ) -> list[list[bool] | None]:
        """Each block-refresh sample's whole-depth mask, from its rows' block statistics: one
        reduction and one agreement for all of them."""
        masks: list[list[bool] | None] = [None] * len(decisions)
        block_groups = [rows for rows in groups if decisions[rows[0]].kind == StepKind.BLOCK]
        if not block_groups:
            return masks
        parts = []
        for rows in block_groups:
            mag = caches[rows[0]].block_mag
            assert mag is not None
            for r in rows[1:]:
                mag = mag + caches[r].block_mag  # type: ignore[operator]
            parts.append(mag)
        sums = self.sync.sum_block_partials(torch.stack(parts))
        layout = self.room.layout
        flat = [int(c) for s in sums for c in depth_mask(self.config, layout, s)]
        agreed = self.sync.agree(flat, device=device)
        n = layout.total_blocks
        for i, rows in enumerate(block_groups):
            mask = [bool(c) for c in agreed[i * n : (i + 1) * n]]
            for r in rows:
                masks[r] = mask
        return masks

    def _follow(self, lead: SamplePlan, caches: list[BranchCaches], img: torch.Tensor) -> SamplePlan:
        """A later guidance branch of the step: each row follows its row of the step's first
        branch, as far as this branch's own caches can."""
        decisions = []
        masks: list[list[bool] | None] = []
        for r, d in enumerate(lead.decisions):
            d = self._feasible(d, [r], caches, img)
            decisions.append(d)
            masks.append(lead.masks[r] if d.kind == StepKind.BLOCK else None)
        return SamplePlan(lead.groups, decisions, masks, caches, list(lead.indicators))
