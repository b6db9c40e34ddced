"""Two-expert pipelines (Wan 2.2 A14B): which transformers X-Slim attaches to, and what their
engines share and hand over.

``WanPipeline`` calls ``transformer`` while the timestep is at or above ``boundary_ratio *
num_train_timesteps``, then ``transformer_2``. :func:`~xslim_xdit.api.enable_xslim` gives each
transformer :func:`expert_transformers` names an engine of its own; this module holds what that
needs below the entry points: the transformers by pipeline attribute, a calibration result's
check that it was made on transformers of the same names, the second engine's copy of the
rank-agreement object, and the switch step's release of the first expert's caches
(:func:`release_caches`).

Example:
    >>> from xslim_xdit.testing import tiny_model
    >>> list(expert_transformers(tiny_model("dit")))  # a bare transformer: one expert
    ['transformer']
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from .config import ConfigError, XSlimConfig
from .engine import XSlimEngine
from .parallel.sync import DecisionSync

#: Pipeline attributes of transformers run after ``transformer`` in the same denoising loop, each
#: given an engine of its own: Wan 2.2 A14B's low-noise expert (``WanPipeline`` calls
#: ``transformer`` while the timestep is at or above ``boundary_ratio * num_train_timesteps``,
#: then ``transformer_2``). Two models have different activations, so nothing cached by one may
#: stand in for the other.
EXPERT_ATTRS = ("transformer_2",)


def split_pipeline(pipe_or_transformer: Any) -> tuple[Any, nn.Module]:
    """``(pipeline, transformer)`` of a pipeline, ``(None, transformer)`` of a bare transformer
    (the module ``torch.compile`` wrapped, if it did)."""
    if isinstance(pipe_or_transformer, nn.Module) and not hasattr(pipe_or_transformer, "scheduler"):
        return None, uncompiled(pipe_or_transformer)
    transformer = getattr(pipe_or_transformer, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise TypeError(
            "pipe_or_transformer must be a diffusers/xDiT pipeline with a `transformer` component or a "
            f"transformer module; got {type(pipe_or_transformer).__name__}"
        )
    return pipe_or_transformer, uncompiled(transformer)


def expert_transformers(pipe_or_transformer: Any) -> dict[str, nn.Module]:
    """The transformers X-Slim attaches to, by pipeline attribute, in the order the pipeline runs
    them: ``{"transformer": ...}``, plus ``"transformer_2"`` on a two-expert pipeline (Wan 2.2
    A14B); a bare transformer is ``{"transformer": model}``.

    Example:
        >>> from xslim_xdit.testing import tiny_model
        >>> list(expert_transformers(tiny_model("dit")))
        ['transformer']
    """
    pipe, transformer = split_pipeline(pipe_or_transformer)
    found = {"transformer": transformer}
    for attr in EXPERT_ATTRS if pipe is not None else ():
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module) and uncompiled(module) is not transformer:
            found[attr] = uncompiled(module)
    return found


def uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped, if it did: X-Slim attaches to the module itself, and
    the compiled wrapper traces through its hooks and block wrappers when it is called."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def calibrated_config(result: Any, pipe_or_transformer: Any) -> XSlimConfig:
    """The schedule config of a calibration result (a
    :class:`~xslim_xdit.calibration.CalibrationResult`), after checking that it was calibrated on
    transformers of the same names (a two-expert result on a two-expert pipeline)."""
    names = list(result.expert_names)
    have = list(expert_transformers(pipe_or_transformer))
    if names and names != have:
        raise ConfigError(
            f"this calibration was made on a pipeline whose run {', '.join(names)} serve(s); this one has "
            f"{', '.join(have)}: calibrate this pipeline, or pass result.config() to apply the schedule anyway"
        )
    return result.config()


def chain(*calls: Callable[[], None] | None) -> Callable[[], None]:
    """One callable that makes ``calls`` in order (``None`` s left out): an engine's
    ``before_call`` and the release of the experts before it."""
    live = [c for c in calls if c is not None]

    def run() -> None:
        for c in live:
            c()

    return run


def release_before(earlier: list[XSlimEngine]) -> Callable[[], None]:
    """Before a later expert's call: free the caches the earlier experts still hold (once per run:
    nothing is left after the first time)."""
    refs = [weakref.ref(e) for e in earlier]

    def release() -> None:
        for ref in refs:
            eng = ref()
            if eng is not None:
                release_caches(eng)

    return release


def release_caches(engine: XSlimEngine) -> int:
    """Free every tensor ``engine`` caches for its current run (stack and block residuals, token
    history, probe, token refresh's K/V, per-sample rows), keeping the run itself (step count,
    controller, statistics): a later call of this run finds nothing cached and runs in full.
    Returns the bytes freed (:meth:`~xslim_xdit.engine.XSlimEngine.cache_bytes`).

    At the switch step of a two-expert run the later expert's engine calls it on the earlier
    ones (:func:`release_before`): they have run their last step, and the run holds one expert's
    caches at a time.

    Example:
        >>> from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
        >>> from xslim_xdit.testing import tiny_model, sample
        >>> m = tiny_model("dit")
        >>> eng = enable_xslim(m, XSlimConfig(warmup_steps=1), num_inference_steps=3)
        >>> _ = sample(m, "dit", steps=3)
        >>> release_caches(eng) > 0, sum(eng.cache_bytes().values())
        (True, 0)
        >>> disable_xslim(m)
    """
    held = sum(engine.cache_bytes().values())
    if not held:
        return 0
    engine.branches.clear()
    if engine.token_ctx is not None:
        engine.token_ctx.kv.clear()
        engine.token_ctx.index = engine.token_ctx.flat = None
    if engine.samples is not None:
        engine.samples.branches.clear()
    return held


def own_copy(sync: DecisionSync) -> DecisionSync:
    """``sync`` for a second expert: the same group of ranks, counters of its own (each engine's
    statistics report the collectives it made)."""
    clone = copy.copy(sync)
    clone.reset_counters()
    return clone


__all__ = [
    "EXPERT_ATTRS",
    "calibrated_config",
    "chain",
    "expert_transformers",
    "own_copy",
    "release_before",
    "release_caches",
    "split_pipeline",
    "uncompiled",
]
