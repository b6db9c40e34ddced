"""The X-Slim engine: runs each transformer call as its decision says and owns the caches.

It attaches to a transformer without changing its code or its weights: each block's
``forward`` is wrapped (and restored by :meth:`XSlimEngine.detach`), and token refresh swaps in
attention processors that delegate to the originals whenever no refresh is active. The model's
own forward keeps running its embeddings, its block loop and its output layers.

Per call the engine:

* at the first block, computes the step indicator (block 0's modulated input, or block 0's
  residual), reduces its partial sums through the :class:`~xslim_xdit.parallel.DecisionSync`,
  asks the pure controller for a decision, and has the ranks agree on it as integers;
* SKIP: applies the cached stack residual to the current stack input; the other blocks pass
  their inputs through;
* BLOCK: runs the selected blocks, the others add their cached residual;
* TOKEN: gathers the selected image tokens, runs every block on them (and on all text tokens)
  with attention against the K/V cache, and fills the other tokens with the cached residual;
* FULL: runs everything and refreshes every cache the enabled levels need.

Example:
    >>> import torch
    >>> from diffusers import DiTTransformer2DModel
    >>> from xslim_xdit import XSlimConfig
    >>> m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...     out_channels=4, num_layers=2, sample_size=8, num_embeds_ada_norm=10).eval()
    >>> engine = XSlimEngine(m, XSlimConfig(warmup_steps=1), num_inference_steps=3).attach()
    >>> with torch.no_grad():
    ...     for t in (900, 500, 100):
    ...         _ = m(torch.randn(1, 4, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
    >>> engine.statistics.summary()["steps"]
    3
    >>> engine.detach()
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters.attention import TokenContext, flat_rows, gather_rows, install_kv_recorders, splice
from .adapters.base import BlockCall, BlockStack, ModelAdapter, adapter_for
from .config import XSlimConfig
from .controller import (
    OnlineController,
    StepDecision,
    StepKind,
    make_controller,
    select_blocks,
    tokens_per_group,
)
from .flops import FlopMeter, counter
from .parallel.sync import DecisionSync, LocalSync
from .stats import CacheStatistics, StepRecord


class XSlimRuntimeError(RuntimeError):
    """The engine was used in a way it cannot serve (the message says what to do)."""


@dataclass
class BranchState:
    """Caches of one guidance branch (a pipeline that calls the transformer once per branch and
    step has one per branch; a pipeline that batches the branches has one)."""

    probe_prev: torch.Tensor | None = None
    res_stack: torch.Tensor | None = None  # latest stack residual O - I (skip / token fill)
    res_prev: torch.Tensor | None = None  # the one before (token indicator / extrapolation)
    res_step: int = -1  # step that produced res_stack
    # linear extrapolation (extrapolate="linear"): the last exactly computed stack residual
    # (full step), its step, and the per-step slope between the last two of them
    exact_res: torch.Tensor | None = None
    exact_step: int = -1
    slope: torch.Tensor | None = None
    block_res: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # per block: the step that computed block_res, and (extrapolate="linear") the per-step slope
    # of its residuals between the last two times it ran, so that a reused block moves along
    # its slope as a skipped stack does (a block step would otherwise be staler than a skip)
    block_step: dict[int, int] = field(default_factory=dict)
    block_slope: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    block_mag: torch.Tensor | None = None  # (blocks, 2) partial sums: sum|out-in|, count


@dataclass
class CallPlan:
    """What the current call does, fixed at the first block."""

    decision: StepDecision
    compute: list[bool] | None = None  # whole-depth mask (global block indices), BLOCK steps
    token_index: torch.Tensor | None = None  # (B, k) image-token positions, TOKEN steps
    token_flat: torch.Tensor | None = None  # flat_rows(token_index, N), shared by every block
    token_count: int = 0
    seg_in: torch.Tensor | None = None
    blocks_computed: int = 0
    tokens_computed: int = 0
    flops: int = 0
    probe_out: Any = None  # block 0's output when it ran as the probe
    rows_full: int = 0


class XSlimEngine:
    """Attach X-Slim to one transformer.

    Args:
        model: a supported transformer (see :func:`~xslim_xdit.adapters.adapter_for`).
        config: the :class:`~xslim_xdit.config.XSlimConfig`.
        adapter: override the adapter found from the model class.
        sync: where ranks agree (default: :class:`~xslim_xdit.parallel.LocalSync`, no collectives).
        num_inference_steps: steps per run, if no pipeline scheduler tells the engine (see
            :meth:`start_run`).
        count_flops: measure FLOPs (once per call shape) for the statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        config: XSlimConfig,
        adapter: ModelAdapter | None = None,
        sync: DecisionSync | None = None,
        num_inference_steps: int | None = None,
        count_flops: bool = True,
    ) -> None:
        if not isinstance(config, XSlimConfig):
            raise TypeError(f"config must be an XSlimConfig; got {type(config).__name__}")
        if num_inference_steps is not None and (
            not isinstance(num_inference_steps, int) or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
        self.model = model
        self.config = config
        self.adapter = adapter or adapter_for(model)
        self.sync = sync or LocalSync()
        self.stacks: list[BlockStack] = self.adapter.stacks(model)
        self.blocks: list[tuple[int, nn.Module]] = [
            (si, blk) for si, st in enumerate(self.stacks) for blk in st.blocks
        ]
        if not self.blocks:
            raise XSlimRuntimeError("model has no transformer blocks")
        levels = config.levels
        self.use_block = "block" in levels
        self.use_token = "token" in levels
        self.seg_start = 1 if config.step_indicator == "first_block_residual" else 0
        self.default_steps = num_inference_steps
        #: how many sequence-parallel shards the image tokens are split into (set by the xDiT
        #: integration); statistics report global token counts
        self.sequence_shards = 1
        # Whole-depth view (differs from the local blocks under PipeFusion, see set_pipeline):
        # first global index of the local blocks, and each stack's global [start, end).
        self.block_offset = 0
        self.global_stacks: list[tuple[int, int]] = []
        start = 0
        for st in self.stacks:
            self.global_stacks.append((start, start + len(st.blocks)))
            start += len(st.blocks)
        self.total_blocks = start
        self.pipeline: Any = None
        self._remote_mag: list[torch.Tensor] = []
        self._stats_due = False
        self.count_flops = count_flops
        self.statistics = CacheStatistics()
        self.token_ctx = TokenContext() if self.use_token else None
        self._meter = FlopMeter()
        self._orig_forward: dict[int, Any] = {}
        self._sigs: dict[int, inspect.Signature] = {}
        self._handles: list[Any] = []
        self._orig_processors: list[tuple[nn.Module, Any]] = []
        self._attached = False
        # run state
        self.run_index = -1
        self.num_steps: int | None = None
        self.controller: Any = None
        self.step = -1
        self.branch = 0
        self._last_t: float | None = None
        self.branches: dict[int, BranchState] = {}
        self.plan: CallPlan | None = None
        self._step_plan: CallPlan | None = None
        self._flop_mode: Any = None
        self._call_key: tuple = ()  # the current call's input shapes, set before the forward
        self._full_block_flops: dict[int, int] = {}
        #: per-step measurements of a run, filled when ``profiling`` is set (see calibration)
        self.profiling = False
        self.profile: list[dict[str, Any]] = []
        #: at most this many elements of each profiled stack residual (a strided subsample) go
        #: into the profile's Gram matrix (see :mod:`xslim_xdit.planner`); kept as float32: 1M elements = 4 MB per step
        self.profile_max_elements = 1 << 20
        self._profile_vectors: list[torch.Tensor] = []

    def set_pipeline(self, channel: Any, global_stacks: list[tuple[int, int]]) -> None:
        """Run as one stage of a PipeFusion pipeline (see :mod:`xslim_xdit.parallel.pipeline`).

        ``global_stacks`` are the whole model's stacks as global ``[start, end)`` block ranges;
        the local blocks are ``channel.block_ranges[channel.stage]``.
        """
        if self.use_token:
            raise NotImplementedError(
                "token refresh under PipeFusion is not supported: xfuser's patch K/V buffers would be "
                "bypassed; use polish='block' or 'none' (or a schedule without token steps)"
            )
        first, n = channel.block_ranges[channel.stage]
        if n != len(self.blocks):
            raise XSlimRuntimeError(f"stage {channel.stage} holds {len(self.blocks)} blocks, expected {n}")
        self.pipeline = channel
        self.block_offset = first
        self.global_stacks = list(global_stacks)
        self.total_blocks = channel.total_blocks
        if first > 0:
            self.seg_start = 0  # the probe block lives on the first stage

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> XSlimEngine:
        """Wrap the blocks and hook the model; idempotent."""
        if self._attached:
            return self
        for g, (si, blk) in enumerate(self.blocks):
            self._orig_forward[g] = blk.forward
            self._sigs[si] = self._sigs.get(si) or inspect.signature(blk.forward)
            blk.forward = functools.partial(self._block_forward, g)
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(
            self.model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)
        )
        if self.token_ctx is not None:
            for si, blk in self.blocks:
                attn = self.adapter.self_attention(blk)
                self._handles.extend(
                    install_kv_recorders(attn, self.token_ctx, self.stacks[si].attn_text_position)
                )
                self._orig_processors.append((attn, attn.processor))
                attn.processor = self.adapter.token_processor(attn, self.stacks[si], self.token_ctx)
        self._attached = True
        return self

    def detach(self) -> None:
        """Restore the model exactly as it was."""
        if not self._attached:
            return
        for g, (_si, blk) in enumerate(self.blocks):
            if "forward" in blk.__dict__:
                del blk.forward
            self._orig_forward.pop(g, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn, proc in self._orig_processors:
            attn.processor = proc
        self._orig_processors.clear()
        self._end_flop_count()
        self.reset_state()
        self._attached = False

    # ------------------------------------------------------------------ runs
    def start_run(self, num_steps: int) -> None:
        """Begin a new denoising run of ``num_steps`` transformer steps: clears every cache."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_steps!r}")
        self.reset_state()
        self._profile_vectors = []
        self.run_index += 1
        self.num_steps = num_steps
        self.controller = make_controller(self.config, num_steps)

    def reset_state(self) -> None:
        self.num_steps = None
        self.controller = None
        self.step = -1
        self.branch = 0
        self._last_t = None
        self.branches.clear()
        self.plan = None
        self._step_plan = None
        self._remote_mag = []
        self._stats_due = False
        if self.token_ctx is not None:
            self.token_ctx.reset()

    # ------------------------------------------------------------------ model hooks
    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self.adapter.timestep(model, args, kwargs)
        same_step = self._step_plan is not None and t is not None and t == self._last_t
        if self.controller is not None and not same_step and self.step + 1 >= (self.num_steps or 0):
            # A new run on a bare transformer: the previous one used all its steps.
            self.controller = None
        if self.controller is None:
            steps = self.default_steps
            if steps is None:
                raise XSlimRuntimeError(
                    "num_inference_steps is unknown: enable X-Slim on the pipeline (its scheduler tells the "
                    "engine), or pass num_inference_steps= to enable_xslim / XSlimEngine, or call "
                    "engine.start_run(num_steps) before the first step"
                )
            self.start_run(steps)
            same_step = False
        if same_step:
            self.branch += 1
        else:
            self.step += 1
            self.branch = 0
            self._step_plan = None
        self._last_t = t
        self.plan = None
        self._call_key = ("forward", _shape_key(args, kwargs))
        if self.count_flops:
            key = self._call_key
            if key not in self._meter.cache:
                self._flop_mode = (key, counter())
                self._flop_mode[1].__enter__()

    def _post_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._end_flop_count()
        plan = self.plan
        if plan is None:
            return
        rows_full = plan.rows_full
        full_flops = self._meter.cache.get(self._call_key, 0)
        nonblock = max(0, full_flops - sum(self._full_block_flops.values()))
        d = plan.decision
        self.statistics.add(
            StepRecord(
                run=self.run_index,
                step=self.step,
                branch=self.branch,
                kind=d.kind.name.lower(),
                indicator=d.indicator,
                error=d.error,
                blocks_computed=plan.blocks_computed,
                blocks_total=len(self.blocks),  # on this rank (a pipeline stage holds a slice)
                tokens_computed=plan.tokens_computed,
                tokens_total=rows_full * len(self.blocks),
                flops=(plan.flops + nonblock) if full_flops else 0,
                flops_full=full_flops,
                reason=d.reason,
                blocks_mask=[int(c) for c in plan.compute] if plan.compute is not None else None,
                token_count=plan.token_count,
            )
        )
        self.statistics.cache_bytes = self.cache_bytes()
        self.statistics.collectives = self.sync.collectives
        self.statistics.collective_bytes = self.sync.bytes_sent

    def _end_flop_count(self) -> None:
        if self._flop_mode is not None:
            key, mode = self._flop_mode
            self._flop_mode = None
            mode.__exit__(None, None, None)
            self._meter.cache[key] = int(mode.get_total_flops())

    # ------------------------------------------------------------------ the block wrapper
    def _run_original(self, g: int, call: BlockCall, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        args, kwargs = call.with_streams(img, txt)
        fn = functools.partial(self._orig_forward[g], *args, **kwargs)
        if not self.count_flops:
            return fn()
        key = ("block", g, tuple(img.shape), None if txt is None else tuple(txt.shape))
        flops, out = self._meter.run(key, fn)
        if self.plan is not None:
            self.plan.flops += flops
            if img.shape[0] * img.shape[1] == self.plan.rows_full:
                self._full_block_flops[g] = flops
        return out

    def _block_forward(self, g: int, *args: Any, **kwargs: Any) -> Any:
        si, blk = self.blocks[g]
        stack = self.stacks[si]
        call = self.adapter.parse_call(stack, self._sigs[si], args, kwargs)
        if self.token_ctx is not None:
            self.token_ctx.n_txt = call.txt.shape[1] if call.txt is not None else 0
        if g == 0:
            self._begin_call(blk, call)
        plan = self.plan
        if plan is None:  # blocks called outside the model's forward: run as-is
            return self._orig_forward[g](*args, **kwargs)
        if g < self.seg_start:
            return plan.probe_out
        if g == self.seg_start:
            plan.seg_in = call.img
        kind = plan.decision.kind
        last = g == len(self.blocks) - 1
        state = self._state()
        if kind == StepKind.SKIP:
            img = call.img + self._residual_estimate(state) if g == self.seg_start else call.img
            return self.adapter.make_output(stack, img, call.txt)
        if kind == StepKind.TOKEN:
            return self._token_block(g, call, state, last)
        if kind == StepKind.BLOCK and not plan.compute[g + self.block_offset]:
            d_img, d_txt = state.block_res[g]
            slope = state.block_slope.get(g)
            if slope is not None:
                gap = self.step - state.block_step[g]
                d_img = d_img + gap * slope[0]
                if d_txt is not None and slope[1] is not None:
                    d_txt = d_txt + gap * slope[1]
            txt = call.txt + d_txt if (call.txt is not None and d_txt is not None) else call.txt
            out_img = call.img + d_img
            if last:
                self._finish_stack(state, out_img, kind)
            return self.adapter.make_output(stack, out_img, txt)
        # FULL, or a block BLOCK-refresh computes
        record = self.token_ctx is not None and kind == StepKind.FULL
        if record:
            self.token_ctx.record = True
        try:
            out = self._run_original(g, call, call.img, call.txt)
        finally:
            if record:
                self.token_ctx.record = False
        plan.blocks_computed += 1
        plan.tokens_computed += call.img.shape[0] * call.img.shape[1]
        out_img, out_txt = self.adapter.split_output(stack, out)
        if self.use_block:
            d_txt = out_txt - call.txt if (out_txt is not None and call.txt is not None) else None
            d_img = out_img - call.img
            prev = state.block_res.get(g)
            if self.config.extrapolate == "linear" and prev is not None and prev[0].shape == d_img.shape:
                gap = self.step - state.block_step[g]
                if gap > 0:
                    s_txt = None
                    if d_txt is not None and prev[1] is not None and prev[1].shape == d_txt.shape:
                        s_txt = (d_txt - prev[1]) / gap
                    state.block_slope[g] = ((d_img - prev[0]) / gap, s_txt)
            else:
                state.block_slope.pop(g, None)
            state.block_res[g] = (d_img, d_txt)
            state.block_step[g] = self.step
            if kind == StepKind.FULL:
                self._record_block_mag(state, g, out_img, call.img)
        if last:
            self._finish_stack(state, out_img, kind)
            if (
                self.pipeline is not None
                and not self.pipeline.is_first
                and self.use_block
                and kind == StepKind.FULL
                and self.branch == 0
                and self.step < (self.num_steps or 0) - 1
                and state.block_mag is not None
            ):
                self.pipeline.send_block_stats(state.block_mag)
        return out

    def _token_block(self, g: int, call: BlockCall, state: BranchState, last: bool) -> Any:
        plan = self.plan
        assert plan is not None and plan.token_index is not None and self.token_ctx is not None
        stack = call.stack
        idx, flat = plan.token_index, plan.token_flat
        sel = gather_rows(call.img, idx, flat)
        self.token_ctx.index, self.token_ctx.flat = idx, flat
        try:
            out = self._run_original(g, call, sel, call.txt)
        finally:
            self.token_ctx.index = self.token_ctx.flat = None
        plan.blocks_computed += 1
        plan.tokens_computed += sel.shape[0] * sel.shape[1]
        out_sel, out_txt = self.adapter.split_output(stack, out)
        if last:
            assert plan.seg_in is not None and state.res_stack is not None
            base = plan.seg_in + self._residual_estimate(state)
            img = splice(base, idx, out_sel, flat)
            self._finish_stack(state, img, StepKind.TOKEN)
        else:
            img = splice(call.img, idx, out_sel, flat)
        return self.adapter.make_output(stack, img, out_txt)

    def _finish_stack(self, state: BranchState, out_img: torch.Tensor, kind: StepKind) -> None:
        plan = self.plan
        assert plan is not None and plan.seg_in is not None
        res = (out_img - plan.seg_in).detach()
        if self.profiling and self.branch == 0:
            self._profile_step(state, res, plan)
        if self.use_token:
            if kind == StepKind.TOKEN and state.res_prev is not None and state.res_stack is not None:
                idx = plan.token_index
                assert idx is not None
                rows = gather_rows(state.res_stack, idx, plan.token_flat)
                state.res_prev = splice(state.res_prev, idx, rows, plan.token_flat)
            else:
                state.res_prev = state.res_stack
        # Only full steps give exact stack residuals: a block step's residual carries the stale
        # residuals of the blocks it reused, which would bend the slope (measured: worse than skips).
        if self.config.extrapolate == "linear" and kind == StepKind.FULL:
            if (
                state.exact_res is not None
                and state.exact_res.shape == res.shape
                and self.step > state.exact_step
            ):
                state.slope = (res - state.exact_res) / (self.step - state.exact_step)
            else:
                state.slope = None
            state.exact_res, state.exact_step = res, self.step
        state.res_stack = res
        state.res_step = self.step

    def _residual_estimate(self, state: BranchState) -> torch.Tensor:
        """The stack residual for a step that does not compute it: the latest one, or (with
        ``extrapolate="linear"``) that one moved along the per-step slope between the last two
        exactly computed residuals (full steps; block and token steps refresh the residual but
        not the slope)."""
        assert state.res_stack is not None
        if state.slope is not None and state.slope.shape == state.res_stack.shape:
            return state.res_stack + (self.step - state.res_step) * state.slope
        return state.res_stack

    def _profile_step(self, state: BranchState, res: torch.Tensor, plan: CallPlan) -> None:
        prev = state.res_stack
        change = None
        if prev is not None and prev.shape == res.shape:
            sums = self.sync.sum_partials(
                torch.stack(
                    [(res - prev).abs().sum(dtype=torch.float64), prev.abs().sum(dtype=torch.float64)]
                )
            )
            change = float(sums[0] / sums[1]) if float(sums[1]) > 0 else None
        mags = None
        if state.block_mag is not None and plan.decision.kind == StepKind.FULL:
            s = self.sync.sum_block_partials(state.block_mag.clone())
            mags = (s[:, 0] / s[:, 1].clamp_min(1)).tolist()
        self.profile.append(
            {
                "step": self.step,
                "kind": plan.decision.kind.name.lower(),
                "probe_change": plan.decision.indicator,
                "residual_change": change,
                "block_magnitudes": mags,
                "gram_row": self._gram_row(res),
            }
        )

    def _gram_row(self, res: torch.Tensor) -> list[float]:
        """Inner products of this step's stack residual with every earlier profiled one (and
        itself), over a strided subsample, summed over ranks: one row of the profile's Gram
        matrix (sums over tokens, so sequence-parallel shards add up exactly)."""
        flat = res.reshape(-1)
        stride = max(1, -(-flat.numel() // self.profile_max_elements))
        vec = flat[::stride].to(torch.float32, copy=True)  # kept for the later rows
        self._profile_vectors.append(vec)
        v64 = vec.double()
        dots = torch.stack([torch.dot(v64, v.double()) for v in self._profile_vectors])
        return self.sync.sum_partials(dots).tolist()

    def _record_block_mag(self, state: BranchState, g: int, out: torch.Tensor, inp: torch.Tensor) -> None:
        if state.block_mag is None:
            state.block_mag = torch.zeros(len(self.blocks), 2, dtype=torch.float64, device=out.device)
        state.block_mag[g, 0] = (out - inp).abs().sum(dtype=torch.float64)
        state.block_mag[g, 1] = float(out.numel())

    def _state(self) -> BranchState:
        return self.branches.setdefault(self.branch, BranchState())

    # ------------------------------------------------------------------ decisions
    def _begin_call(self, blk0: nn.Module, call: BlockCall) -> None:
        tick = time.perf_counter()
        state = self._state()
        img = call.img
        rows_full = img.shape[0] * img.shape[1]
        probe_out = None
        if self.seg_start:  # first_block_residual: block 0 runs every step, its residual is the probe
            self.plan = CallPlan(
                StepDecision(self.step, StepKind.FULL, None, 0.0, "probe"), rows_full=rows_full
            )
            probe_out = self._run_original(0, call, call.img, call.txt)
            probe_flops = self.plan.flops
            probe = self.adapter.split_output(call.stack, probe_out)[0] - img
        else:
            probe_flops = 0
            first_stage = self.pipeline is None or self.pipeline.is_first
            want_probe = first_stage and (isinstance(self.controller, OnlineController) or self.profiling)
            probe = self.adapter.modulated_input(blk0, call) if want_probe else None

        forced = self.controller.forced_full(self.step)
        indicator = None
        if probe is not None and state.probe_prev is not None and state.probe_prev.shape == probe.shape:
            if self.branch == 0 or self._step_plan is None:
                sums = torch.stack(
                    [
                        (probe - state.probe_prev).abs().sum(dtype=torch.float64),
                        state.probe_prev.abs().sum(dtype=torch.float64),
                    ]
                )
                sums = self.sync.sum_partials(sums)
                indicator = float(sums[0] / sums[1]) if float(sums[1]) > 0 else None
        received: list[int] | None = None
        if self.branch > 0 and self._step_plan is not None:
            decision = self._step_plan.decision
        elif self.pipeline is not None and not self.pipeline.is_first:
            received = self.pipeline.forward_decision(None, 1 + self.total_blocks)
            decision = StepDecision(self.step, StepKind(received[0]), None, 0.0, "from the previous stage")
        else:
            if self.pipeline is not None and self._stats_due:
                self._remote_mag = self.pipeline.recv_block_stats()
            decision = self.controller.decide(self.step, None if forced else indicator)
            decision = self._feasible(decision, state, img)
            if not forced:
                agreed = self.sync.agree([int(decision.kind)], device=img.device)
                if agreed[0] != int(decision.kind):
                    decision = StepDecision(
                        self.step, StepKind(agreed[0]), decision.indicator, decision.error, "agreed"
                    )
            if decision.indicator is None and indicator is not None:
                # keep the raw probe change of forced-full steps for the statistics and profiles
                decision = StepDecision(
                    decision.step, decision.kind, indicator, decision.error, decision.reason
                )
        if self.branch == 0:
            self._stats_due = (
                self.use_block and decision.kind == StepKind.FULL and self.step < (self.num_steps or 0) - 1
            )
        if probe is not None:
            state.probe_prev = probe.detach()
        plan = CallPlan(decision, rows_full=rows_full, probe_out=probe_out)
        plan.flops = probe_flops
        if self.seg_start:
            plan.blocks_computed = 1
            plan.tokens_computed = rows_full
        self.plan = plan
        if decision.kind == StepKind.BLOCK:
            if received is not None:
                plan.compute = [bool(c) for c in received[1:]]
            elif self.branch > 0 and self._step_plan is not None and self._step_plan.compute is not None:
                plan.compute = list(self._step_plan.compute)
            else:
                plan.compute = self._select_blocks(state)
        if self.pipeline is not None and self.pipeline.is_first and self.branch == 0:
            mask = plan.compute if plan.compute is not None else [True] * self.total_blocks
            self.pipeline.forward_decision(
                [int(decision.kind)] + [int(c) for c in mask], 1 + self.total_blocks
            )
        elif decision.kind == StepKind.TOKEN:
            plan.token_index = self._select_tokens(state, img)
            plan.token_flat = flat_rows(plan.token_index, img.shape[1])
            plan.token_count = int(plan.token_index.shape[1]) * self.sequence_shards
        if self.branch == 0:
            self._step_plan = plan
        self.statistics.bookkeeping_seconds += time.perf_counter() - tick

    def _feasible(self, d: StepDecision, state: BranchState, img: torch.Tensor) -> StepDecision:
        """Downgrade a decision the caches cannot serve yet (identically on every rank: cache
        presence and shapes depend only on the decision history and the layout, which ranks
        share; PipeFusion's switch from whole images to patches changes the shapes)."""
        kind = d.kind
        if kind != StepKind.FULL and (state.res_stack is None or state.res_stack.shape != img.shape):
            kind = StepKind.FULL
        if kind == StepKind.BLOCK and (not self.use_block or state.block_mag is None):
            kind = StepKind.FULL
        if kind == StepKind.TOKEN and (self.token_ctx is None or not self.token_ctx.kv):
            kind = StepKind.FULL
        if kind == d.kind:
            return d
        if kind == StepKind.FULL and isinstance(self.controller, OnlineController):
            self.controller.error = 0.0
        return StepDecision(
            d.step,
            kind,
            d.indicator,
            0.0 if kind == StepKind.FULL else d.error,
            d.reason + " -> full (no cache yet)",
        )

    def _select_blocks(self, state: BranchState) -> list[bool]:
        """The whole-depth block mask (global indices), from every stage's magnitudes."""
        assert state.block_mag is not None
        local = state.block_mag
        if self.pipeline is not None:
            local = torch.cat([local.to(torch.float64)] + [m.to(local.device) for m in self._remote_mag])
        sums = self.sync.sum_block_partials(local.clone())
        if sums.shape[0] != self.total_blocks:
            raise XSlimRuntimeError(
                f"block statistics cover {sums.shape[0]} blocks, the model has {self.total_blocks}"
            )
        mags = (sums[:, 0] / sums[:, 1].clamp_min(1)).tolist()
        compute: list[bool] = []
        for si, (start, end) in enumerate(self.global_stacks):
            managed = [g for g in range(start, end) if g >= self.seg_start]
            compute += [True] * (end - start - len(managed))
            compute += select_blocks(
                [mags[g] for g in managed],
                self.config.block_threshold(si),
                self.config.block_first_n,
                self.config.block_thresh_scale,
            )
        agreed = self.sync.agree([int(c) for c in compute], device=sums.device)
        return [bool(c) for c in agreed]

    def _select_tokens(self, state: BranchState, img: torch.Tensor) -> torch.Tensor:
        assert state.res_stack is not None
        if state.res_prev is not None and state.res_prev.shape == state.res_stack.shape:
            score = (state.res_stack - state.res_prev).abs().mean(-1)
        else:  # only one computed step so far: refresh where the residual is largest
            score = state.res_stack.abs().mean(-1)
        n = score.shape[1]
        counts = tokens_per_group(n, self.config.token_ratio, self.config.token_groups)
        parts, start = [], 0
        for g, k in enumerate(counts):
            size = n // len(counts) + (1 if g < n % len(counts) else 0)
            top = score[:, start : start + size].float().topk(k, dim=1).indices + start
            parts.append(top)
            start += size
        return torch.cat(parts, 1).sort(dim=1).values

    # ------------------------------------------------------------------ reporting
    def cache_bytes(self) -> dict[str, int]:
        """Bytes held per cache kind."""

        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        out = {"stack_residual": 0, "token_history": 0, "block_residuals": 0, "probe": 0, "kv": 0}
        for st in self.branches.values():
            out["stack_residual"] += nbytes(st.res_stack)
            out["token_history"] += nbytes(st.res_prev)
            out["stack_residual"] += nbytes(st.exact_res) + nbytes(st.slope)
            out["probe"] += nbytes(st.probe_prev)
            out["block_residuals"] += sum(nbytes(a) + nbytes(b) for a, b in st.block_res.values())
            out["block_residuals"] += sum(nbytes(a) + nbytes(b) for a, b in st.block_slope.values())
        if self.token_ctx is not None:
            out["kv"] = self.token_ctx.cache_bytes()
        return out


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    def k(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
        return None

    return tuple(k(a) for a in args) + tuple((n, k(v)) for n, v in sorted(kwargs.items()))
