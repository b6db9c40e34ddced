"""Observers watch the engine's events; they never steer it.

The engine emits: a run starts, a call starts, a block is about to run (an observer may wrap the
call, e.g. to count its FLOPs, but must return the block's own output), a stack residual was
computed, a call ended (with its :class:`~xslim_xdit.stats.StepRecord`). Three observers ship:

* :class:`FlopMeter` fills each record's FLOPs (measured once per call shape);
* :class:`~xslim_xdit.stats.CacheStatistics` keeps the records (``engine.statistics``);
* :class:`ProfileRecorder` keeps the per-step measurements that calibration plans from.

Example:
    >>> import torch
    >>> from xslim_xdit import XSlimConfig, enable_xslim, disable_xslim
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> recorder = ProfileRecorder()
    >>> engine = enable_xslim(m, XSlimConfig(), num_inference_steps=4, observers=[recorder], record=True)
    >>> _ = sample(m, "dit", steps=4)
    >>> [p["kind"] for p in recorder.profile]
    ['full', 'full', 'full', 'full']
    >>> disable_xslim(m)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from .controller import StepKind
from .flops import counter

if TYPE_CHECKING:
    from .caches import BranchCaches
    from .engine import XSlimEngine
    from .stats import StepRecord


class EngineObserver:
    """Base class: every event is a no-op."""

    def on_run_start(self, engine: XSlimEngine, num_steps: int) -> None:
        """A denoising run of ``num_steps`` transformer steps starts (caches are empty)."""

    def on_call_start(self, engine: XSlimEngine, key: Hashable) -> None:
        """A transformer call starts; ``key`` identifies its input shapes."""

    def around_block(self, engine: XSlimEngine, key: Hashable, run: Callable[[], Any]) -> Any:
        """Run one block (``run()``) and return its output unchanged."""
        return run()

    def on_stack_residual(self, engine: XSlimEngine, caches: BranchCaches, residual: torch.Tensor) -> None:
        """The call's stack residual (output minus input of the managed blocks) is known; the
        caches still hold the previous one."""

    def on_call_end(self, engine: XSlimEngine, record: StepRecord) -> None:
        """A call ended; ``record`` says what it did (observers earlier in the list may fill in
        their fields, e.g. FLOPs)."""


class FlopMeter(EngineObserver):
    """FLOPs per call, counted with ``FlopCounterMode`` once per distinct shape: a full call of
    each input shape is counted whole (blocks and the rest of the model), and each block once per
    input shape; a cached call's FLOPs are its computed blocks' plus the rest of the model.
    Calls through ``torch.compile`` are not counted (their records say 0).

    Example:
        >>> meter = FlopMeter()
        >>> lin = torch.nn.Linear(4, 3, bias=False)
        >>> meter.measure(("lin", 2), lambda: lin(torch.ones(2, 4)))[0]
        48
    """

    def __init__(self) -> None:
        self.cache: dict[Hashable, int] = {}
        self._whole: tuple[Hashable, Any] | None = None
        self._key: Hashable = None
        self._call_flops = 0
        self._full_block_flops: dict[Hashable, dict[int, int]] = {}
        self.active = True

    def measure(self, key: Hashable, run: Callable[[], Any]) -> tuple[int, Any]:
        """``run()``'s output and its FLOPs (counted the first time ``key`` is seen)."""
        if key in self.cache:
            return self.cache[key], run()
        with counter() as mode:
            out = run()
        self.cache[key] = int(mode.get_total_flops())
        return self.cache[key], out

    def on_run_start(self, engine: XSlimEngine, num_steps: int) -> None:
        self.abandon()  # a count still open here belongs to a call that never ended

    def on_call_start(self, engine: XSlimEngine, key: Hashable) -> None:
        self.abandon()  # a count still open here belongs to a call that never ended
        self._key, self._call_flops = key, 0
        self.active = not (_called_through_compile() or engine.regions.compiles())
        if key not in self.cache and self.active:
            self._whole = (key, counter())
            self._whole[1].__enter__()

    def around_block(self, engine: XSlimEngine, key: Hashable, run: Callable[[], Any]) -> Any:
        if not self.active:
            return run()
        flops, out = self.measure(key, run)
        self._call_flops += flops
        g, full_rows = key[1], key[-1]  # type: ignore[index]
        if full_rows:
            self._full_block_flops.setdefault(self._key, {})[g] = flops
        return out

    def on_call_end(self, engine: XSlimEngine, record: StepRecord) -> None:
        self._finish_whole()
        if not self.active:  # a compiled call: its FLOPs are not observable op by op
            return
        full = self.cache.get(self._key, 0)
        nonblock = max(0, full - sum(self._full_block_flops.get(self._key, {}).values()))
        record.flops = (self._call_flops + nonblock) if full else 0
        record.flops_full = full

    def _finish_whole(self) -> None:
        if self._whole is not None:
            key, mode = self._whole
            self._whole = None
            mode.__exit__(None, None, None)
            self.cache[key] = int(mode.get_total_flops())

    def abandon(self) -> None:
        """Stop a count left open by a call that raised (or was interrupted) and forget it: the
        ``FlopCounterMode`` leaves torch's dispatch stack, and a partial count is never taken for
        the whole call's."""
        if self._whole is not None:
            mode = self._whole[1]
            self._whole = None
            mode.__exit__(None, None, None)

    def close(self) -> None:
        """Stop a count left open by a call that raised."""
        self.abandon()


def _called_through_compile() -> bool:
    """The transformer runs under ``torch.compile``: a dispatch mode such as ``FlopCounterMode``
    would keep dynamo from compiling its forward at all, so FLOPs are counted on eager calls only."""
    from torch._dynamo import eval_frame

    probe = getattr(eval_frame, "_is_in_optimized_module", None)
    return bool(probe()) if callable(probe) else False


class ProfileRecorder(EngineObserver):
    """Per-step measurements of a run for calibration (first guidance branch only): the step
    kind, the probe change, the relative change of the stack residual, the per-block residual
    magnitudes of full steps, and one row of the Gram matrix of the stack residuals (a strided
    subsample of at most ``max_elements`` elements per step and rank, float32; see
    :mod:`xslim_xdit.planner`).

    During the run each rank keeps only its own partial sums (no collective inside the
    forward); :meth:`finish`, called on every rank after the run, reduces them exactly (the same
    bytes on every rank): PipeFusion stages' residual pieces are gathered and added in stage order
    (:meth:`~xslim_xdit.parallel.DecisionSync.gather_stages`), then sequence shards and CFG branches
    add their partial sums in rank order (:meth:`~xslim_xdit.parallel.DecisionSync.sum_exact`).
    On one device :attr:`profile` finishes by itself.

    ``profile`` holds the last run's rows (a new run clears it).
    """

    def __init__(self, max_elements: int = 1 << 20) -> None:
        self.max_elements = max_elements
        self._reset()

    def _reset(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._vectors: list[torch.Tensor] = []
        self._changes: list[torch.Tensor | None] = []  # local [sum|r - r_prev|, sum|r_prev|]
        self._blocks: list[torch.Tensor | None] = []  # local (blocks, 2) [sum|out - in|, count]
        self._sync: Any = None
        self._block_offset = 0
        self._total_blocks = 0
        self._profile: list[dict[str, Any]] | None = []

    def on_run_start(self, engine: XSlimEngine, num_steps: int) -> None:
        self._reset()

    def on_stack_residual(self, engine: XSlimEngine, caches: BranchCaches, residual: torch.Tensor) -> None:
        if engine.branch != 0 or engine.plan is None:
            return
        self._sync = engine.sync
        self._block_offset = engine.block_offset
        self._total_blocks = engine.room.layout.total_blocks
        prev = caches.residual
        change = None
        if prev is not None and prev.shape == residual.shape:
            change = torch.stack(
                [(residual - prev).abs().sum(dtype=torch.float64), prev.abs().sum(dtype=torch.float64)]
            ).cpu()
        self._changes.append(change)
        decision = engine.plan.decision
        full = caches.block_mag is not None and decision.kind == StepKind.FULL
        self._blocks.append(caches.block_mag.detach().to(torch.float64).cpu().clone() if full else None)  # type: ignore[union-attr]
        flat = residual.reshape(-1)
        stride = max(1, -(-flat.numel() // self.max_elements))
        self._vectors.append(flat[::stride].to(torch.float32, copy=True))
        self._rows.append(
            {"step": engine.step, "kind": decision.kind.name.lower(), "probe_change": decision.indicator}
        )
        self._profile = None

    @property
    def profile(self) -> list[dict[str, Any]]:
        """The rows of the last run: ``step``, ``kind``, ``probe_change``, ``residual_change``,
        ``block_magnitudes``, ``gram_row``. Across ranks, call :meth:`finish` on every rank first."""
        if self._profile is None:
            if self._sync is not None and self._sync.is_distributed:
                raise RuntimeError(
                    "ProfileRecorder.profile under several ranks: call recorder.finish() on every rank "
                    "after the run (it reduces the ranks' partial sums, collectively)"
                )
            self.finish()
        return self._profile  # type: ignore[return-value]

    def finish(self) -> list[dict[str, Any]]:
        """Reduce the run's partial sums over the ranks (collective: every rank that ran calls it,
        after the run, outside the forward) and return :attr:`profile`, identical on every rank.

        Raises ``NotImplementedError`` under PipeFusion's asynchronous phase (patches: a step's
        residual is not one tensor any stage holds).
        """
        if self._profile is not None:
            return self._profile
        from .parallel.sync import LocalSync

        sync = self._sync or LocalSync()
        n = len(self._rows)
        if n == 0:
            self._profile = []
            return self._profile
        if len({v.numel() for v in self._vectors}) != 1:
            raise NotImplementedError(
                "calibration profile: the stack residual changed shape within the run (PipeFusion's "
                "asynchronous phase runs patches); calibrate with every step synchronous (xDiT's "
                "--warmup_steps >= num_inference_steps, or --num_pipeline_patch 1)"
            )
        total = self._total_blocks
        small = torch.zeros(n, 2 + 2 * total, dtype=torch.float64)
        for i, row in enumerate(self._rows):
            small[i, 0] = float("nan") if row["probe_change"] is None else float(row["probe_change"])
            b = self._blocks[i]
            if b is not None:
                small[i, 1] = 1.0
                lo = 2 + 2 * self._block_offset  # this rank's blocks in the whole depth (PipeFusion)
                small[i, lo : lo + b.numel()] = b.reshape(-1)
        vectors = torch.stack(self._vectors)
        stages_v = sync.gather_stages(vectors)
        stages_s = sync.gather_stages(small) if len(stages_v) > 1 else [small]
        residuals = stages_v[0].to(torch.float64)
        for v in stages_v[1:]:  # the stages' pieces of the stack residual, added in stage order
            residuals = residuals + v.to(residuals.device, torch.float64)
        first = stages_s[0].cpu()
        blocks = first[:, 2:].clone()
        for s in stages_s[1:]:  # each stage filled only its own blocks: the rest is zero
            blocks = blocks + s[:, 2:].cpu()
        if len(stages_v) > 1:
            # the whole residual exists only as the stages' sum: its change from the subsample
            changes: list[torch.Tensor | None] = [None] + [
                torch.stack(
                    [(residuals[i] - residuals[i - 1]).abs().sum(), residuals[i - 1].abs().sum()]
                ).cpu()
                for i in range(1, n)
            ]
        else:
            changes = list(self._changes)
        tri = torch.tril_indices(n, n)
        gram = (residuals @ residuals.T).cpu()
        change_part = torch.stack(
            [c if c is not None else torch.zeros(2, dtype=torch.float64) for c in changes]
        )
        packed = torch.cat([gram[tri[0], tri[1]], change_part.reshape(-1), blocks.reshape(-1)])
        sums = sync.sum_exact(packed).cpu()
        k = tri.shape[1]
        gram_sums = torch.zeros(n, n, dtype=torch.float64)
        gram_sums[tri[0], tri[1]] = sums[:k]
        change_sums = sums[k : k + 2 * n].reshape(n, 2)
        block_sums = sums[k + 2 * n :].reshape(n, total, 2)
        profile = []
        for i, row in enumerate(self._rows):
            probe = float(first[i, 0])  # the first stage's: later stages receive their decisions
            c = change_sums[i]
            profile.append(
                {
                    "step": row["step"],
                    "kind": row["kind"],
                    "probe_change": None if probe != probe else probe,
                    "residual_change": float(c[0] / c[1])
                    if changes[i] is not None and float(c[1]) > 0
                    else None,
                    "block_magnitudes": (block_sums[i, :, 0] / block_sums[i, :, 1].clamp_min(1)).tolist()
                    if float(first[i, 1])
                    else None,
                    "gram_row": gram_sums[i, : i + 1].tolist(),
                }
            )
        self._profile = profile
        return profile
