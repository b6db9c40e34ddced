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
        self.active = not _called_through_compile()
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
    subsample of at most ``max_elements`` elements per step, float32; see
    :mod:`xslim_xdit.planner`). Sums are reduced over the ranks, so sequence shards add up.

    ``profile`` holds the last run's rows (a new run clears it).
    """

    def __init__(self, max_elements: int = 1 << 20) -> None:
        self.max_elements = max_elements
        self.profile: list[dict[str, Any]] = []
        self._vectors: list[torch.Tensor] = []

    def on_run_start(self, engine: XSlimEngine, num_steps: int) -> None:
        self.profile = []
        self._vectors = []

    def on_stack_residual(self, engine: XSlimEngine, caches: BranchCaches, residual: torch.Tensor) -> None:
        if engine.branch != 0 or engine.plan is None:
            return
        sync = engine.sync
        prev = caches.residual
        change = None
        if prev is not None and prev.shape == residual.shape:
            sums = sync.sum_partials(
                torch.stack(
                    [
                        (residual - prev).abs().sum(dtype=torch.float64),
                        prev.abs().sum(dtype=torch.float64),
                    ]
                )
            )
            change = float(sums[0] / sums[1]) if float(sums[1]) > 0 else None
        decision = engine.plan.decision
        mags = None
        if caches.block_mag is not None and decision.kind == StepKind.FULL:
            s = sync.sum_block_partials(caches.block_mag.clone())
            mags = (s[:, 0] / s[:, 1].clamp_min(1)).tolist()
        self.profile.append(
            {
                "step": engine.step,
                "kind": decision.kind.name.lower(),
                "probe_change": decision.indicator,
                "residual_change": change,
                "block_magnitudes": mags,
                "gram_row": self._gram_row(sync, residual),
            }
        )

    def _gram_row(self, sync: Any, residual: torch.Tensor) -> list[float]:
        """Inner products of this step's stack residual with every earlier profiled one (and
        itself), over a strided subsample, summed over ranks (sums over tokens, so
        sequence-parallel shards add up exactly)."""
        flat = residual.reshape(-1)
        stride = max(1, -(-flat.numel() // self.max_elements))
        vec = flat[::stride].to(torch.float32, copy=True)  # kept for the later rows
        self._vectors.append(vec)
        v64 = vec.double()
        dots = torch.stack([torch.dot(v64, v.double()) for v in self._vectors])
        return sync.sum_partials(dots).tolist()
