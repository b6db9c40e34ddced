"""Runs the blocks of one transformer call as its plan says, and keeps the branch's caches current.

Per plan kind, each block hook call:

* SKIP: the first managed block applies the cached stack residual (moved along its slope) to
  the stack input (and, for a family whose output reads the text stream, LTX-2's audio, that
  stream's own stack residual to it); the other blocks pass their inputs through;
* BLOCK: the selected blocks run, the others add their own cached residual (moved along their
  slopes);
* TOKEN: every block runs on the selected image tokens (and all text tokens), with attention
  against the K/V cache; the last block fills the other tokens from the cached stack residual;
* FULL: every block runs, and every cache the enabled levels need is refreshed.

Example:
    >>> from xslim_xdit import XSlimConfig, enable_xslim, disable_xslim
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> engine = enable_xslim(m, XSlimConfig(warmup_steps=1, warn=0.5, crit=0.9), num_inference_steps=4)
    >>> _ = sample(m, "dit", steps=4)
    >>> engine.statistics.summary()["kinds"]
    ['full', 'skip', 'skip', 'full']
    >>> disable_xslim(m)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters.attention import gather_rows, splice
from .adapters.base import BlockCall
from .caches import BranchCaches
from .controller import StepKind
from .decision import CallPlan, image_block_partials
from .hooks import call_with_weights_placed
from .stats import StepRecord

if TYPE_CHECKING:
    from .engine import XSlimEngine


@dataclass
class CallTally:
    """What the current call really computed (for its statistics record)."""

    rows_full: int
    blocks_computed: int = 0
    tokens_computed: int = 0
    seg_in: torch.Tensor | None = None  # input of the managed blocks (the stack residual's base)
    seg_in_txt: torch.Tensor | None = None  # the same for the text stream
    last_out: torch.Tensor | None = None  # the image stream the previous managed block returned
    # What the model added to the image stream between blocks during this call (ControlNet
    # residuals, VACE-style hints): it is not the blocks' work, so it stays out of the cached
    # stack residual, which then means the same on the steps that reuse it (the model adds this
    # step's additions again around the reused residual).
    between: torch.Tensor | None = None
    probe_out: Any = None  # block 0's output when it ran as the probe


class PlanExecutor:
    """The block-level half of :class:`~xslim_xdit.engine.XSlimEngine`: the block hook (block 0's
    decision point, then what each block call does under the call's
    :class:`~xslim_xdit.decision.CallPlan`), and the call's statistics record."""

    def __init__(self, engine: XSlimEngine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ the block hook
    def block_hook(self, g: int, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """What every managed block runs instead of its forward (:class:`~xslim_xdit.hooks.BlockHooks`)."""
        e = self.engine
        if not e._in_call:  # a block called outside the model's forward: run as it is
            return self._run_as_it_is(g, original, args, kwargs)
        si, blk = e.blocks[g]
        stack = e.stacks[si]
        call = e.adapter.parse_call(stack, e._sigs[si], args, kwargs)
        if e.token_ctx is not None:
            e.token_ctx.n_txt = call.txt.shape[1] if call.txt is not None else 0
        if g == 0:
            self.begin_call(blk, original, call)
        plan, tally = e.plan, e.tally
        if plan is None or tally is None:
            return self._run_as_it_is(g, original, args, kwargs)
        executor = e._sample_executor if e.sample_plan is not None else self
        try:
            return executor.run_block(g, original, call, plan, tally)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # KeyboardInterrupt: torch calls no post-hook then
                e._abandon_call()
            raise

    def _run_as_it_is(self, g: int, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Block ``g``'s own forward, nothing recorded (the K/V recorders let go of what they kept)."""
        e = self.engine
        try:
            return original(*args, **kwargs)
        finally:
            if e._token_attention is not None:
                e._token_attention.collect(e.blocks[g][1], record=False)

    def begin_call(self, blk0: nn.Module, original: Callable[..., Any], call: BlockCall) -> None:
        """Block 0's decision point: the step probe, then the call's plan (whole batch or per sample)."""
        e = self.engine
        if e._token_attention is not None:
            e._token_attention.refresh()  # a LoRA loaded or a processor set since the last call
        caches = e.current_caches()
        if e.token_ctx is not None:
            e.token_ctx.branch = e.branch
        img = call.img
        e.tally = tally = CallTally(rows_full=img.shape[0] * img.shape[1])
        if e.seg_start:  # first_block_residual: block 0 runs every step, its residual is the probe
            tally.probe_out = self.run_original(0, original, call, img, call.txt)
            tally.blocks_computed, tally.tokens_computed = 1, tally.rows_full
            probe: torch.Tensor | None = e.adapter.split_output(call.stack, tally.probe_out)[0] - img
        else:
            probe = self.probe(blk0, call) if e.room.wants_probe else None
        tick = time.perf_counter()
        if e.samples is not None:
            e.sample_plan = e.samples.decide(e.step, e.branch, img, probe)
            e.plan = e.sample_plan.summary()
        else:
            kv_ready = e.token_ctx is not None and e.token_ctx.has_kv(e.branch)
            e.plan = e.room.decide(
                e.step, e.branch, caches, img, probe, token_kv_ready=kv_ready, parts=e.image_parts()
            )
        e.statistics.bookkeeping_seconds += time.perf_counter() - tick

    def probe(self, blk0: nn.Module, call: BlockCall) -> torch.Tensor:
        """Block 0's modulated input, read inside the block's weight-placement hooks."""
        e = self.engine

        def probe(args: tuple, kwargs: dict) -> torch.Tensor:
            placed = (
                call
                if args is call.args and kwargs is call.kwargs
                else e.adapter.parse_call(call.stack, call.signature, args, kwargs)
            )
            return e.adapter.modulated_input(blk0, placed)

        return call_with_weights_placed(blk0, probe, call.args, call.kwargs)

    def record(self) -> StepRecord | None:
        """The finished call's statistics record (None when no plan ran: no call, or one that
        never reached block 0); the observers fill in its FLOPs."""
        e = self.engine
        plan, tally = e.plan, e.tally
        if plan is None or tally is None:
            return None
        d = plan.decision
        record = StepRecord(
            run=e.run_index,
            step=e.step,
            branch=e.branch,
            kind=d.kind.name.lower(),
            indicator=d.indicator,
            error=d.error,
            blocks_computed=tally.blocks_computed,
            blocks_total=len(e.blocks),  # on this rank (a pipeline stage holds a slice)
            tokens_computed=tally.tokens_computed,
            tokens_total=tally.rows_full * len(e.blocks),
            flops=0,
            flops_full=0,
            reason=d.reason,
            blocks_mask=[int(c) for c in plan.compute] if plan.compute is not None else None,
            token_count=plan.token_count,
        )
        if e.sample_plan is not None:
            e.sample_plan.annotate(record)
        return record

    # ------------------------------------------------------------------ a block under the plan
    def run_original(
        self,
        g: int,
        original: Callable[..., Any],
        call: BlockCall,
        img: torch.Tensor,
        txt: torch.Tensor | None,
    ) -> Any:
        e = self.engine
        args, kwargs = call.with_streams(img, txt)
        # compiled when the call is (the block's original forward, under the compile's callback)
        run = functools.partial(e.regions.call_block, g, original, *args, **kwargs)
        if e._block_wrappers:
            rows = img.shape[0] * img.shape[1]
            full = e.tally is not None and rows == e.tally.rows_full
            key = ("block", g, tuple(img.shape), None if txt is None else tuple(txt.shape), full)
            for obs in e._block_wrappers:
                run = functools.partial(obs.around_block, e, key, run)
        hooks, ctx = e._token_attention, e.token_ctx
        if hooks is None or ctx is None:
            return run()
        try:
            return run()
        finally:
            # the K/V recorders kept this block's keys and values: filed on a recording call
            # (here, outside the compiled block, so no recording flag guards its graph)
            hooks.collect(e.blocks[g][1], record=ctx.record and ctx.index is None)

    def run_block(
        self, g: int, original: Callable[..., Any], call: BlockCall, plan: CallPlan, tally: CallTally
    ) -> Any:
        """One block call under ``plan``; returns what the block returns."""
        e = self.engine
        stack = call.stack
        if g < e.seg_start:
            return tally.probe_out
        if g == e.seg_start:
            tally.seg_in, tally.seg_in_txt = call.img, call.txt
        kind = plan.kind
        if kind == StepKind.SKIP:  # no residual is recorded: what the model adds needs no bookkeeping
            if g != e.seg_start:
                return e.adapter.make_output(stack, call.img, call.txt)
            caches = e.current_caches()
            txt = call.txt
            if e.adapter.text_output_used and txt is not None:
                # the model's output reads this stream too (LTX-2's audio): it gets its own stack residual
                d_txt = caches.text_stack_estimate(e.step)
                if d_txt is None or d_txt.shape != txt.shape:
                    raise RuntimeError("skip step without a cached text-stream residual of this shape")
                txt = txt + d_txt
            return e.adapter.make_output(stack, call.img + caches.stack_estimate(e.step), txt)
        if g > e.seg_start:
            _note_between(tally, call.img)
        last = g == len(e.blocks) - 1
        caches = e.current_caches()
        if kind == StepKind.TOKEN:
            return self._token_block(g, original, call, caches, last)
        if kind == StepKind.BLOCK and plan.compute is not None and not plan.compute[g + e.block_offset]:
            d_img, d_txt = caches.block_estimate(g, e.step)
            txt = call.txt + d_txt if (call.txt is not None and d_txt is not None) else call.txt
            out_img = tally.last_out = call.img + d_img
            if last:
                self._finish_stack(caches, out_img, kind, txt)
            return e.adapter.make_output(stack, out_img, txt)
        # FULL, or a block that a BLOCK step computes
        recording_kv = e.token_ctx is not None and kind == StepKind.FULL
        if recording_kv:
            e.token_ctx.record = True  # type: ignore[union-attr]
        try:
            out = self.run_original(g, original, call, call.img, call.txt)
        finally:
            if recording_kv:
                e.token_ctx.record = False  # type: ignore[union-attr]
        tally.blocks_computed += 1
        tally.tokens_computed += call.img.shape[0] * call.img.shape[1]
        out_img, out_txt = e.adapter.split_output(stack, out)
        tally.last_out = out_img
        if e.use_block:
            d_txt = out_txt - call.txt if (out_txt is not None and call.txt is not None) else None
            caches.record_block(g, out_img - call.img, d_txt, e.step)
            if kind == StepKind.FULL:
                caches.record_block_magnitude(g, len(e.blocks), out_img, call.img)
        if last:
            self._finish_stack(caches, out_img, kind, out_txt)
            parts = e.image_parts()
            # after the image's last part (PipeFusion's last patch; the only call otherwise): the
            # statistics of the whole image, as the first stage sums its own over the patches
            if (
                e.use_block
                and kind == StepKind.FULL
                and e.branch == max(1, len(parts)) - 1
                and e.step < (e.num_steps or 0) - 1
                and caches.block_mag is not None
            ):
                e.sync.publish_block_statistics(image_block_partials(caches, parts))
        return out

    def _token_block(
        self, g: int, original: Callable[..., Any], call: BlockCall, caches: BranchCaches, last: bool
    ) -> Any:
        e = self.engine
        plan, tally, ctx = e.plan, e.tally, e.token_ctx
        assert plan is not None and tally is not None and ctx is not None and plan.token_index is not None
        idx, flat = plan.token_index, plan.token_flat
        sel = gather_rows(call.img, idx, flat)
        block = e.blocks[g][1]
        hooks = e._token_attention
        if hooks is not None:  # each token processor gets its K/V pair here, outside the compiled block
            hooks.stage(block, ctx.branch)
        ctx.index, ctx.flat = idx, flat
        try:
            out = self.run_original(g, original, call, sel, call.txt)
        finally:
            ctx.index = ctx.flat = None
            if hooks is not None:
                hooks.unstage(block)
        tally.blocks_computed += 1
        tally.tokens_computed += sel.shape[0] * sel.shape[1]
        out_sel, out_txt = e.adapter.split_output(call.stack, out)
        if last:
            assert tally.seg_in is not None
            # the tokens not refreshed: the stack input, what the model added between blocks this
            # step, and the blocks' cached residual
            base = tally.seg_in if tally.between is None else tally.seg_in + tally.between
            img = splice(base + caches.stack_estimate(e.step), idx, out_sel, flat)
            self._finish_stack(caches, img, StepKind.TOKEN, out_txt)
        else:
            img = splice(call.img, idx, out_sel, flat)
        tally.last_out = img
        return e.adapter.make_output(call.stack, img, out_txt)

    def _finish_stack(
        self, caches: BranchCaches, out_img: torch.Tensor, kind: StepKind, out_txt: torch.Tensor | None = None
    ) -> None:
        e = self.engine
        tally, plan = e.tally, e.plan
        assert tally is not None and tally.seg_in is not None and plan is not None
        res = out_img - tally.seg_in
        if tally.between is not None:
            res = res - tally.between
        res = res.detach()
        for obs in e.observers:
            obs.on_stack_residual(e, caches, res)
        if e.use_token:
            if kind == StepKind.TOKEN:
                caches.shift_token_history(plan.token_index, plan.token_flat)
            else:
                caches.shift_token_history()
        exact = kind == StepKind.FULL and e.config.extrapolate == "linear"
        text_res = None
        if e.adapter.text_output_used and out_txt is not None and tally.seg_in_txt is not None:
            text_res = (out_txt - tally.seg_in_txt).detach()
        caches.record_stack(res, e.step, exact=exact, text_res=text_res)


def _note_between(tally: CallTally, img: torch.Tensor) -> None:
    """Add what the model changed in the image stream since the previous block returned it."""
    prev = tally.last_out
    if prev is None or img is prev or img.shape != prev.shape:
        return
    added = img - prev
    tally.between = added if tally.between is None else tally.between + added
