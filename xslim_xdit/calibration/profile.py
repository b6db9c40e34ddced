"""Profiling: the calibration runs, each in full with the engine recording, and their outputs.

All of calibration's contact with the engine is :func:`_replay` (enable, run, read the final
output and the recorded profile, disable); everything else in :mod:`xslim_xdit.calibration`
works on what it returns. The enabling itself is :mod:`xslim_xdit.api`'s, which sits above
calibration: it hands its functions in as an :class:`EngineAccess` when it is imported
(:func:`register_engine_access`; importing :mod:`xslim_xdit` imports it), and a caller under
xDiT passes its own ``enable``.

Example:
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> p = profile_runs(m, [lambda: sample(m, "dit", steps=4)], num_inference_steps=4)
    >>> p.num_steps, p.num_runs, tuple(p.references[0].shape)
    (4, 1, (1, 4, 8, 8))
    >>> sorted(p.profiles[0][1])[:3]
    ['block_magnitudes', 'gram_row', 'kind']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, XSlimConfig
from ..experts import expert_transformers
from ..observers import ProfileRecorder
from ..parallel.sync import DecisionSync, LocalSync

#: attaches the engine: :func:`~xslim_xdit.api.enable_xslim` (one device) or
#: :func:`~xslim_xdit.integrations.xfuser.enable_xslim_xdit` (xDiT); called as
#: ``enable(pipe, config, num_inference_steps=..., observers=[...], record=...)``
Enable = Callable[..., Any]


@dataclass(frozen=True)
class EngineAccess:
    """What calibration needs of the layer that attaches engines (:mod:`xslim_xdit.api`)."""

    #: the default ``enable`` (:func:`~xslim_xdit.api.enable_xslim`)
    enable: Enable
    #: removes every engine of a pipeline or transformer (:func:`~xslim_xdit.api.disable_xslim`)
    disable: Callable[[Any], None]
    #: the engines attached, by pipeline attribute (:func:`~xslim_xdit.api.get_engines`)
    engines: Callable[[Any], dict[str, Any]]


_engine_access: list[EngineAccess] = []


def register_engine_access(access: EngineAccess) -> None:
    """Hand calibration the functions that attach and remove engines (called by
    :mod:`xslim_xdit.api` at import: calibration cannot import the module above it)."""
    _engine_access[:] = [access]


def _access(enable: Enable | None) -> EngineAccess:
    """The registered :class:`EngineAccess`, its ``enable`` replaced by ``enable`` when given."""
    if not _engine_access:
        raise RuntimeError("calibration needs xslim_xdit.api imported (import xslim_xdit) to attach engines")
    access = _engine_access[0]
    return access if enable is None else EngineAccess(enable, access.disable, access.engines)


#: One step of a profile: ``step``, ``kind``, ``probe_change``, ``residual_change``,
#: ``block_magnitudes``, ``gram_row`` (see :func:`~xslim_xdit.calibration.plan.profile_gram`).
ProfileRow = dict[str, Any]


@dataclass
class Profiles:
    """What the calibration runs recorded: one profile (a list of :data:`ProfileRow`, one per
    transformer call) and one reference final output (``None`` when the run returned nothing
    image-like and the transformer had no output either) per run, in the order of the runs."""

    profiles: list[list[ProfileRow]]
    references: list[torch.Tensor | None]
    #: where the ranks of the generation agree (the profiling engine's; one device: LocalSync)
    sync: DecisionSync = field(default_factory=LocalSync)
    #: every reference is the run's own return value on this rank (not the transformer's last
    #: output: e.g. PipeFusion's earlier stages, which return nothing)
    holds_output: bool = True
    #: the transformers that served the run, in run order, each ``(name, start, end)``: its steps
    #: ``start .. end - 1`` (one entry for one transformer; Wan 2.2 A14B's two experts: two)
    experts: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def segments(self) -> list[tuple[int, int]] | None:
        """Each transformer's ``[start, end)`` steps when several served the run, else ``None``."""
        return [(a, b) for _, a, b in self.experts] if len(self.experts) > 1 else None

    @property
    def num_steps(self) -> int:
        """Transformer calls per run (the runs agree)."""
        return len(self.profiles[0])

    @property
    def num_runs(self) -> int:
        return len(self.profiles)


def profile_runs(
    pipe_or_transformer: Any,
    runs: Sequence[Callable[[], Any]],
    num_inference_steps: int | None,
    enable: Enable | None = None,
) -> Profiles:
    """Run each calibration callable once in full with the engine recording; returns their
    profiles and final outputs (see the module example). ``enable`` attaches the engine
    (default :func:`~xslim_xdit.api.enable_xslim`; under xDiT
    :func:`~xslim_xdit.integrations.xfuser.enable_xslim_xdit`, on every rank: each profile is then
    reduced over the ranks, the same on every rank).

    A pipeline with two experts (Wan 2.2 A14B's ``transformer`` and ``transformer_2``) is profiled
    over the whole run: both engines record into one profile, every row names its expert
    (``"expert"``) and :attr:`Profiles.experts` says which steps each served.

    Raises ``RuntimeError`` when a run never calls the transformer, and
    :class:`~xslim_xdit.config.ConfigError` when the runs made different numbers of calls, or
    switched experts at different steps (or back and forth).
    """
    if enable is None:
        refuse_unshared_ranks(pipe_or_transformer)
    profiles: list[list[ProfileRow]] = []
    references: list[torch.Tensor | None] = []
    holds = True
    sync: DecisionSync = LocalSync()
    experts: list[list[tuple[str, int, int]]] = []
    for r in runs:
        out = _replay(pipe_or_transformer, None, r, num_inference_steps, profile=True, enable=enable)
        if not out.profile:
            raise RuntimeError("calibration run called the transformer no time: check `run`")
        profiles.append(out.profile)
        references.append(out.final)
        experts.append(out.experts)
        holds = holds and out.from_run
        sync = out.sync
    n = len(profiles[0])
    if any(len(p) != n for p in profiles):
        raise ConfigError(
            f"the calibration runs made {[len(p) for p in profiles]} transformer calls: they must agree"
        )
    if any(e != experts[0] for e in experts):
        raise ConfigError(
            f"the calibration runs switched transformers at different steps ({experts}): they must agree "
            "(same step count and boundary)"
        )
    return Profiles(profiles, references, sync, holds, experts[0])


def expert_segments(engines: dict[str, Any], num_steps: int) -> list[tuple[str, int, int]]:
    """Which steps of the last run each engine served (first guidance branch), as
    ``[(name, start, end), ...]`` in run order; only engines that ran. A run whose experts do not
    each serve one contiguous block of steps, together covering ``0 .. num_steps - 1``, is
    refused with a :class:`~xslim_xdit.config.ConfigError` (a schedule could not tell whose
    step is whose).

    Example:
        >>> class E:
        ...     def __init__(self, steps):
        ...         self.statistics = type("S", (), {"run_records": lambda s: [
        ...             type("R", (), {"step": i, "branch": 0})() for i in steps]})()
        >>> expert_segments({"transformer": E([0, 1]), "transformer_2": E([2, 3, 4])}, 5)
        [('transformer', 0, 2), ('transformer_2', 2, 5)]
    """
    found = []
    for name, eng in engines.items():
        steps = sorted({r.step for r in eng.statistics.run_records() if r.branch == 0})
        if steps:
            found.append((name, steps))
    found.sort(key=lambda e: e[1][0])
    out, expect = [], 0
    for name, steps in found:
        if steps != list(range(steps[0], steps[-1] + 1)) or steps[0] != expect:
            raise ConfigError(
                f"calibration: {name} served steps {steps}; each transformer of the pipeline must serve one "
                "contiguous block of the run's steps (Wan 2.2: transformer, then transformer_2)"
            )
        out.append((name, steps[0], steps[-1] + 1))
        expect = steps[-1] + 1
    if expect != num_steps:
        raise ConfigError(f"calibration: the transformers served steps 0 .. {expect - 1} of {num_steps}")
    return out


def refuse_unshared_ranks(pipe_or_transformer: Any) -> None:
    """An xfuser model on several ranks, profiled with the single-device ``enable_xslim``: each rank
    would plan from its own shard (or stage) and the ranks could replay different schedules, which
    hangs xfuser's collectives. Refused with a :class:`~xslim_xdit.config.ConfigError`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    modules = [pipe_or_transformer, *expert_transformers(pipe_or_transformer).values()]
    if any(type(m).__module__.split(".")[0] == "xfuser" for m in modules):
        raise ConfigError(
            "calibrate on an xfuser model with several ranks needs enable=enable_xslim_xdit (or "
            "xslim_xdit.integrations.xfuser.calibrate_xdit), so that the ranks reduce one profile and "
            "pick one plan; the single-device enable_xslim would profile each rank's shard alone"
        )


def replay_schedule(
    pipe_or_transformer: Any,
    config: XSlimConfig,
    run: Callable[[], Any],
    num_inference_steps: int | None,
    enable: Enable | None = None,
) -> torch.Tensor | None:
    """Run ``run`` once with X-Slim enabled under ``config`` (e.g. a schedule to check); returns
    its final output (:func:`_final_output`)."""
    return _replay(pipe_or_transformer, config, run, num_inference_steps, profile=False, enable=enable).final


@dataclass
class _Replayed:
    profile: list[ProfileRow] | None
    final: torch.Tensor | None
    from_run: bool
    sync: DecisionSync
    experts: list[tuple[str, int, int]] = field(default_factory=list)


def _replay(
    pipe_or_transformer: Any,
    config: XSlimConfig | None,
    run: Callable[[], Any],
    num_inference_steps: int | None,
    *,
    profile: bool,
    enable: Enable | None = None,
) -> _Replayed:
    """Run ``run`` once with X-Slim enabled (by ``enable``, default
    :func:`~xslim_xdit.api.enable_xslim`), then disable it: under ``config``, or, with
    ``profile`` (``config`` is then ``None``), every step full with the engine recording.
    Returns the recorded profile (``None`` unless ``profile``; reduced over the ranks, after the
    run), the run's final output (:func:`_final_output`), and the engine's sync.

    The only function of :mod:`xslim_xdit.calibration` that touches the engine (through the
    registered :class:`EngineAccess`).
    """
    observers: list[ProfileRecorder] = []
    if profile:
        # The recording mode: every step full, indicators and block statistics measured.
        config, observers = XSlimConfig(), [ProfileRecorder()]
    if config is None:
        raise ValueError("_replay: pass a config to replay under, or profile=True")
    access = _access(enable)
    engine = access.enable(
        pipe_or_transformer,
        config,
        num_inference_steps=num_inference_steps,
        observers=observers,
        record=profile,
    )
    try:
        engines = _engines_of(access, pipe_or_transformer, engine)
        models = [e.model for e in engines.values()]
        final, from_run = _final_output(models, run)
        # after the run, on every rank: the reduction is collective (never inside the forward)
        rows = observers[0].finish() if profile else None
        experts: list[tuple[str, int, int]] = []
        if rows:
            experts = expert_segments(engines, len(rows))
            for name, a, b in experts if len(experts) > 1 else ():
                for row in rows[a:b]:
                    row["expert"] = name  # which transformer computed this step
        if engine.pipeline is not None:
            engine.pipeline.close()  # the decision messages' sends are complete
        return _Replayed(rows, final, from_run, engine.sync, experts)
    finally:
        access.disable(pipe_or_transformer)


def _engines_of(access: EngineAccess, pipe_or_transformer: Any, engine: Any) -> dict[str, Any]:
    """The engines attached for a replay, by pipeline attribute (``engine``, the one ``enable``
    returned, alone when the pipeline's transformers cannot be read back)."""
    try:
        engines = access.engines(pipe_or_transformer)
    except TypeError:
        engines = {}
    return engines if any(e is engine for e in engines.values()) else {"transformer": engine}


def _final_output(models: Any, run: Callable[[], Any]) -> tuple[torch.Tensor | None, bool]:
    """Run ``run`` and return its output as a tensor (a tensor, an array, a list of images or
    arrays, or an object with ``.images``), else the first tensor of the last output of the
    ``models`` (one module, or a list: a two-expert pipeline's transformers; ``None`` if neither
    exists); and whether it is the run's own output."""
    box: list[torch.Tensor | None] = [None]

    def hook(_m: Any, _a: Any, out: Any) -> None:
        while not isinstance(out, torch.Tensor):
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            elif hasattr(out, "sample"):
                out = out.sample
            else:
                return
        box[0] = out.detach().clone()

    handles = [m.register_forward_hook(hook) for m in (models if isinstance(models, list) else [models])]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    final = _as_tensor(result)
    return (final, True) if final is not None else (box[0], False)


def _as_tensor(obj: Any) -> torch.Tensor | None:
    """A pipeline's output as a float64 tensor, or ``None`` when it is nothing image-like."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64).cpu()
    if hasattr(obj, "images"):
        return _as_tensor(obj.images)
    if hasattr(obj, "frames"):
        return _as_tensor(obj.frames)
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):  # numpy arrays, PIL images
        try:
            return torch.from_numpy(np.asarray(obj, dtype=np.float64).copy())
        except (TypeError, ValueError):
            return None
    if isinstance(obj, (tuple, list)) and obj:
        parts = [_as_tensor(x) for x in obj]
        if all(p is not None for p in parts) and len({p.shape for p in parts}) == 1:  # type: ignore[union-attr]
            return torch.stack(parts)  # type: ignore[arg-type]
        return parts[0]
    return None
