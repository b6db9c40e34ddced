"""X-Slim on xDiT: one decision per generation on every rank, and the xDiT command line.

xDiT (``xfuser``) runs one generation on several ranks: sequence parallelism (Ulysses and
Ring, "USP") shards the image tokens, CFG parallelism puts the two guidance branches on two
ranks, PipeFusion splits the blocks into stages, data parallelism runs other prompts. This
module finds, from xfuser's runtime state, the ranks that share one generation, and gives the
engine a :class:`~xslim_xdit.parallel.GroupSync` over them, plus the sequence-parallel K/V
gather that token refresh needs.

Importing it neither imports xfuser nor patches it: the functions import xfuser when called, by
which time the caller has imported it. Without an accelerator, call
:func:`~xslim_xdit.integrations.xfuser_compat.apply_xfuser_cpu_compat` before the first
``import xfuser`` (the ``xslim_xdit.testing.xfuser`` helpers and
:func:`~xslim_xdit.integrations.xfuser_runtime.init_xfuser_runtime` do).

Example (every rank of a ``torchrun`` job, after the xFuser pipeline is built)::

    from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper, add_xslim_args, config_from_args
    parser = FlexibleArgumentParser(); parser = xFuserArgs.add_cli_args(parser); add_xslim_args(parser)
    args = parser.parse_args()
    pipe = XSlimXFuserWrapper(xFuserFluxPipeline.from_pretrained(...), config_from_args(args))
    out = pipe(prompt=..., num_inference_steps=28)
    print(pipe.get_cache_statistics().table())
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from ..adapters.base import adapter_for
from ..api import XSlimPipelineWrapper, enable_xslim, get_engines
from ..calibration.result import CalibrationResult
from ..config import ConfigError, XSlimConfig
from ..engine import XSlimEngine
from ..experts import expert_transformers
from ..observers import EngineObserver
from ..parallel.failure import WATCHDOG_SLACK_S, watchdog_arm, watchdog_disarm
from ..parallel.groups import SequenceParallelGather
from ..parallel.sync import GroupSync, LocalSync
from ..stage import pipefusion_token_refusal
from ..stats import StepRecord
from .cli import add_xslim_args as add_xslim_args  # the command line lives in cli.py
from .cli import config_from_args as config_from_args
from .cli import timeout_from_args as timeout_from_args
from .xfuser_cfg import cfg_branch_name

#: the command line, reached through this module as the README imports it (doctest.testmod runs
#: these; functions defined in cli.py are not this module's)
__test__ = {
    "command_line": """
    >>> import argparse
    >>> p = add_xslim_args(argparse.ArgumentParser())
    >>> config_from_args(p.parse_args(["--xslim", "--xslim-preset", "flux-fast"])).preset
    'flux-fast'
    >>> config_from_args(p.parse_args(["--xslim", "--xslim-preset", "flux-fast", "--xslim-crit", "0.5"]))
    Traceback (most recent call last):
    ...
    xslim_xdit.schedule.ConfigError: --xslim-preset and --xslim-crit cannot be combined: --xslim-preset runs a fixed schedule and never reads --xslim-warn, --xslim-crit, --xslim-warmup, --xslim-polish, --xslim-rescale, --xslim-lagged-indicator; drop --xslim-crit, or drop --xslim-preset to run the online controller
    """
}

#: X-Slim's own process groups, by (ranks, timeout): created once, collectively
_GENERATION_GROUPS: dict[tuple[tuple[int, ...], float | None], Any] = {}


def xdit_layout() -> dict[str, int]:
    """The parallel degrees and this rank's coordinates, from xfuser's runtime state."""
    from xfuser.core.distributed import parallel_state as ps

    return {
        "world": torch.distributed.get_world_size(),
        "rank": torch.distributed.get_rank(),
        "sp": ps.get_sequence_parallel_world_size(),
        "ulysses": ps.get_ulysses_parallel_world_size(),
        "ring": ps.get_ring_parallel_world_size(),
        "pp": ps.get_pipeline_parallel_world_size(),
        "cfg": ps.get_classifier_free_guidance_world_size(),
        "cfg_rank": ps.get_classifier_free_guidance_rank(),
        "dp": ps.get_data_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def _groups_by(key_of_rank: list[Any], my_key: Any, timeout_s: float | None = None) -> tuple[Any, list[int]]:
    """Create (once, collectively, in the same order on every rank) a group per distinct key;
    return this rank's group and its ranks.

    The groups carry X-Slim's timeout: the backend then drops an operation pending with a rank
    that stopped answering by the time X-Slim gives up on it. Without it (torch's default is 30
    minutes) the group's destructor waits for that operation and the process cannot exit.
    """
    mine = None
    for key in sorted(set(key_of_rank)):
        ranks = tuple(r for r, k in enumerate(key_of_rank) if k == key)
        if (ranks, timeout_s) not in _GENERATION_GROUPS:
            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            _GENERATION_GROUPS[(ranks, timeout_s)] = torch.distributed.new_group(list(ranks), **kwargs)
        if key == my_key:
            mine = (_GENERATION_GROUPS[(ranks, timeout_s)], list(ranks))
    if mine is None:  # every rank gathered its own key: only a broken all_gather gets here
        raise RuntimeError(f"this rank's group key {my_key!r} is not among the gathered keys {key_of_rank!r}")
    return mine


def generation_group(timeout_s: float | None = None) -> tuple[Any, list[int]]:
    """The process group of the ranks that decide together: the same data-parallel replica and
    the same pipeline stage (sequence shards and CFG branches). Created once; every rank must
    call it (groups are created collectively)."""
    layout = xdit_layout()
    from xfuser.core.distributed import parallel_state as ps

    my_key = (layout["dp_rank"], ps.get_pipeline_parallel_rank())
    keys: list[Any] = [None] * layout["world"]
    torch.distributed.all_gather_object(keys, my_key)
    return _groups_by(keys, my_key, timeout_s)


def replica_group(timeout_s: float | None = None) -> tuple[Any, list[int]]:
    """The process group of every rank of this rank's generation (its data-parallel replica):
    all pipeline stages, sequence shards and CFG branches. PipeFusion compares the run
    fingerprint over it. Collective, like :func:`generation_group`."""
    layout = xdit_layout()
    keys: list[Any] = [None] * layout["world"]
    torch.distributed.all_gather_object(keys, layout["dp_rank"])
    return _groups_by(keys, layout["dp_rank"], timeout_s)


class RunWatchdog(EngineObserver):
    """Feeds the communication watchdog (:mod:`xslim_xdit.parallel.failure`) from a run's start
    to its last transformer call: a rank that waits on other ranks (in xfuser's collectives and
    transfers as well as X-Slim's) for ``timeout_s`` without a call starting or ending is ended.

    Example:
        >>> engine.observers.insert(0, RunWatchdog(300.0))  # doctest: +SKIP
    """

    def __init__(self, timeout_s: float) -> None:
        # a little later than X-Slim's own collectives time out, so that a wait inside one of
        # them ends with its clear XSlimCollectiveError rather than the watchdog's exit
        self.timeout_s = timeout_s + WATCHDOG_SLACK_S

    def on_run_start(self, engine: XSlimEngine, num_steps: int) -> None:
        watchdog_arm(engine, self.timeout_s, f"X-Slim run {engine.run_index} ({num_steps} steps)")

    def on_call_start(self, engine: XSlimEngine, key: Hashable) -> None:
        watchdog_arm(engine, self.timeout_s, f"step {engine.step} of X-Slim run {engine.run_index}")

    def on_call_end(self, engine: XSlimEngine, record: StepRecord) -> None:
        if engine.num_steps is not None and engine.step >= engine.num_steps - 1:
            # The run's last step: what follows (decoding, saving) is not a denoising step, and
            # may legitimately take long. A second guidance branch re-arms at its call start.
            watchdog_disarm(engine)
        else:
            watchdog_arm(engine, self.timeout_s, f"after step {engine.step} of X-Slim run {engine.run_index}")


def pipeline_channel(transformer: Any, engine: XSlimEngine, timeout_s: float | None = None) -> Any:
    """The stage-to-stage channel of this rank's PipeFusion pipeline (collective over the world)."""
    from xfuser.core.distributed import get_pp_group
    from xfuser.core.distributed import parallel_state as ps

    from ..parallel.pipeline import PipelineChannel

    pp_ranks = tuple(get_pp_group().ranks)
    info = (pp_ranks, ps.get_pipeline_parallel_rank(), len(engine.blocks))
    infos: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(infos, info)
    group, _ = _groups_by([i[0] for i in infos], pp_ranks, timeout_s)
    counts = {r: i[2] for r, i in enumerate(infos)}
    ranges, start = [], 0
    for r in pp_ranks:
        ranges.append((start, counts[r]))
        start += counts[r]
    device = next(transformer.parameters()).device
    if torch.distributed.get_backend(group) == "gloo":
        device = torch.device("cpu")
    agreement_group, agreement_ranks = replica_group(timeout_s)
    agreement = GroupSync(agreement_group, timeout_s=timeout_s) if len(agreement_ranks) > 1 else None
    return PipelineChannel(group, list(pp_ranks), info[1], ranges, device, timeout_s, agreement)


def _patch_info() -> tuple[int, int]:
    """``(index, count)`` of the PipeFusion patch the current transformer call holds; ``(0, 1)``
    outside the patch phase (xfuser's runtime state, set by its pipeline before each call)."""
    from xfuser.core.distributed import get_runtime_state

    state = get_runtime_state()
    if not state.patch_mode:
        return 0, 1
    return int(state.pipeline_patch_idx), int(state.num_pipeline_patch)


def _num_patches() -> int:
    """PipeFusion's ``num_pipeline_patch`` (its asynchronous phase splits the image into these)."""
    from xfuser.core.distributed import get_runtime_state

    return int(get_runtime_state().num_pipeline_patch or 1)


def _patch_token_groups() -> tuple[list[int] | None, int | None]:
    """Token refresh under PipeFusion: the image-token counts of xfuser's patches (its
    ``pp_patches_token_start_end_idx_global``; None with one patch) and the patch the current call
    holds (None outside the patch phase: the call holds the whole image). Tokens are selected
    within each patch, so a single device given these sizes as token groups selects the same."""
    from xfuser.core.distributed import get_runtime_state

    state = get_runtime_state()
    if int(state.num_pipeline_patch or 1) <= 1:
        return None, None
    sizes = [int(end) - int(start) for start, end in state.pp_patches_token_start_end_idx_global]
    return sizes, (int(state.pipeline_patch_idx) if state.patch_mode else None)


def _patch_kv_buffer(
    attn: Any, key: torch.Tensor, value: torch.Tensor, seq_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token step's image K/V of the call (every row of its patch, the refreshed ones spliced
    in, after norm and RoPE) through PipeFusion's buffer, as xfuser's own processor passes its
    own (the sequence in dimension ``seq_dim``: 1 for its FLUX processor, 2 for
    ``xFuserAttnProcessor2_0``, PixArt's): in the patch phase they are written at the patch's
    rows and the whole image's buffer comes back (the other patches' rows as they last wrote
    them); outside it they replace the buffer. With one patch PipeFusion keeps no buffer: the
    call's own K/V."""
    from xfuser.core.cache_manager.cache_manager import get_cache_manager
    from xfuser.core.distributed import get_runtime_state

    manager = get_cache_manager()
    if int(get_runtime_state().num_pipeline_patch or 1) <= 1 or not manager.has_cache_entry(attn):
        return key, value
    key, value = manager.update_and_get_kv_cache(
        new_kv=[key, value], layer=attn, slice_dim=seq_dim, layer_type="attn"
    )
    return key, value


def _global_stacks(transformer: Any, engine: XSlimEngine) -> list[tuple[int, int]]:
    """The whole model's stacks as global block ranges (xfuser records them before splitting)."""
    blocks_idx = getattr(transformer, "blocks_idx", None)
    if not blocks_idx:
        raise RuntimeError("the xfuser transformer wrapper does not expose blocks_idx; cannot map stages")
    return [tuple(blocks_idx[st.attr]) for st in engine.stacks]


def enable_xslim_xdit(
    pipe_or_transformer: Any,
    config: XSlimConfig,
    timeout_s: float = 300.0,
    watchdog: bool = True,
    *,
    num_inference_steps: int | None = None,
    observers: Sequence[EngineObserver] = (),
    record: bool = False,
) -> XSlimEngine:
    """Enable X-Slim on an xFuser pipeline or an xfuser transformer wrapper, with decisions
    shared by every rank of the generation. Call it on every rank.

    Under PipeFusion the first stage decides and the decision travels to the later stages point
    to point (:mod:`xslim_xdit.parallel.pipeline`).

    Each run starts with one all-gather of the run fingerprint over the generation's ranks
    (a different config or step count raises
    :class:`~xslim_xdit.parallel.RankMismatchError` on every rank). ``timeout_s`` bounds every
    X-Slim collective and, with ``watchdog``, any wait on other ranks during a run (xfuser's
    too): after a failure every process is gone within ``timeout_s + EXIT_MARGIN_S``
    (``docs/parallel.md``, :mod:`xslim_xdit.parallel.failure`). ``num_inference_steps``,
    ``observers`` and ``record`` are :func:`~xslim_xdit.api.enable_xslim`'s (calibration passes
    them: :func:`calibrate_xdit`).

    Raises:
        NotImplementedError: token refresh under sequence parallelism x PipeFusion, or under
            PipeFusion for a family other than FLUX and PixArt.
        ConfigError: token refresh under sequence parallelism for a family that cannot serve it
            there (its adapter's ``token_sequence_parallel_refusal``), before any work starts.
    """
    if not isinstance(config, XSlimConfig):
        raise TypeError(f"config must be an XSlimConfig; got {type(config).__name__}")
    passed: dict[str, Any] = dict(num_inference_steps=num_inference_steps, observers=observers, record=record)
    if not torch.distributed.is_initialized():
        return enable_xslim(pipe_or_transformer, config, **passed)
    layout = xdit_layout()
    if layout["pp"] > 1 and layout["sp"] > 1 and "token" in config.levels:
        raise NotImplementedError(
            "token refresh under sequence parallelism x PipeFusion is not supported (xfuser's patch K/V "
            "buffer is then sharded over the sequence ranks); use polish='block' or 'none', or a schedule "
            "without token steps, or PipeFusion alone"
        )
    if layout["pp"] > 1 and "token" in config.levels:
        # refused before anything is attached or any group is created (join_pipeline checks again)
        for transformer in expert_transformers(pipe_or_transformer).values():
            refusal = pipefusion_token_refusal(adapter_for(transformer).name)
            if refusal is not None:
                raise NotImplementedError(refusal)
    if layout["sp"] > 1 and "token" in config.levels:
        # refused before anything is attached or any group is created
        for transformer in expert_transformers(pipe_or_transformer).values():
            adapter = adapter_for(transformer)
            if adapter.token_sequence_parallel_refusal:
                raise ConfigError(
                    f"family {adapter.name!r}: token refresh (level 'token') under sequence parallelism "
                    f"(ulysses_degree x ring_degree = {layout['sp']}) is not supported: "
                    f"{adapter.token_sequence_parallel_refusal}; use polish='block' or 'none', or a "
                    "schedule without token steps"
                )
    if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0; got {timeout_s!r}")
    group, ranks = generation_group(timeout_s)
    sync = GroupSync(group, timeout_s=timeout_s) if len(ranks) > 1 else LocalSync()
    first = enable_xslim(pipe_or_transformer, config, sync=sync, **passed)
    # every expert of a two-expert pipeline (Wan 2.2 A14B) runs sharded alike
    for engine in get_engines(pipe_or_transformer).values():
        engine.sequence_shards = layout["sp"]
        if watchdog and layout["world"] > 1:
            engine.observers.insert(0, RunWatchdog(timeout_s))
        if layout["pp"] > 1:
            transformer = engine.model
            engine.set_pipeline(
                pipeline_channel(transformer, engine, timeout_s),
                _global_stacks(transformer, engine),
                patch_info=_patch_info,
                num_patches=_num_patches(),
                token_groups=_patch_token_groups,
                kv_buffer=_patch_kv_buffer,
            )
        if layout["cfg"] > 1:
            # a pipeline that calls each branch separately puts one per rank: the rank holding the
            # branch one device calls first ("cond") decides the step (names by rank: xfuser_cfg.py)
            engine.room.branch_name = cfg_branch_name(pipe_or_transformer, engine.clock, layout["cfg_rank"])
        if engine.samples is not None and layout["cfg"] > 1:
            # each rank holds one guidance branch: its row i is sample i (xfuser splits the
            # batched [uncond, cond] halves over the CFG ranks), and the reduction adds the branches
            engine.samples.branch_per_rank = True
        if engine.token_ctx is not None and layout["sp"] > 1:
            from xfuser.core.distributed import get_runtime_state, get_sp_group

            engine.token_ctx.gather = SequenceParallelGather(
                get_sp_group().device_group,
                text_split=lambda: bool(get_runtime_state().split_text_embed_in_sp),
            )
    return first


def calibrate_xdit(
    pipe_or_transformer: Any,
    run: Callable[[], Any] | Sequence[Callable[[], Any]],
    *,
    timeout_s: float = 300.0,
    **kwargs: Any,
) -> CalibrationResult:
    """:func:`~xslim_xdit.calibration.calibrate` under xDiT: call it on every rank, with the same
    runs (seeded inside each callable). Every rank profiles its shard, stage or branch; the
    profiles are reduced exactly (the same bytes everywhere), the closed-loop errors are those of
    the rank that holds the pipeline's output, so every rank returns the same result (its JSON is
    the single device's, within round-off). Write it from one rank (the examples: global rank 0).

    PipeFusion is calibrated in its synchronous phase only (one patch, or xDiT's warm-up covering
    every step); the asynchronous phase raises ``NotImplementedError``. ``kwargs`` are
    :func:`~xslim_xdit.calibration.calibrate`'s.

    Example:
        >>> result = calibrate_xdit(xfuser_pipe, [run_seed_0, run_seed_1], target_speedup=2.0)  # doctest: +SKIP
        >>> if torch.distributed.get_rank() == 0:  # doctest: +SKIP
        ...     result.save("flux.json")
    """
    from ..calibration import calibrate

    if "enable" in kwargs:
        raise TypeError("calibrate_xdit sets enable= itself (enable_xslim_xdit); drop it")
    return calibrate(
        pipe_or_transformer, run, enable=functools.partial(enable_xslim_xdit, timeout_s=timeout_s), **kwargs
    )


class XSlimXFuserWrapper(XSlimPipelineWrapper):
    """:class:`~xslim_xdit.XSlimPipelineWrapper` for xFuser pipelines: decisions agree across
    the generation's ranks (sequence, CFG) and data-parallel replicas decide alone.

    Example:
        >>> pipe = XSlimXFuserWrapper(xfuser_pipe, XSlimConfig.from_preset("flux-fast"))  # doctest: +SKIP
    """

    def enable_xslim(self, config: XSlimConfig | None = None, **kwargs: Any) -> XSlimEngine:
        self.engine = enable_xslim_xdit(self.pipe, config or XSlimConfig(), **kwargs)
        return self.engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        # A run that ended early (an interrupt, a callback) never reached its last step: its
        # watchdog deadline must not outlive the pipeline call. After an exception it stays
        # armed, so that the exit guard bounds the exit of a process the failure ends.
        for engine in get_engines(self.pipe).values():
            watchdog_disarm(engine)
        return out

    def disable_xslim(self) -> None:
        for engine in get_engines(self.pipe).values():
            watchdog_disarm(engine)
        super().disable_xslim()
