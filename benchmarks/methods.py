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
``cache_dit.enable_cache`` with a ``BlockAdapter`` (DBCache, alone and with its TaylorSeer and
FoCa calibrators), diffusers' MagCache (ratios from its own calibration mode), and xfuser's
TeaCache where it applies.

Example:
    >>> m = FewerSteps(2)
    >>> m.num_steps(50)
    25
"""

from __future__ import annotations

import functools
import os
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
        # the registry caches its children's registries; a cache built before the block hooks
        # existed would leave the blocks out of the cache context (FBC's tail hook then sees no
        # head-block output)
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

    def __init__(self, interval: int, order: int = 1, warmup: int = 3, lite: bool = False) -> None:
        super().__init__(
            name=f"TaylorSeer N={interval} o={order}" + (" lite" if lite else ""),
            family="taylorseer",
            params={"cache_interval": interval, "max_order": order, "disable_cache_before_step": warmup},
        )
        self.interval, self.order, self.warmup, self.lite = interval, order, warmup, lite
        self.identifiers: list[str] | None = None
        if lite:
            self.params["use_lite_mode"] = True

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        import re

        from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

        names = [n for n, _ in pipe.transformer.named_modules()]
        if self.lite:
            # lite mode (the paper's whole-feature variant): the blocks are skipped between full
            # steps and `proj_out`'s output is extrapolated; diffusers' patterns for it are fixed
            from diffusers.hooks.taylorseer_cache import _BLOCK_IDENTIFIERS, _PROJ_OUT_IDENTIFIERS

            blocks = [n for n in names if any(re.fullmatch(p, n) for p in _BLOCK_IDENTIFIERS)]
            outs = [n for n in names if any(re.fullmatch(p, n) for p in _PROJ_OUT_IDENTIFIERS)]
            if not blocks or not outs:
                raise MethodRefused(
                    "diffusers' TaylorSeer lite mode skips modules matching "
                    f"{list(_BLOCK_IDENTIFIERS)} and extrapolates {list(_PROJ_OUT_IDENTIFIERS)}; this "
                    f"model has {len(blocks)} and {len(outs)} such modules"
                )
            return
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
            use_lite_mode=self.lite,
        )

    def _apply(self, transformer: nn.Module, config: Any) -> None:
        from diffusers.hooks import apply_taylorseer_cache

        apply_taylorseer_cache(transformer, config)


class MagCache(_DiffusersHook):
    """diffusers' MagCache: skip the blocks while the accumulated error of the magnitude ratios
    (``|1 - prod(ratio)|`` since the last full step) stays under ``threshold``, at most
    ``max_skip_steps`` in a row, never in the first ``retention_ratio`` of the steps.

    The ratios are checkpoint-dependent, so :meth:`prepare` obtains them the way diffusers
    documents it: one run with ``MagCacheConfig(calibrate=True)`` on a calibration sample (not an
    evaluation sample), whose printed ratios are read back and passed as ``mag_ratios``.
    ``max_skip_steps`` and ``retention_ratio`` are diffusers' defaults (3, 0.2).
    """

    hook_names = ("mag_cache_leader_block_hook", "mag_cache_block_hook")

    def __init__(self, threshold: float, max_skip_steps: int = 3, retention_ratio: float = 0.2) -> None:
        super().__init__(
            name=f"MagCache {threshold:g}",
            family="magcache",
            params={
                "threshold": threshold,
                "max_skip_steps": max_skip_steps,
                "retention_ratio": retention_ratio,
            },
        )
        self.threshold, self.max_skip_steps, self.retention_ratio = threshold, max_skip_steps, retention_ratio
        self.mag_ratios: list[float] | None = None
        self.steps = 0
        self._calibrating = False

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        import ast
        import contextlib
        import io

        self.steps = steps
        run = testbed.calibration_runs(pipe, steps, 1)[0]
        printed = io.StringIO()
        self._calibrating = True
        try:
            self.enable(pipe)
        except Exception as e:  # noqa: BLE001 - the reason goes into the report
            self._calibrating = False
            raise MethodRefused(
                f"diffusers' apply_mag_cache refused this model: {type(e).__name__}: {e}"
            ) from e
        try:
            with contextlib.redirect_stdout(printed), torch.no_grad():
                run()
        finally:
            self.disable(pipe)
            self._calibrating = False
        lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
        if not lists:
            raise MethodRefused(
                "MagCache's calibration run printed no ratios (its tail block hook never ran)"
            )
        ratios = [float(r) for r in ast.literal_eval(lists[-1])]
        if len(ratios) != steps:
            raise MethodRefused(f"MagCache's calibration gave {len(ratios)} ratios for {steps} steps")
        self.mag_ratios = ratios
        self.params["mag_ratios"] = [round(r, 4) for r in ratios]
        self.note = (
            "mag_ratios from one calibration run (MagCacheConfig(calibrate=True)) on a calibration sample"
        )

    def _config(self) -> Any:
        from diffusers.hooks import MagCacheConfig

        if self._calibrating:
            return MagCacheConfig(calibrate=True, num_inference_steps=self.steps)
        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=self.steps,
            mag_ratios=self.mag_ratios,
        )

    def _apply(self, transformer: nn.Module, config: Any) -> None:
        from diffusers.hooks import apply_mag_cache

        apply_mag_cache(transformer, config)


# ---------------------------------------------------------------------------------------------
# TeaCache (xfuser) and cache-dit DBCache
# ---------------------------------------------------------------------------------------------


class TeaCache(Method):
    """TeaCache where an implementation exists for the model.

    diffusers 0.42.1 ships no TeaCache hook and cache-dit 1.5.3 has none. xfuser 0.7.0's TeaCache
    (``xfuser.model_executor.cache.adapters.flux.apply_teacache``: TeaCache's FLUX rescale
    polynomial on block 0's modulated input, accumulated until ``rel_l1_thresh``, the skipped
    steps reuse the whole stack's residual) patches ``FluxTransformer2DModel``'s block lists only;
    it runs here after :func:`xslim_xdit.integrations.xfuser_compat.apply_xfuser_cpu_compat`
    (``import xfuser`` raises "No Accelerators" on a CPU-only machine otherwise). On any other
    model the method is refused with that reason.
    """

    def __init__(self, threshold: float) -> None:
        super().__init__(
            name=f"TeaCache {threshold:g}", family="teacache", params={"rel_l1_thresh": threshold}
        )
        self.threshold = threshold
        self._steps = 0
        self._saved: tuple[Any, Any] | None = None

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        cls = type(pipe.transformer).__name__
        if cls != "FluxTransformer2DModel":
            raise MethodRefused(
                f"no TeaCache implementation applies to {cls}: diffusers 0.42.1 has no TeaCache hook, "
                "cache-dit 1.5.3 has no TeaCache, and xfuser 0.7.0's apply_teacache "
                "(xfuser/model_executor/cache/adapters/flux.py) patches FluxTransformer2DModel only"
            )
        from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

        apply_xfuser_cpu_compat()
        try:
            from xfuser.core.distributed import (
                init_distributed_environment,
                initialize_model_parallel,
                model_parallel_is_initialized,
            )
            from xfuser.model_executor.cache.adapters import flux  # noqa: F401

            # xfuser's cached blocks ask for the sequence-parallel world size: one gloo rank
            if not model_parallel_is_initialized():
                for k, v in (
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", "29561"),
                    ("RANK", "0"),
                    ("WORLD_SIZE", "1"),
                    ("LOCAL_RANK", "0"),
                ):
                    os.environ.setdefault(k, v)
                init_distributed_environment(rank=0, world_size=1, backend="gloo")
                initialize_model_parallel()
        except Exception as e:  # noqa: BLE001 - the reason goes into the report
            raise MethodRefused(f"xfuser's TeaCache does not run: {type(e).__name__}: {e}") from e
        self._steps = self.num_steps(steps)
        self.note = (
            "xfuser 0.7.0 apply_teacache (FLUX rescale polynomial), run after xslim_xdit's "
            f"apply_xfuser_cpu_compat, on a one-rank gloo group; num_steps={self._steps}"
        )

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        from xfuser.model_executor.cache.adapters.flux import apply_teacache

        tr = pipe.transformer
        self._saved = (tr.transformer_blocks, tr.single_transformer_blocks)
        apply_teacache(tr, rel_l1_thresh=self.threshold, num_steps=self._steps)
        self._cached = tr.transformer_blocks[0]

    def disable(self, pipe: Any) -> None:
        if self._saved is not None:
            tr = pipe.transformer
            tr.transformer_blocks, tr.single_transformer_blocks = self._saved
            self._saved = None

    def run_stats(self) -> dict[str, Any]:
        return {}


class DBCache(Method):
    """cache-dit's DBCache through ``cache_dit.enable_cache``.

    cache-dit recognises pipelines by class-name prefix; a custom pipeline (here
    ``DigitsDiTPipeline``) is refused by ``enable_cache(pipe)`` and needs cache-dit's documented
    ``BlockAdapter`` route, which is used with cache-dit's own DiT settings (``Pattern_3``,
    ``DiTPatchFunctor``). cache-dit's defaults (``DBCacheConfig()``: Fn=8, Bn=0, threshold 0.08,
    8 warm-up steps) are tried first; where they are refused, the refusal is recorded, and the
    ``fn``/``threshold`` given here are used.
    """

    def __init__(
        self,
        fn: int | None = None,
        bn: int = 0,
        threshold: float | None = None,
        calibrator: str | None = None,
    ) -> None:
        label = "defaults" if fn is None and threshold is None else f"F{fn}B{bn} {threshold:g}"
        if calibrator not in (None, "taylorseer", "foca"):
            raise ValueError(f"calibrator must be None, 'taylorseer' or 'foca', got {calibrator!r}")
        suffix = {None: "", "taylorseer": " +TaylorSeer", "foca": " +FoCa"}[calibrator]
        super().__init__(
            name=f"DBCache {label}{suffix}",
            family="dbcache" + ("" if calibrator is None else f"-{calibrator}"),
            params={"Fn": fn, "Bn": bn, "threshold": threshold, "calibrator": calibrator},
        )
        self.fn, self.bn, self.threshold, self.calibrator = fn, bn, threshold, calibrator
        self._summary: list[Any] = []

    def _calibrator_config(self) -> Any:
        """cache-dit's calibrators as its README enables them: ``TaylorSeerCalibratorConfig`` with
        ``taylorseer_order=1`` (its documented default) or ``FoCaCalibratorConfig()`` (no
        hyper-parameters), on the hidden states and the encoder hidden states."""
        import cache_dit

        if self.calibrator == "taylorseer":
            return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
        if self.calibrator == "foca":
            return cache_dit.FoCaCalibratorConfig()
        return None

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
        # cache-dit's own recipes for these transformer classes (what enable_cache(pipe) would use
        # for FluxPipeline / HunyuanVideoPipeline), applied to the custom pipeline
        from cache_dit.caching.block_adapters import adapters

        if name == "FluxTransformer2DModel":
            return adapters.flux_adapter(pipe)
        if name == "HunyuanVideoTransformer3DModel":
            return adapters.hunyuanvideo_adapter(pipe)
        raise MethodRefused(f"no BlockAdapter recipe for {name} in this runner")

    @staticmethod
    def _recipe(pipe: Any) -> str:
        return {
            "DiTTransformer2DModel": "cache_dit.BlockAdapter(Pattern_3, DiTPatchFunctor)",
            "FluxTransformer2DModel": "cache-dit's flux_adapter (FluxPipeline's recipe: double+single "
            "blocks as one list, Pattern_1, FluxPatchFunctor)",
            "HunyuanVideoTransformer3DModel": "cache-dit's hunyuanvideo_adapter (HunyuanVideoPipeline's "
            "recipe: double and single block lists, Pattern_0)",
        }.get(type(pipe.transformer).__name__, "?")

    @staticmethod
    def _min_blocks(adapter: Any) -> int:
        blocks = adapter.blocks
        if isinstance(blocks, (list, tuple)) and blocks and isinstance(blocks[0], nn.ModuleList):
            return min(len(b) for b in blocks)
        return len(blocks)

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        import cache_dit

        notes = []
        saved = self._snapshot(pipe)
        try:
            cache_dit.enable_cache(pipe, cache_config=self._cache_config())
            cache_dit.disable_cache(pipe)
        except Exception as e:  # noqa: BLE001 - the reason goes into the report
            notes.append(f"cache_dit.enable_cache(pipe) refused: {type(e).__name__}: {e}")
        try:
            n_blocks = self._min_blocks(self._adapter(pipe))  # building an adapter may patch
        finally:
            self._restore(pipe, saved)
        fn_eff = 8 if self.fn is None else self.fn
        if fn_eff > n_blocks:
            raise MethodRefused(
                "; ".join(
                    notes
                    + [
                        f"through {self._recipe(pipe)}, cache-dit's default DBCacheConfig "
                        f"(Fn_compute_blocks=8) asserts on the first call: 'Fn_compute_blocks 8 must be "
                        f"less than the number of transformer blocks {n_blocks}'"
                    ]
                )
            )
        notes.append(f"run through {self._recipe(pipe)}")
        self.note = "; ".join(notes)

    @staticmethod
    def _snapshot(pipe: Any) -> list[tuple[nn.Module, set[str], Any, list[str]]]:
        """Per module of the transformer: its instance attributes, its ``forward`` if set, and the
        order of its children."""
        return [
            (m, set(m.__dict__), m.__dict__.get("forward"), list(m._modules))
            for m in pipe.transformer.modules()
        ]

    @staticmethod
    def _restore(pipe: Any, saved: list[tuple[nn.Module, set[str], Any, list[str]]]) -> None:
        """Undo what cache-dit 1.5.3 leaves behind after ``disable_cache``: its patch functors
        replace the transformer's ``forward`` (DiT, FLUX) and add attributes (``_is_patched``,
        ``_norm1_emb``), and its FLUX recipe (the single blocks as "dummy blocks" of one list) puts
        ``single_transformer_blocks`` back *before* ``transformer_blocks`` in the module order, so
        that diffusers' First-Block-Cache, which takes the first block of ``named_modules()``,
        would then hook a single-stream block as the first block and crash."""
        for m, keys, fwd, order in saved:
            for k in set(m.__dict__) - keys:
                del m.__dict__[k]
            if fwd is not None:
                m.__dict__["forward"] = fwd
            if list(m._modules) != order and set(m._modules) == set(order):
                children = dict(m._modules)
                m._modules.clear()
                for k in order:
                    m._modules[k] = children[k]

    def enable(self, pipe: Any, *, measure: bool = True) -> None:
        import cache_dit

        self._saved = self._snapshot(pipe)
        kw = {} if self.calibrator is None else {"calibrator_config": self._calibrator_config()}
        cache_dit.enable_cache(self._adapter(pipe), cache_config=self._cache_config(), **kw)

    def disable(self, pipe: Any) -> None:
        import cache_dit

        try:
            self._summary = cache_dit.summary(pipe)
        except Exception:  # noqa: BLE001
            self._summary = []
        cache_dit.disable_cache(pipe)
        self._restore(pipe, self._saved)

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
    """X-Slim's offline mode: :func:`xslim_xdit.calibration.calibrate` on ``calibration_samples``
    single-sample runs (their own seeds and classes, not evaluated ones), then the emitted schedule.

    ``strategy="optimal"`` (named "X-Slim optimal Nx") plans the full steps on the profile;
    ``"threshold"`` (named "X-Slim calib Nx <polish>") replays the indicator through the
    controller, X-Slim's published procedure.
    """

    def __init__(
        self,
        target_speedup: float,
        polish: str = "token",
        extrapolate: str = "linear",
        strategy: str = "threshold",
        calibration_samples: int = 4,
        **kw: Any,
    ) -> None:
        suffix = "" if extrapolate == "linear" else f" extrapolate={extrapolate}"
        if calibration_samples != 4:
            plural = "" if calibration_samples == 1 else "s"
            suffix += f" ({calibration_samples} calibration sample{plural})"
        if strategy == "optimal":
            name = f"X-Slim optimal {target_speedup:g}x{suffix}"
            family = "xslim-optimal" if extrapolate == "linear" else f"xslim-optimal-{extrapolate}"
            if calibration_samples != 4:
                family += f"-{calibration_samples}cal"
        else:
            name = f"X-Slim calib {target_speedup:g}x {polish}{suffix}"
            family = "xslim-calibrated" if extrapolate == "linear" else f"xslim-calibrated-{extrapolate}"
        super().__init__(
            name=name,
            family=family,
            target_speedup=target_speedup,
            polish=polish,
            extrapolate=extrapolate,
            strategy=strategy,
            calibration_samples=calibration_samples,
            **kw,
        )
        self.target_speedup, self.polish, self.extrapolate, self.kw = target_speedup, polish, extrapolate, kw
        self.strategy = strategy
        self.calibration_samples = calibration_samples

    def prepare(self, pipe: Any, testbed: Any, steps: int) -> None:
        from xslim_xdit.calibration import calibrate

        t0 = time.perf_counter()
        result = calibrate(
            pipe,
            testbed.calibration_runs(pipe, steps, self.calibration_samples),
            target_speedup=self.target_speedup,
            polish=self.polish,  # type: ignore[arg-type]
            strategy=self.strategy,  # type: ignore[arg-type]
            extrapolate=self.extrapolate,  # type: ignore[arg-type]
            **self.kw,
        )
        self.config = result.config()
        self.params["calibration_seconds"] = time.perf_counter() - t0
        self.params["schedule"] = result.schedule.to_dict()
        self.params["estimated_flops_fraction"] = result.estimated_fraction
        if result.candidates:
            self.params["candidates"] = result.candidates
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


#: warn values of the step-only online controller (``polish="none"``). On the digits DiT at 50
#: steps they span about 1.3x (0.05) to 5x (0.45) in FLOPs with linear extrapolation.
STEP_WARNS: tuple[float, ...] = (0.05, 0.08, 0.12, 0.16, 0.2, 0.3, 0.45)


def _crit(warn: float) -> float:
    """``crit`` paired with a ``warn``: the default 0.35, or 3x ``warn`` above it. With ``polish="none"``
    the band ``[warn, crit)`` runs in full like ``>= crit``, so only ``warn`` sets the cost."""
    return round(max(0.35, 3 * warn), 4)


def xslim_methods(steps: int) -> list[Method]:
    """X-Slim, one ingredient at a time.

    - step only (``polish="none"``), the skipped step's residual extrapolated linearly (the
      default) and reused as is (``extrapolate="none"``), at the warn values of :data:`STEP_WARNS`;
    - step only with one warm-up step instead of three (high speedups, where 3 warm-up steps are
      a large share of the budget);
    - ``+block`` / ``+token`` / ``+auto``: the polish levels, with the defaults ``partial_reset=0``
      and ``extrapolate="linear"``, at two bands;
    - the default :class:`~xslim_xdit.XSlimConfig`;
    - optimal calibrated schedules (full steps planned on the profiles of 4 calibration samples)
      from 1.5x to 6x, one planned for ``extrapolate="none"``, two calibrated on one sample;
    - threshold-calibrated schedules (replayed with linear extrapolation; one with
      ``extrapolate="none"`` for contrast, one with token polish);
    - the published presets, rescaled to ``steps``.
    """
    ms: list[Method] = []
    for extrapolate, warns in (("linear", STEP_WARNS), ("none", (0.05, 0.08, 0.12, 0.2, 0.3, 0.45))):
        for warn in warns:
            cfg = XSlimConfig(warn=warn, crit=_crit(warn), polish="none", extrapolate=extrapolate)  # type: ignore[arg-type]
            ms.append(XSlim(f"X-Slim step {extrapolate} {warn:g}", f"xslim-step-{extrapolate}", cfg))
    for warn in (0.2, 0.3, 0.45):
        cfg = XSlimConfig(warn=warn, crit=_crit(warn), polish="none", warmup_steps=1)
        ms.append(XSlim(f"X-Slim step linear {warn:g} wu1", "xslim-step-linear-wu1", cfg))
    for polish in ("block", "token", "auto"):
        for warn, crit in ((0.08, 0.25), (0.12, 0.35)):
            cfg = XSlimConfig(warn=warn, crit=crit, polish=polish)  # type: ignore[arg-type]
            ms.append(XSlim(f"X-Slim +{polish} {warn:g}/{crit:g}", f"xslim-{polish}", cfg))
    ms.append(XSlim("X-Slim default config", "xslim-default", XSlimConfig()))
    for target in (1.5, 2.0, 3.0, 4.0, 5.0, 6.0):
        ms.append(XSlimCalibrated(target, polish="none", strategy="optimal"))
    ms.append(XSlimCalibrated(3.0, polish="none", strategy="optimal", extrapolate="none"))
    for target in (3.0, 5.0):  # what calibrating on several samples adds
        ms.append(XSlimCalibrated(target, polish="none", strategy="optimal", calibration_samples=1))
    for target in (2.0, 3.0, 4.0, 5.0):
        ms.append(XSlimCalibrated(target, polish="none"))
    ms.append(XSlimCalibrated(3.0, polish="none", extrapolate="none"))
    ms.append(XSlimCalibrated(3.0, polish="token"))
    for preset in ("flux-slow", "flux-fast", "hunyuan_video-slow", "hunyuan_video-fast"):
        cfg = XSlimConfig.from_preset(preset, block_thresh=2.0, block_thresh_scale="stack_mean")
        m = XSlim(f"X-Slim preset {preset}", "xslim-preset", cfg, preset=preset)
        m.note = (
            f"published 50-step schedule rescaled to {steps} steps; its absolute block thresholds "
            "(tuned on the real model) replaced by the stack-mean threshold 2.0"
        )
        ms.append(m)
    return ms


def full_methods(steps: int) -> list[Method]:
    """Every method of the full benchmark, at settings chosen to span ~1.3x to ~5x."""
    ms: list[Method] = [Method()]
    ms += [FewerSteps(f) for f in (1.5, 2, 3, 4, 5)]
    ms += [UniformReuse(n) for n in (2, 3, 4)]
    ms += [FirstBlockCache(t) for t in (0.05, 0.1, 0.15, 0.2, 0.3)]
    ms += [
        TaylorSeer(3, 1),
        TaylorSeer(6, 1),
        TaylorSeer(3, 2),
        TaylorSeer(3, 1, lite=True),
        TaylorSeer(6, 1, lite=True),
    ]
    ms += [TeaCache(t) for t in (0.25, 0.4, 0.6, 0.8, 1.2)]
    ms += [DBCache()] + [DBCache(1, 0, t) for t in (0.08, 0.12, 0.2, 0.3, 0.5)]
    ms += [DBCache(1, 0, t, calibrator=c) for c in ("taylorseer", "foca") for t in (0.12, 0.3, 0.5)]
    ms += [MagCache(t) for t in (0.06, 0.12, 0.24, 0.4)]
    return ms + xslim_methods(steps)
