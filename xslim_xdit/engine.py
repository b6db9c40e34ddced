"""The X-Slim engine: runs each transformer call as its plan says.

It attaches to a transformer without changing its code or its weights (:mod:`xslim_xdit.hooks`:
a hook per block and a call hook on the transformer in diffusers' hook registry, and, for
token refresh, attention processors that delegate to the originals whenever no refresh is
active); the model's own forward keeps running its embeddings, its block loop and its output
layers. What a call does is decided elsewhere: the step and branch by the
:class:`~xslim_xdit.clock.StepClock`, the plan by the
:class:`~xslim_xdit.decision.DecisionRoom`; what is reused lives in
:class:`~xslim_xdit.caches.BranchCaches`; statistics, FLOPs and calibration profiles are
:mod:`~xslim_xdit.observers`; what each block does under a plan, the
:class:`~xslim_xdit.executor.PlanExecutor`.

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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .adapters.attention import TokenAttentionHooks, TokenContext
from .adapters.base import BlockStack, ModelAdapter, adapter_for
from .batch import SamplePlan, SampleRoom, refuse_per_sample
from .batch_executor import SampleExecutor
from .caches import BranchCaches
from .clock import AmbiguousRunError, StepClock
from .compiled import CompiledRegions
from .config import ConfigError, XSlimConfig
from .controller import make_controller
from .decision import CallPlan, DecisionRoom, DepthLayout
from .engine_caches import EngineCaches
from .executor import CallTally, PlanExecutor
from .hooks import BlockHooks, shape_key
from .observers import EngineObserver, FlopMeter
from .parallel.fingerprint import run_fingerprint
from .parallel.sync import DecisionSync, LocalSync
from .stage import join_pipeline
from .stats import CacheStatistics


class XSlimRuntimeError(RuntimeError):
    """The engine was used in a way it cannot serve (the message says what to do)."""


class XSlimEngine(EngineCaches):
    """Attach X-Slim to one transformer.

    Args:
        model: a supported transformer (see :func:`~xslim_xdit.adapters.adapter_for`).
        config: the :class:`~xslim_xdit.config.XSlimConfig`.
        adapter: override the adapter found from the model class.
        sync: where ranks agree (default: :class:`~xslim_xdit.parallel.LocalSync`, no collectives).
        num_inference_steps: steps per run, if no pipeline scheduler tells the engine (see
            :meth:`start_run`).
        count_flops: measure FLOPs (once per call shape) for the statistics.
        observers: more :class:`~xslim_xdit.observers.EngineObserver` s (e.g. a profile recorder).
        record: recording mode: every step runs in full while the indicator and the block
            statistics are still measured (calibration profiles).
    """

    def __init__(
        self,
        model: nn.Module,
        config: XSlimConfig,
        adapter: ModelAdapter | None = None,
        sync: DecisionSync | None = None,
        num_inference_steps: int | None = None,
        count_flops: bool = True,
        observers: Sequence[EngineObserver] = (),
        record: bool = False,
    ) -> None:
        if not isinstance(config, XSlimConfig):
            raise TypeError(f"config must be an XSlimConfig; got {type(config).__name__}")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
        for obs in observers:
            if not isinstance(obs, EngineObserver):
                raise TypeError(f"observers must be EngineObserver instances; got {type(obs).__name__}")
        self.model = model
        self.config = config
        self.adapter = adapter or adapter_for(model)
        self.stacks: list[BlockStack] = self.adapter.stacks(model)
        self.blocks: list[tuple[int, nn.Module]] = [
            (si, blk) for si, st in enumerate(self.stacks) for blk in st.blocks
        ]
        if not self.blocks:
            raise XSlimRuntimeError("model has no transformer blocks")
        self.record = record
        self.use_block = "block" in config.levels or record  # a recording measures block statistics
        self.use_token = "token" in config.levels
        refusal = self.adapter.token_refusal_for(model) if self.use_token else ""
        if refusal:
            # refused before anything is attached (the processors are installed by attach)
            raise ConfigError(
                f"family {self.adapter.name!r}: token refresh (level 'token') is not supported: "
                f"{refusal}; use polish='block' or 'none', or a schedule without token steps"
            )
        if config.per_sample and not record:
            refuse_per_sample(self.adapter)
        self.seg_start = 1 if config.step_indicator == "first_block_residual" else 0
        self.default_steps = num_inference_steps
        self.block_offset = 0  # first global index of the local blocks (a PipeFusion stage holds a slice)
        self.pipeline: Any = None  # the PipeFusion channel, when this rank is a pipeline stage
        #: ``() -> (index, count)`` of the current call's part of the image (PipeFusion's patch;
        #: ``(0, 1)`` for a whole image), or None: every call holds the whole image
        self.patch_info: Callable[[], tuple[int, int]] | None = None
        stacks, start = [], 0
        for st in self.stacks:
            stacks.append((start, start + len(st.blocks)))
            start += len(st.blocks)
        self.room = DecisionRoom(
            config,
            sync or LocalSync(),
            DepthLayout(tuple(stacks), self.seg_start),
            self.use_block,
            self.use_token,
        )
        self.room.exact_sums = record  # a profile's indicator: the same bytes on every rank
        self.statistics = CacheStatistics()
        self.flop_meter = FlopMeter() if count_flops else None
        self.observers: list[EngineObserver] = (
            ([self.flop_meter] if self.flop_meter else []) + list(observers) + [self.statistics]
        )
        self._block_wrappers = [
            o for o in self.observers if type(o).around_block is not EngineObserver.around_block
        ]
        self.token_ctx = TokenContext() if self.use_token else None
        self.clock = StepClock()
        self.executor = PlanExecutor(self)
        #: per-sample decisions (``config.per_sample``; a recording runs every step full anyway)
        self.per_sample = config.per_sample and not record
        self.samples = SampleRoom(config, self.room, self.use_block) if self.per_sample else None
        self.sample_plan: SamplePlan | None = None
        self._sample_executor = SampleExecutor(self, self.executor.run_original)
        self._sigs: dict[int, inspect.Signature] = {}
        self._hooks: BlockHooks | None = None
        self._handles: list[Any] = []
        self.regions = CompiledRegions()
        self._token_attention: TokenAttentionHooks | None = None
        # run state
        self.run_index = -1
        self.num_steps: int | None = None
        self.step = -1
        self.branch = 0
        self.branches: dict[int, BranchCaches] = {}
        self.plan: CallPlan | None = None
        self.tally: CallTally | None = None
        self._in_call = False
        self._call_key: tuple = ()
        #: called before each transformer call (``enable_xslim`` on a pipeline: is the pipeline's
        #: scheduler still the hooked one?)
        self.before_call: Callable[[], None] | None = None
        self.owner: Callable[[], Any] = lambda: None  # what enable_xslim enabled it on (weakly)

    # ------------------------------------------------------------------ wiring
    @property
    def sync(self) -> DecisionSync:
        return self.room.sync

    @property
    def controller(self) -> Any:
        return self.room.controller

    @property
    def sequence_shards(self) -> int:
        """Sequence-parallel shards of the image tokens (set by the xDiT integration); the
        statistics report token counts over all of them."""
        return self.room.sequence_shards

    @sequence_shards.setter
    def sequence_shards(self, shards: int) -> None:
        self.room.sequence_shards = shards

    def set_pipeline(
        self,
        channel: Any,
        global_stacks: list[tuple[int, int]],
        patch_info: Callable[[], tuple[int, int]] | None = None,
        num_patches: int = 1,
        token_groups: Callable[[], tuple[Sequence[int] | None, int | None]] | None = None,
        kv_buffer: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
    ) -> None:
        """Run as one stage of a PipeFusion pipeline (see :mod:`xslim_xdit.parallel.pipeline`).

        ``global_stacks`` are the whole model's stacks as global ``[start, end)`` block ranges;
        the local blocks are ``channel.block_ranges[channel.stage]``. ``patch_info`` tells which
        patch a call holds (``(index, count)``, ``(0, 1)`` outside the patch phase);
        ``num_patches`` > 1 turns on the lagged indicator unless the config says otherwise
        (``XSlimConfig.lagged_indicator``). Token refresh (FLUX only) needs ``token_groups``
        (``() -> (sizes, part)``: the patches' image-token counts, None without patches, and the
        patch the call holds, None for the whole image) and ``kv_buffer`` (PipeFusion's patch K/V
        buffer, ``TokenContext.kv_buffer``); ``enable_xslim_xdit`` passes both.
        """
        join_pipeline(
            self,
            channel,
            global_stacks,
            patch_info=patch_info,
            num_patches=num_patches,
            token_groups=token_groups,
            kv_buffer=kv_buffer,
        )

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        """The engine's hooks are on the model."""
        return self._hooks is not None

    def attach(self) -> XSlimEngine:
        """Hook the blocks and the model; idempotent."""
        if self._hooks is not None:
            return self
        for si, blk in self.blocks:
            self._sigs[si] = self._sigs.get(si) or inspect.signature(blk.forward)
        blocks = [blk for _, blk in self.blocks]
        self.regions.take_block_compiles(blocks)
        self._hooks = BlockHooks(self.model, blocks, self.executor.block_hook)
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(
            self.model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True)
        )
        if self.token_ctx is not None:
            entries = []
            for si, blk in self.blocks:
                stack = self.stacks[si]
                for attn in self.adapter.token_attentions(blk):  # self-attention, and any other reading K/V
                    make = functools.partial(self.adapter.token_processor, attn, stack, self.token_ctx)
                    entries.append((attn, make, stack.attn_text_position))
            self._token_attention = TokenAttentionHooks(entries, self.token_ctx)
        return self

    def detach(self) -> None:
        """Remove every hook and processor: the model is exactly as it was."""
        if self._hooks is None:
            return
        self._hooks.remove()
        self._hooks = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.regions.restore_block_compiles()
        if self._token_attention is not None:
            self._token_attention.remove()
            self._token_attention = None
        if self.flop_meter is not None:
            self.flop_meter.close()
        self.reset_state()

    # ------------------------------------------------------------------ runs
    def start_run(self, num_steps: int, *, explicit: bool = True) -> None:
        """Begin a new denoising run of ``num_steps`` transformer steps: clears every cache.

        On a bare transformer, calling it before each run tells the engine where runs start, which
        the timestep cannot always tell (a run abandoned in its first step, see
        :mod:`xslim_xdit.clock`). ``explicit=False``: the engine started the run itself."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1; got {num_steps!r}")
        from . import __version__  # the package's, read here: it is set after its imports

        self.reset_state()
        controller = make_controller(self.config, num_steps, record=self.record)
        # Ranks that decide together must agree on everything a decision depends on before the
        # first one: one all-gather of integer hashes; a difference raises RankMismatchError on
        # every rank here, instead of a hang or a wrong plan later (nothing on one device).
        self.sync.check_run(
            run_fingerprint(
                self.config,
                num_steps,
                controller=type(controller).__name__,
                record=self.record,
                total_blocks=self.room.layout.total_blocks,
                version=__version__,
            )
        )
        self.run_index += 1
        self.num_steps = num_steps
        self.room.start_run(controller)
        if self.samples is not None:
            self.samples.start_run(lambda: make_controller(self.config, num_steps))
        self.clock.start_run(explicit)
        for obs in self.observers:
            obs.on_run_start(self, num_steps)

    def reset_state(self) -> None:
        """Forget the current run (caches, step counter, controller)."""
        self.num_steps = None
        self.room.controller = None
        self.step = -1
        self.branch = 0
        self.branches.clear()
        self.plan = None
        self.tally = None
        self._in_call = False
        self.sample_plan = None
        if self.samples is not None:
            self.samples.reset()
        if self.token_ctx is not None:
            self.token_ctx.reset()

    def _start_default_run(self) -> None:
        if self.default_steps is None:
            raise XSlimRuntimeError(
                "num_inference_steps is unknown: enable X-Slim on the pipeline (its scheduler tells the "
                "engine), or pass num_inference_steps= to enable_xslim / XSlimEngine, or call "
                "engine.start_run(num_steps) before the first step"
            )
        self.start_run(self.default_steps, explicit=False)

    def _abandon_call(self) -> None:
        """A call raised: its caches may be half refreshed and its step committed, so the run ends
        here (the next call starts a new one) and the call leaves no record and no FLOP count."""
        if self.flop_meter is not None:
            self.flop_meter.abandon()
        self.regions.forget()  # an interrupted compiled call: torch.compile's wrapper restored dynamo
        self.reset_state()

    # ------------------------------------------------------------------ model hooks
    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_call:  # the last call never ended: torch runs no hook on a KeyboardInterrupt
            self._abandon_call()
        self.regions.enter_call()  # under torch.compile: eager until the forward hook, blocks compiled
        try:
            self._start_call(model, args, kwargs)
        except BaseException:
            self.regions.leave_call()
            raise

    def _start_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.before_call is not None:
            self.before_call()
        if self.room.controller is None:
            self._start_default_run()
        t = self.adapter.timestep(model, args, kwargs)
        context = self._hooks.context if self._hooks is not None else None
        try:
            new_run, step, branch = self.clock.tick(t, context)
        except AmbiguousRunError as e:
            self.reset_state()
            raise XSlimRuntimeError(str(e)) from None
        if step >= (self.num_steps or 0) or (new_run and self.step >= 0):
            # The previous run used all its steps, or a bare transformer went back to a higher
            # noise level: a new run, with nothing inherited from the old one.
            self._start_default_run()
            new_run, step, branch = self.clock.tick(t, context)
        if self.patch_info is not None:
            index, count = self.patch_info()
            if count > 1 and branch != index:
                # the clock counts the patches of a step as its branches: each patch's caches
                # are the branch's, so a miscount would mix two patches' caches
                self.reset_state()
                raise XSlimRuntimeError(
                    f"step {step}: the clock reads this call as branch {branch}, but xfuser runs patch "
                    f"{index} of {count}; PipeFusion patches must be counted as the step's calls"
                )
        self.step, self.branch = step, branch
        self.plan = None
        self.sample_plan = None
        self.tally = None
        self._in_call = True
        self._call_key = ("forward", shape_key(args, kwargs))
        if self.use_token:
            self.room.reference = self.adapter.reference_tokens(model, args, kwargs)
        for obs in self.observers:
            obs.on_call_start(self, self._call_key)

    def _post_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.regions.leave_call()
        if output is None:  # the forward raised (torch calls this hook then, with no output)
            self._abandon_call()
            return
        self._in_call = False
        record = self.executor.record()
        if record is None:
            return
        for obs in self.observers:
            obs.on_call_end(self, record)
