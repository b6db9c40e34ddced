"""Acceleration methods compared by the benchmark, each a small object that switches itself on and off.

Every method follows one life cycle, so that all of them run side by side in one process on the
same pipeline object:

1. :meth:`Method.prepare` once (e.g. X-Slim's calibration run); it raises :class:`MethodRefused`
   when the method cannot serve the testbed's model, with the reason (recorded in the report);
2. :meth:`Method.enable` before a generation, :meth:`Method.disable` right after it; after
   ``disable`` the pipeline is exactly the plain pipeline again (checked by the runner);
3. :meth:`Method.run_stats` after a generation: what the method itself reports (X-Slim's
   statistics, cache-dit's cached steps, ...).

Peers are used through their own installed code: diffusers' cache hooks
(``diffusers.hooks.apply_first_block_cache`` / ``apply_taylorseer_cache``), cache-dit's
``cache_dit.enable_cache`` with a ``BlockAdapter``, and xfuser's TeaCache where it applies.

Example:
    >>> m = FewerSteps(2)
    >>> m.num_steps(50)
    25
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import xslim_xdit
from xslim_xdit import XSlimConfig


class MethodRefused(RuntimeError):
    """The method cannot run on this testbed; the message says why (it goes into the report)."""


@dataclass
class Method:
    """Base class: the full computation (no acceleration).

    Attributes:
        name: unique label in tables and plots.
        family: group for plots and frontiers (``reference``, ``fewer-steps``, ``xslim-online`` ...).
        params: the settings, as recorded in ``results.json``.
        note: a remark for the report (e.g. how the method was configured on this model).
    """

    name: str = "full"
    family: str = "reference"
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def num_steps(self, steps: int) -> int:
        """Sampling steps this method runs when the reference runs ``steps``."""
        return steps

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        """One-time set-up before any timed run (may raise :class:`MethodRefused`)."""

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        """Switch the method on. ``measure=False`` for timed runs (no optional accounting)."""

    def disable(self, pipe: Any) -> None:
        """Switch the method off; the pipeline is the plain one again."""

    def run_stats(self) -> dict[str, Any]:
        """What the method reports about its last run (JSON-serialisable)."""
        return {}


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


class FewerSteps(Method):
    """Run ``steps // factor`` sampling steps: the equal-cost baseline every cache must beat."""

    def __init__(self, factor: float) -> None:
        super().__init__(name=f"steps/{factor:g}", family="fewer-steps", params={"factor": factor})
        self.factor = factor

    def num_steps(self, steps: int) -> int:
        return max(1, int(round(steps / self.factor)))


class _TransformerWrap(Method):
    """Helper: replaces ``transformer.forward`` with a wrapper (instance attribute) and resets per run.

    The pipeline's ``scheduler.set_timesteps`` marks the start of a run (as X-Slim does).
    """

    def _install(self, pipe: Any, wrapper: Any) -> None:
        tr = pipe.transformer
        self._had_forward = "forward" in tr.__dict__
        self._orig_forward = tr.forward
        tr.forward = functools.partial(wrapper, self._orig_forward)
        sched = pipe.scheduler
        self._orig_set_timesteps = sched.set_timesteps

        @functools.wraps(self._orig_set_timesteps)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = self._orig_set_timesteps(*args, **kwargs)
            self._new_run(len(sched.timesteps))
            return out

        sched.set_timesteps = set_timesteps

    def _uninstall(self, pipe: Any) -> None:
        tr = pipe.transformer
        if self._had_forward:
            tr.forward = self._orig_forward
        elif "forward" in tr.__dict__:
            del tr.forward
        if "set_timesteps" in pipe.scheduler.__dict__:
            del pipe.scheduler.set_timesteps

    def _new_run(self, n: int) -> None:  # pragma: no cover - overridden
        pass


class UniformReuse(_TransformerWrap):
    """Compute the transformer every ``every`` steps and reuse its *output* in between.

    Steps ``0, N, 2N, ...`` and the last step are computed. With DDIM the reused output is the
    noise prediction (the scheduler still moves the latents with it).
    """

    def __init__(self, every: int) -> None:
        super().__init__(name=f"reuse-every-{every}", family="uniform-reuse", params={"every": every})
        self.every = every
        self._step = -1
        self._n = 0
        self._cached: Any = None
        self.computed: list[bool] = []

    def _new_run(self, n: int) -> None:
        self._step, self._n, self._cached, self.computed = -1, n, None, []

    def _forward(self, orig: Any, *args: Any, **kwargs: Any) -> Any:
        self._step += 1
        compute = self._cached is None or self._step % self.every == 0 or self._step == self._n - 1
        self.computed.append(compute)
        if compute:
            self._cached = orig(*args, **kwargs)
        return self._cached

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        self._install(pipe, self._forward)

    def disable(self, pipe: Any) -> None:
        self._uninstall(pipe)
        self._cached = None

    def run_stats(self) -> dict[str, Any]:
        return {"kinds": ["full" if c else "skip" for c in self.computed]}


# ---------------------------------------------------------------------------------------------
# diffusers hooks: First-Block-Cache and TaylorSeer
# ---------------------------------------------------------------------------------------------


class _DiffusersHook(_TransformerWrap):
    """A diffusers cache hook on the transformer.

    Models that inherit ``CacheMixin`` are switched on with ``transformer.enable_cache(config)``
    and pipelines wrap each call in ``transformer.cache_context(name)``. ``DiTTransformer2DModel``
    does not inherit ``CacheMixin`` (no ``enable_cache``), so the hook's public apply function is
    called on it directly, the cache context is set around each transformer call the way
    ``CacheMixin.cache_context`` sets it, and the hooks' state is reset at the start of each run.
    """

    hook_names: tuple[str, ...] = ()

    def _config(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _apply(self, transformer: nn.Module, config: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        from diffusers.hooks import HookRegistry

        tr = pipe.transformer
        config = self._config()
        self.used_enable_cache = hasattr(tr, "enable_cache")
        if self.used_enable_cache:
            tr.enable_cache(config)
        else:
            self._apply(tr, config)
            HookRegistry.check_if_exists_or_initialize(tr).invalidate_child_registries_cache()
        self._transformer = tr
        self._install(pipe, self._forward)

    def _new_run(self, n: int) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self._transformer).reset_stateful_hooks(recurse=True)

    def _forward(self, orig: Any, *args: Any, **kwargs: Any) -> Any:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self._transformer, CacheContext("cond_uncond"))
        try:
            return orig(*args, **kwargs)
        finally:
            _set_cache_context(self._transformer, None)

    def disable(self, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        self._uninstall(pipe)
        tr = pipe.transformer
        if self.used_enable_cache:
            tr.disable_cache()
            return
        registry = HookRegistry.check_if_exists_or_initialize(tr)
        for name in self.hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


class FirstBlockCache(_DiffusersHook):
    """diffusers' First-Block-Cache: skip the remaining blocks while block 0's residual changes
    (relative L1) by less than ``threshold``."""

    hook_names = ("fbc_leader_block_hook", "fbc_block_hook")

    def __init__(self, threshold: float) -> None:
        super().__init__(
            name=f"FBCache {threshold:g}", family="first-block-cache", params={"threshold": threshold}
        )
        self.threshold = threshold

    def _config(self) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)

    def _apply(self, transformer: nn.Module, config: Any) -> None:
        from diffusers.hooks import apply_first_block_cache

        apply_first_block_cache(transformer, config)


class TaylorSeer(_DiffusersHook):
    """diffusers' TaylorSeer: full computation every ``interval`` steps, Taylor extrapolation of
    the hooked modules' outputs in between.

    diffusers hooks, by default, the modules matching ``^transformer_blocks.*attn`` (full match):
    FLUX's ``attn``, but not DiT's ``attn1``, so on a DiT the default hooks nothing and the run
    is silently uncached. ``cache_identifiers`` therefore names DiT's attention and feed-forward
    modules (the features TaylorSeer's paper extrapolates on DiT); on models whose names match the
    default, the default is used.
    """

    hook_names = ("taylorseer_cache",)

    def __init__(self, interval: int, order: int = 1, warmup: int = 3) -> None:
        super().__init__(
            name=f"TaylorSeer N={interval} o={order}",
            family="taylorseer",
            params={"cache_interval": interval, "max_order": order, "disable_cache_before_step": warmup},
        )
        self.interval, self.order, self.warmup = interval, order, warmup
        self.identifiers: list[str] | None = None

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        import re

        from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

        names = [n for n, _ in pipe.transformer.named_modules()]
        default_hits = [n for n in names if any(re.fullmatch(p, n) for p in _TRANSFORMER_BLOCK_IDENTIFIERS)]
        if default_hits:
            self.identifiers = None
            return
        custom = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
        hits = [n for n in names if any(re.fullmatch(p, n) for p in custom)]
        if not hits:
            raise MethodRefused(
                "TaylorSeer's default module patterns match nothing in this model and no DiT-style "
                "attn1/ff modules were found"
            )
        self.identifiers = custom
        self.note = (
            "diffusers' default TaylorSeer patterns (^transformer_blocks.*attn) match no module of "
            "DiTTransformer2DModel (its attention is `attn1`); configured with cache_identifiers "
            f"{custom} ({len(hits)} modules)"
        )
        self.params["cache_identifiers"] = custom

    def _config(self) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup,
            max_order=self.order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=self.identifiers,
        )

    def _apply(self, transformer: nn.Module, config: Any) -> None:
        from diffusers.hooks import apply_taylorseer_cache

        apply_taylorseer_cache(transformer, config)


# ---------------------------------------------------------------------------------------------
# TeaCache (xfuser) and cache-dit DBCache
# ---------------------------------------------------------------------------------------------


class TeaCache(Method):
    """TeaCache where an implementation exists for the model.

    diffusers 0.42.1 ships no TeaCache hook and cache-dit 1.5.3 has none; xfuser 0.7.0's TeaCache
    (``xfuser.model_executor.cache.adapters.flux.apply_teacache``) patches FLUX's block lists only.
    On any other model the method is refused with that reason.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__(
            name=f"TeaCache {threshold:g}", family="teacache", params={"rel_l1_thresh": threshold}
        )

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        cls = type(pipe.transformer).__name__
        if not cls.startswith("Flux"):
            raise MethodRefused(
                f"no TeaCache implementation applies to {cls}: diffusers 0.42.1 has no TeaCache hook, "
                "cache-dit 1.5.3 has no TeaCache, and xfuser 0.7.0's apply_teacache "
                "(xfuser/model_executor/cache/adapters/flux.py) patches FluxTransformer2DModel only "
                "(and `import xfuser` raises 'No Accelerators' on a CPU-only machine)"
            )
        raise MethodRefused("xfuser TeaCache on FLUX is not wired into this runner yet")


class DBCache(Method):
    """cache-dit's DBCache through ``cache_dit.enable_cache``.

    cache-dit recognises pipelines by class-name prefix; a custom pipeline (here
    ``DigitsDiTPipeline``) is refused by ``enable_cache(pipe)`` and needs cache-dit's documented
    ``BlockAdapter`` route, which is used with cache-dit's own DiT settings (``Pattern_3``,
    ``DiTPatchFunctor``). cache-dit's defaults (``DBCacheConfig()``: Fn=8, Bn=0, threshold 0.08,
    8 warm-up steps) are tried first; where they are refused, the refusal is recorded, and the
    ``fn``/``threshold`` given here are used.
    """

    def __init__(self, fn: int | None = None, bn: int = 0, threshold: float | None = None) -> None:
        label = "defaults" if fn is None and threshold is None else f"F{fn}B{bn} {threshold:g}"
        super().__init__(
            name=f"DBCache {label}", family="dbcache", params={"Fn": fn, "Bn": bn, "threshold": threshold}
        )
        self.fn, self.bn, self.threshold = fn, bn, threshold
        self._summary: list[Any] = []

    def _cache_config(self) -> Any:
        import cache_dit

        kw: dict[str, Any] = {}
        if self.fn is not None:
            kw.update(Fn_compute_blocks=self.fn, Bn_compute_blocks=self.bn)
        if self.threshold is not None:
            kw["residual_diff_threshold"] = self.threshold
        return cache_dit.DBCacheConfig(**kw)

    def _adapter(self, pipe: Any) -> Any:
        from cache_dit import BlockAdapter, ForwardPattern

        name = type(pipe.transformer).__name__
        if name == "DiTTransformer2DModel":
            from cache_dit.caching.patch_functors import DiTPatchFunctor

            return BlockAdapter(
                pipe=pipe,
                transformer=pipe.transformer,
                blocks=pipe.transformer.transformer_blocks,
                forward_pattern=ForwardPattern.Pattern_3,
                patch_functor=DiTPatchFunctor(),
                check_forward_pattern=True,
            )
        raise MethodRefused(f"no BlockAdapter recipe for {name} in this runner")

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        import cache_dit

        notes = []
        try:
            cache_dit.enable_cache(pipe, cache_config=self._cache_config())
            cache_dit.disable_cache(pipe)
        except Exception as e:  # noqa: BLE001 - the reason goes into the report
            notes.append(f"cache_dit.enable_cache(pipe) refused: {type(e).__name__}: {e}")
        n_blocks = len(pipe.transformer.transformer_blocks)
        fn_eff = 8 if self.fn is None else self.fn
        if fn_eff > n_blocks:
            raise MethodRefused(
                "; ".join(
                    notes
                    + [
                        f"with cache-dit's default DBCacheConfig (Fn_compute_blocks=8) the first call asserts "
                        f"'Fn_compute_blocks 8 must be less than the number of transformer blocks {n_blocks}'"
                    ]
                )
            )
        notes.append("run through cache_dit.BlockAdapter(Pattern_3, DiTPatchFunctor)")
        self.note = "; ".join(notes)

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        import cache_dit

        tr = pipe.transformer
        self._saved = {
            k: tr.__dict__[k] for k in ("forward", "_is_patched", "_norm1_emb") if k in tr.__dict__
        }
        cache_dit.enable_cache(self._adapter(pipe), cache_config=self._cache_config())

    def disable(self, pipe: Any) -> None:
        import cache_dit

        try:
            self._summary = cache_dit.summary(pipe)
        except Exception:  # noqa: BLE001
            self._summary = []
        cache_dit.disable_cache(pipe)
        # cache-dit 1.5.3 leaves its patched DiT forward (and two attributes) on the transformer.
        tr = pipe.transformer
        for k in ("forward", "_is_patched", "_norm1_emb"):
            if k in self._saved:
                tr.__dict__[k] = self._saved[k]
            elif k in tr.__dict__:
                del tr.__dict__[k]

    def run_stats(self) -> dict[str, Any]:
        if not self._summary:
            return {}
        s = self._summary[0]
        cached = list(getattr(s, "cached_steps", []) or [])
        return {"cached_steps": cached}


# ---------------------------------------------------------------------------------------------
# X-Slim
# ---------------------------------------------------------------------------------------------


class XSlim(Method):
    """X-Slim with a fixed :class:`~xslim_xdit.XSlimConfig` (online controller, preset or schedule)."""

    def __init__(self, name: str, family: str, config: XSlimConfig | None = None, **params: Any) -> None:
        super().__init__(name=name, family=family, params=dict(params))
        self.config = config
        self.engine: Any = None
        self._bk0 = 0.0
        self._summary: dict[str, Any] = {}

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        if self.config is not None:
            self.params.setdefault("config", self.config.to_dict())

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        assert self.config is not None
        self.engine = xslim_xdit.enable_xslim(pipe, self.config, count_flops=measure)
        self._bk0 = self.engine.statistics.bookkeeping_seconds

    def disable(self, pipe: Any) -> None:
        if self.engine is not None:
            s = self.engine.statistics.summary()
            s["bookkeeping_seconds"] = self.engine.statistics.bookkeeping_seconds - self._bk0
            self._summary = s
        xslim_xdit.disable_xslim(pipe)
        self.engine = None

    def run_stats(self) -> dict[str, Any]:
        s = self._summary
        if not s:
            return {}
        return {
            "kinds": s["kinds"],
            "indicators": s["indicators"],
            "xslim_flops_fraction": s["flops_fraction"],
            "bookkeeping_seconds": s["bookkeeping_seconds"],
            "counts": {k: s[k] for k in ("full", "block", "token", "skip")},
        }


class XSlimCalibrated(XSlim):
    """X-Slim's offline mode: :func:`xslim_xdit.calibration.calibrate` on one calibration sample
    (its own seed and class, not one of the evaluated samples), then the emitted schedule."""

    def __init__(self, target_speedup: float, polish: str = "token", **kw: Any) -> None:
        super().__init__(
            name=f"X-Slim calib {target_speedup:g}x {polish}",
            family="xslim-calibrated",
            target_speedup=target_speedup,
            polish=polish,
            **kw,
        )
        self.target_speedup, self.polish, self.kw = target_speedup, polish, kw

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        from xslim_xdit.calibration import calibrate

        t0 = time.perf_counter()
        result = calibrate(
            pipe,
            testbed.calibration_run(pipe, steps),
            target_speedup=self.target_speedup,
            polish=self.polish,  # type: ignore[arg-type]
            **self.kw,
        )
        self.config = result.config()
        self.params["calibration_seconds"] = time.perf_counter() - t0
        self.params["schedule"] = result.schedule.to_dict()
        self.params["estimated_flops_fraction"] = result.estimated_fraction
        self.profile = result.profile
        super().prepare(pipe, testbed, steps)


# ---------------------------------------------------------------------------------------------
# Method sets
# ---------------------------------------------------------------------------------------------


def quick_methods() -> list[Method]:
    """The ``--quick`` set: reference, fewer steps, one X-Slim online setting."""
    return [
        Method(),
        FewerSteps(2),
        XSlim("X-Slim step 0.1/0.3", "xslim-online", XSlimConfig(warn=0.1, crit=0.3, polish="none")),
    ]


def full_methods(steps: int) -> list[Method]:
    """Every method of the full benchmark, at settings chosen to span ~1.3x to ~5x."""
    ms: list[Method] = [Method()]
    ms += [FewerSteps(f) for f in (1.5, 2, 3, 4, 5)]
    ms += [UniformReuse(n) for n in (2, 3, 4)]
    ms += [FirstBlockCache(t) for t in (0.05, 0.1, 0.15, 0.2, 0.3)]
    ms += [TaylorSeer(3, 1), TaylorSeer(6, 1), TaylorSeer(3, 2)]
    ms += [TeaCache(0.25)]
    ms += [DBCache()] + [DBCache(1, 0, t) for t in (0.08, 0.12, 0.2, 0.3)]
    # X-Slim online, one level at a time. partial_reset=0 (only a full step restarts the error):
    # with the default partial_reset=1 a polish step restarts the accumulation and a run can go
    # to its end without a full step (see docs/benchmarks.md); the default is measured once.
    for warn, crit in ((0.05, 0.15), (0.1, 0.3), (0.2, 0.5), (0.3, 0.8)):
        ms.append(
            XSlim(
                f"X-Slim step {warn:g}/{crit:g}",
                "xslim-online",
                XSlimConfig(warn=warn, crit=crit, polish="none"),
            )
        )
    for polish in ("block", "token", "auto"):
        for warn, crit in ((0.05, 0.15), (0.1, 0.3), (0.2, 0.5)):
            cfg = XSlimConfig(warn=warn, crit=crit, polish=polish, partial_reset=0.0)  # type: ignore[arg-type]
            ms.append(XSlim(f"X-Slim +{polish} {warn:g}/{crit:g}", f"xslim-online-{polish}", cfg))
    ms.append(XSlim("X-Slim default config", "xslim-online-token", XSlimConfig()))
    for target in (2.0, 3.0, 4.0):
        ms.append(XSlimCalibrated(target, polish="none"))
        ms.append(XSlimCalibrated(target, polish="token"))
    for preset in ("flux-slow", "flux-fast"):
        cfg = XSlimConfig.from_preset(preset, block_thresh=2.0, block_thresh_scale="stack_mean")
        m = XSlim(f"X-Slim preset {preset}", "xslim-preset", cfg, preset=preset)
        m.note = (
            f"published 50-step FLUX schedule rescaled to {steps} steps; its absolute FLUX block "
            "thresholds (1.5, 10) replaced by the stack-mean threshold 2.0"
        )
        ms.append(m)
    return ms
