"""The block-level half of per-sample decisions (``XSlimConfig(per_sample=True)``): in each block,
the rows that compute it (full samples, and block-refresh samples whose block set holds it) run as
one sub-batch (:meth:`~xslim_xdit.adapters.ModelAdapter.select_samples` indexes the streams and
every per-sample argument); the others reuse their cached residual; the rows are put back in batch
order. When every row computes, the block runs on the batch as it is. The decisions themselves
(one :class:`~xslim_xdit.batch.SamplePlan` per call) come from :class:`~xslim_xdit.batch.SampleRoom`.

Example:
    >>> import torch
    >>> from xslim_xdit import XSlimConfig, enable_xslim, disable_xslim
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> cfg = XSlimConfig(warmup_steps=1, warn=0.5, crit=0.9, per_sample=True, guidance_pairs="none")
    >>> engine = enable_xslim(m, cfg, num_inference_steps=4)
    >>> type(engine._sample_executor).__name__
    'SampleExecutor'
    >>> disable_xslim(m)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .adapters.base import BlockCall
from .controller import StepKind
from .decision import CallPlan
from .executor import CallTally, _note_between

if TYPE_CHECKING:
    from .batch import SamplePlan
    from .engine import XSlimEngine


class SampleExecutor:
    """The block-level half of per-sample decisions: what a block call does for each row under
    the call's :class:`~xslim_xdit.batch.SamplePlan` (the whole-batch path is
    :class:`~xslim_xdit.executor.PlanExecutor`)."""

    def __init__(self, engine: XSlimEngine, run_original: Callable[..., Any]) -> None:
        self.engine = engine
        self.run_original = run_original

    def run_block(
        self, g: int, original: Callable[..., Any], call: BlockCall, plan: CallPlan, tally: CallTally
    ) -> Any:
        e = self.engine
        sp = e.sample_plan
        assert sp is not None
        if g < e.seg_start:
            return tally.probe_out
        if g == e.seg_start:
            tally.seg_in = call.img
        else:
            _note_between(tally, call.img)
        img, txt, stack = call.img, call.txt, call.stack
        batch = img.shape[0]
        rows = sp.computes(g + e.block_offset)
        last = g == len(e.blocks) - 1
        out: Any = None
        c_img = c_txt = None
        if len(rows) == batch:  # every row computes: the batch as it is
            out = self.run_original(g, original, call, img, txt)
            c_img, c_txt = e.adapter.split_output(stack, out)
            c_in, t_in = img, txt
        elif rows:
            sub = e.adapter.select_samples(call, sp.index(rows, img.device))
            c_img, c_txt = e.adapter.split_output(
                stack, self.run_original(g, original, sub, sub.img, sub.txt)
            )
            c_in, t_in = sub.img, sub.txt
        if c_img is not None:
            tally.blocks_computed += 1
            tally.tokens_computed += len(rows) * img.shape[1]
            if e.use_block:
                d_img = c_img - c_in
                d_txt = c_txt - t_in if (c_txt is not None and t_in is not None) else None
                for j, r in enumerate(rows):
                    cache = sp.caches[r]
                    cache.record_block(
                        g, d_img[j : j + 1], None if d_txt is None else d_txt[j : j + 1], e.step
                    )
                    if sp.decisions[r].kind == StepKind.FULL:
                        cache.record_block_magnitude(g, len(e.blocks), c_img[j : j + 1], c_in[j : j + 1])
        if out is None:
            out_img, out_txt = self._assemble(g, rows, img, txt, c_img, c_txt, sp)
            out = e.adapter.make_output(stack, out_img, out_txt)
        else:
            out_img = c_img
        tally.last_out = out_img
        if last:
            self._finish(out_img, sp, tally)
        return out

    def _assemble(
        self,
        g: int,
        rows: list[int],
        img: torch.Tensor,
        txt: torch.Tensor | None,
        c_img: torch.Tensor | None,
        c_txt: torch.Tensor | None,
        sp: SamplePlan,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output streams in batch order: the computed rows from the sub-batch, the
        others from their caches (a skipped row gets its stack residual at the first managed
        block and passes through the others)."""
        e = self.engine
        where = {r: j for j, r in enumerate(rows)}
        imgs, txts = [], []
        for r in range(img.shape[0]):
            t_r = None if txt is None else txt[r : r + 1]
            if r in where:
                j = where[r]
                assert c_img is not None
                imgs.append(c_img[j : j + 1])
                txts.append(c_txt[j : j + 1] if c_txt is not None else t_r)
                continue
            kind, cache = sp.decisions[r].kind, sp.caches[r]
            i_r = img[r : r + 1]
            if kind == StepKind.SKIP:
                imgs.append(i_r + cache.stack_estimate(e.step) if g == e.seg_start else i_r)
                txts.append(t_r)
            else:  # a block-refresh row that reuses this block
                d_img, d_txt = cache.block_estimate(g, e.step)
                imgs.append(i_r + d_img)
                txts.append(t_r + d_txt if (t_r is not None and d_txt is not None) else t_r)
        out_txt = None if txt is None else torch.cat(txts)  # type: ignore[arg-type]
        return torch.cat(imgs), out_txt

    def _finish(self, out_img: torch.Tensor, sp: SamplePlan, tally: CallTally) -> None:
        """After the last block: each row that computed anything records its stack residual."""
        e = self.engine
        assert tally.seg_in is not None
        res = out_img - tally.seg_in
        if tally.between is not None:
            res = res - tally.between
        res = res.detach()
        exact_ok = e.config.extrapolate == "linear"
        for r, d in enumerate(sp.decisions):
            if d.kind != StepKind.SKIP:
                sp.caches[r].record_stack(res[r : r + 1], e.step, exact=exact_ok and d.kind == StepKind.FULL)
