"""The user-facing entry points: one call to enable, one to disable, and a pipeline wrapper.

What a two-expert pipeline (Wan 2.2 A14B) needs beneath them, its transformers by attribute and
the switch step's cache release, is :mod:`xslim_xdit.experts` (``EXPERT_ATTRS``,
``expert_transformers`` and ``release_caches`` import from here too).

Example:
    >>> from xslim_xdit import enable_xslim, disable_xslim, XSlimConfig
    >>> engine = enable_xslim(pipe, XSlimConfig.from_preset("flux-fast"))  # doctest: +SKIP
    >>> image = pipe("a photo of a cat", num_inference_steps=50).images[0]  # doctest: +SKIP
    >>> print(engine.statistics.table())  # doctest: +SKIP
    >>> disable_xslim(pipe)  # doctest: +SKIP
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .calibration.profile import EngineAccess, register_engine_access
from .compiled import refuse_whole_graph
from .config import ConfigError, XSlimConfig
from .engine import XSlimEngine, XSlimRuntimeError
from .experts import (
    EXPERT_ATTRS,
    calibrated_config,
    chain,
    expert_transformers,
    own_copy,
    release_before,
    release_caches,
    split_pipeline,
)
from .hooks import SchedulerHooks, inner_scheduler, is_wrapped_scheduler
from .observers import EngineObserver
from .parallel.sync import DecisionSync
from .stats import CacheStatistics

_ENGINE_ATTR = "_xslim_engine"


def enable_xslim(
    pipe_or_transformer: Any,
    config: XSlimConfig | None = None,
    *,
    num_inference_steps: int | None = None,
    sync: DecisionSync | None = None,
    count_flops: bool = True,
    observers: Sequence[EngineObserver] = (),
    record: bool = False,
) -> XSlimEngine:
    """Turn X-Slim on for a pipeline (or a bare transformer) and return its engine.

    On a pipeline, the scheduler tells the engine where the run is: ``set_timesteps`` starts a
    run (every cache cleared) of ``len(scheduler.timesteps)`` steps (from its begin index on, for
    img2img and inpainting with ``strength < 1``), and each ``step()`` call ends
    a step, so a Heun-type scheduler's two evaluations per step are two steps, and the calls
    between two ``step()`` calls are guidance branches (named by diffusers' ``cache_context``
    where the pipeline sets one). On a bare transformer pass ``num_inference_steps`` (or call
    ``engine.start_run(n)`` before each run); steps are then told apart by their timesteps
    (:mod:`xslim_xdit.clock`). Everything is validated before anything is patched.

    Enabling again on the same pipeline (or transformer) replaces its engine. A transformer has
    one engine: enabling on a second pipeline that shares it raises :class:`XSlimRuntimeError`
    (disable it on the first one, or give each pipeline its own transformer). Replacing
    ``pipe.scheduler`` later is noticed at the next transformer call: the new scheduler is hooked
    and a clean run of ``len(scheduler.timesteps)`` steps starts there.

    A pipeline with a second expert (Wan 2.2 A14B's ``transformer_2``, see
    :data:`~xslim_xdit.experts.EXPERT_ATTRS`) gets one engine per transformer, each with its own caches, controller
    and statistics, all under ``config``; the engine of ``transformer`` is returned,
    :func:`get_engines` gives both and :meth:`CacheStatistics.combined` one view of the run.

    When the second expert is first called (the switch step), the caches of the first are freed
    (:func:`~xslim_xdit.experts.release_caches`): that expert has run its last step, and the run holds one expert's
    caches at a time. Should the pipeline call it again, it finds nothing cached and runs in full.

    Args:
        pipe_or_transformer: a diffusers or xDiT pipeline, or a supported transformer.
        config: an :class:`XSlimConfig` (default: the online controller with its defaults), or a
            :class:`~xslim_xdit.calibration.CalibrationResult` (its schedule, as
            :meth:`~xslim_xdit.calibration.CalibrationResult.config` gives it; one calibrated on a
            two-expert pipeline applies to both experts, and is refused on a pipeline whose
            transformers are others).
        num_inference_steps: steps per run for a bare transformer.
        sync: where ranks agree; default single-device (see :mod:`xslim_xdit.parallel`). A
            second expert gets a copy (same group, its own counters).
        count_flops: record FLOPs in the statistics (measured once per call shape).
        observers: more :class:`~xslim_xdit.observers.EngineObserver` s to notify (on a
            two-expert pipeline, by both engines; each callback is passed its engine).
        record: every step full, indicators and block statistics still measured (calibration).

    Example:
        >>> import torch
        >>> from diffusers import DiTTransformer2DModel
        >>> m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, num_embeds_ada_norm=10)
        >>> engine = enable_xslim(m, XSlimConfig(), num_inference_steps=10)
        >>> engine.start_run(10)  # optional: where a bare transformer's run starts, never guessed
        >>> disable_xslim(m)
    """
    config = XSlimConfig() if config is None else config
    if _is_calibration(config):
        config = calibrated_config(config, pipe_or_transformer)
    if not isinstance(config, XSlimConfig):
        raise TypeError(f"config must be an XSlimConfig or a CalibrationResult; got {type(config).__name__}")
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ConfigError(f"num_inference_steps must be None or an integer >= 1; got {num_inference_steps!r}")
    if sync is not None and not isinstance(sync, DecisionSync):
        raise ConfigError(
            f"sync must be None or a DecisionSync (xslim_xdit.parallel: LocalSync, GroupSync); got {sync!r}"
        )
    if not isinstance(observers, (list, tuple)) or not all(isinstance(o, EngineObserver) for o in observers):
        raise ConfigError(
            f"observers must be a list of EngineObserver (xslim_xdit.observers); got {observers!r}"
        )
    pipe, transformer = split_pipeline(pipe_or_transformer)
    refuse_whole_graph(
        [pipe_or_transformer]
        if pipe is None
        else [getattr(pipe, a, None) for a in ("transformer", *EXPERT_ATTRS)]
    )
    owner = pipe if pipe is not None else transformer
    models = expert_transformers(pipe_or_transformer)
    existing = [getattr(m, _ENGINE_ATTR, None) for m in models.values()]
    for eng in existing:
        if eng is not None:
            _check_same_owner(eng, owner)
    if any(eng is not None for eng in existing):
        disable_xslim(pipe_or_transformer)
    # Every engine is built (adapter found, config checked) before any is attached: a second
    # expert that cannot be served leaves the pipeline untouched.
    engines = [
        XSlimEngine(
            model,
            config,
            sync=sync if i == 0 or sync is None else own_copy(sync),
            num_inference_steps=num_inference_steps,
            count_flops=count_flops,
            observers=observers,
            record=record,
        )
        for i, model in enumerate(models.values())
    ]
    for model, engine in zip(models.values(), engines, strict=True):
        engine.owner = _weak(owner)
        engine.attach()
        setattr(model, _ENGINE_ATTR, engine)
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            # Each expert follows the shared scheduler itself: a run starts for both at
            # set_timesteps and the step index is the pipeline's, so the second expert's first
            # call (the switch step) finds its caches empty and runs in full.
            _hook_scheduler(engine, pipe.scheduler)
            engine.before_call = _scheduler_check(engine, _weak(pipe))
    for i, engine in enumerate(engines[1:], start=1):
        # the switch: the experts before this one have run their last step of the run
        engine.before_call = chain(engine.before_call, release_before(engines[:i]))
    return engines[0]


def _is_calibration(config: Any) -> bool:
    from .calibration.result import CalibrationResult

    return isinstance(config, CalibrationResult)


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference where the object allows one: a pipeline is kept alive by its own users,
    not by the engine on a transformer it may share."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _describe(obj: Any) -> str:
    return f"{type(obj).__name__} at {hex(id(obj))}"


def _check_same_owner(engine: XSlimEngine, owner: Any) -> None:
    """One engine per transformer: enabling through another pipeline would silently run the
    first pipeline with the second one's config (and with no hook on its scheduler)."""
    previous = engine.owner()
    if previous is None or previous is owner:
        return
    raise XSlimRuntimeError(
        f"X-Slim is already enabled on this transformer through {_describe(previous)}; enabling it "
        f"through {_describe(owner)} would run the first with this config. A transformer has one "
        f"engine: call disable_xslim on the {type(previous).__name__} first, or give each pipeline "
        "its own transformer"
    )


def _hook_scheduler(engine: XSlimEngine, scheduler: Any) -> None:
    """Tell ``engine`` the runs (``set_timesteps``) and steps (``step``) of ``scheduler``."""
    # xfuser's scheduler wrappers step once per PipeFusion patch: there the timestep tells
    # the steps apart (the fallback); diffusers' schedulers step once per step.
    driven = not is_wrapped_scheduler(scheduler)
    engine.clock.follow_scheduler(driven)
    transformer = engine.model

    def on_timesteps(sched: Any) -> None:
        eng = getattr(transformer, _ENGINE_ATTR, None)
        if eng is not None:
            _start_scheduled_run(eng, sched)

    engine.scheduler_hooks = SchedulerHooks(
        inner_scheduler(scheduler), on_timesteps, engine.clock.step_done if driven else None
    )


def steps_to_run(scheduler: Any) -> int:
    """The transformer steps a run makes: the scheduler's timesteps from its begin index on
    (img2img and inpainting with ``strength < 1`` start part-way down).

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> s = FlowMatchEulerDiscreteScheduler()
        >>> s.set_timesteps(10)
        >>> s.set_begin_index(4)
        >>> steps_to_run(s)
        6
    """
    begin = getattr(scheduler, "begin_index", None)
    return len(scheduler.timesteps) - (int(begin) if begin is not None else 0)


def _start_scheduled_run(engine: XSlimEngine, scheduler: Any) -> None:
    """A clean run of the steps ``scheduler`` will make (also the default for later runs)."""
    engine.default_steps = steps_to_run(scheduler)
    engine.start_run(engine.default_steps)


def _scheduler_check(engine: XSlimEngine, pipe_ref: Callable[[], Any]) -> Callable[[], None]:
    """Before each transformer call: if ``pipe.scheduler`` was replaced since it was hooked, the
    engine is no longer told the steps: hook the new one and start a clean run of its steps.

    On a two-expert pipeline the first expert's call notices it for both: the second expert,
    called only from the switch step on, would otherwise count the new scheduler's steps from
    there (its step indices, and its forced last step, off by the first expert's steps)."""

    def check() -> None:
        pipe = pipe_ref()
        hooks = engine.scheduler_hooks
        scheduler = getattr(pipe, "scheduler", None)
        if pipe is None or hooks is None or scheduler is None:
            return
        if inner_scheduler(scheduler) is hooks.scheduler:
            return
        stale = [e for e in get_engines(pipe).values() if e.scheduler_hooks is not None] or [engine]
        for eng in reversed(stale):  # unwrapped in the reverse order of wrapping
            eng.scheduler_hooks.remove()
        for eng in stale:
            _hook_scheduler(eng, scheduler)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            raise XSlimRuntimeError(
                f"pipe.scheduler was replaced by a {type(scheduler).__name__} whose timesteps are not "
                "set: X-Slim cannot tell the run's steps; call scheduler.set_timesteps first"
            )
        for eng in stale:
            _start_scheduled_run(eng, inner_scheduler(scheduler))

    return check


def disable_xslim(pipe_or_transformer: Any) -> None:
    """Remove X-Slim: the model, its hooks and the scheduler are restored exactly.

    Example:
        >>> disable_xslim(pipe)  # doctest: +SKIP
    """
    # The last expert first: each wrapped the scheduler's methods over the previous one's
    # wrapper, so the wrappers come off in reverse order and the scheduler ends as it was.
    for transformer in reversed(list(expert_transformers(pipe_or_transformer).values())):
        engine = getattr(transformer, _ENGINE_ATTR, None)
        if engine is None:
            continue
        engine.detach()
        engine.before_call = None
        delattr(transformer, _ENGINE_ATTR)
        hooks = getattr(engine, "scheduler_hooks", None)
        if hooks is not None:
            hooks.remove()
            engine.scheduler_hooks = None


def get_engine(pipe_or_transformer: Any) -> XSlimEngine | None:
    """The engine attached to a pipeline or transformer, if any."""
    _, transformer = split_pipeline(pipe_or_transformer)
    return getattr(transformer, _ENGINE_ATTR, None)


def get_engines(pipe_or_transformer: Any) -> dict[str, XSlimEngine]:
    """Every engine attached to a pipeline's transformers, by pipeline attribute
    (``{"transformer": ..., "transformer_2": ...}`` on Wan 2.2 A14B).

    Example:
        >>> from xslim_xdit.testing import tiny_model
        >>> m = tiny_model("dit")
        >>> _ = enable_xslim(m, num_inference_steps=4)
        >>> list(get_engines(m))
        ['transformer']
        >>> disable_xslim(m)
    """
    engines = {}
    for attr, model in expert_transformers(pipe_or_transformer).items():
        engine = getattr(model, _ENGINE_ATTR, None)
        if engine is not None:
            engines[attr] = engine
    return engines


# calibration (below this module, which it cannot import) attaches its profiling engines through these
register_engine_access(EngineAccess(enable=enable_xslim, disable=disable_xslim, engines=get_engines))


class XSlimPipelineWrapper:
    """Wrap a diffusers or xDiT pipeline, in the style of xDiT's pipeline wrappers.

    Attribute access falls through to the wrapped pipeline.

    Example:
        >>> wrapped = XSlimPipelineWrapper(pipe)  # doctest: +SKIP
        >>> wrapped.enable_xslim(XSlimConfig(warn=0.1, crit=0.3))  # doctest: +SKIP
        >>> out = wrapped(prompt="a cat", num_inference_steps=28)  # doctest: +SKIP
        >>> print(wrapped.get_cache_statistics().table())  # doctest: +SKIP
    """

    def __init__(self, pipe: Any, config: XSlimConfig | None = None) -> None:
        self.pipe = pipe
        self.engine: XSlimEngine | None = None
        if config is not None:
            self.enable_xslim(config)

    def enable_xslim(self, config: XSlimConfig | None = None, **kwargs: Any) -> XSlimEngine:
        self.engine = enable_xslim(self.pipe, config, **kwargs)
        return self.engine

    def disable_xslim(self) -> None:
        disable_xslim(self.pipe)
        self.engine = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipe(*args, **kwargs)

    def get_cache_statistics(self) -> CacheStatistics:
        if self.engine is None:
            raise RuntimeError("X-Slim is not enabled on this pipeline: call enable_xslim(config) first")
        engines = get_engines(self.pipe)
        if len(engines) > 1:  # two experts: their last runs as one run, in step order
            return CacheStatistics.combined({k: e.statistics for k, e in engines.items()})
        return self.engine.statistics

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)


__all__ = [
    "EXPERT_ATTRS",
    "XSlimPipelineWrapper",
    "disable_xslim",
    "enable_xslim",
    "expert_transformers",
    "get_engine",
    "get_engines",
    "release_caches",
    "steps_to_run",
]
