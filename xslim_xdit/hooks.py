"""How X-Slim attaches to a model and a scheduler, and how it leaves them exactly as they were.

* Each block gets a hook in diffusers' :class:`~diffusers.hooks.HookRegistry` (the registry
  group offloading, layerwise casting and diffusers' own caches use), so it chains with the
  hooks already there and with those added later, and removing it reconnects the chain. The hook
  is stateful in diffusers' sense: the pipeline's ``transformer.cache_context(name)`` reaches
  it, which is how the engine learns the guidance branch.
* The transformer gets a forward pre-hook and a forward hook (torch's, removed by handle); under
  ``torch.compile`` the model's forward runs between them with dynamo switched off (see
  :mod:`xslim_xdit.compiled`).
* A scheduler's ``set_timesteps`` and ``step`` are wrapped per instance; the attribute that was
  in the instance's ``__dict__`` (or its absence) is put back on removal. A deep copy of the
  scheduler (``LTX2Pipeline`` steps its audio latents with one) gets the methods unhooked, bound
  to the copy: the hooks report the attached scheduler's steps only, and the copy steps itself.
* Under ``torch.compile`` X-Slim's own modules are in dynamo's skip rules
  (:func:`keep_out_of_compiled_graphs`, applied when this module is imported).

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> patch = AttributePatch(lin, "forward", lambda x: x)
    >>> patch.restore()
    >>> "forward" in vars(lin)
    False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from torch import nn

_MISSING = object()
HOOK_NAME = "xslim_block"


class AttributePatch:
    """Set ``obj.name = value`` on the instance and remember what the instance had."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name = obj, name
        self.before = vars(obj).get(name, _MISSING)
        setattr(obj, name, value)

    def restore(self) -> None:
        if self.before is _MISSING:
            vars(self.obj).pop(self.name, None)
        else:
            setattr(self.obj, self.name, self.before)


class CacheContextListener(StateManager):
    """Receives diffusers' ``cache_context`` (diffusers sets it on every stateful hook's
    ``StateManager``); X-Slim keeps no per-context state in it, only reads the context."""

    def __init__(self) -> None:
        super().__init__(state_cls=None)  # type: ignore[arg-type]

    @property
    def current(self) -> Any:
        return self._context

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self._context = None


class BlockHook(ModelHook):
    """Routes a block's calls to ``run(index, original_forward, args, kwargs)``."""

    _is_stateful = True

    def __init__(self, index: int, run: Callable[..., Any], listener: CacheContextListener) -> None:
        super().__init__()
        self.index = index
        self.run = run
        self.listener = listener

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.index, self.fn_ref.original_forward, args, kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        return module


class BlockHooks:
    """X-Slim's hooks on a list of blocks, installed through diffusers' hook registry."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], run: Callable[..., Any]) -> None:
        self.model = model
        self.listener = CacheContextListener()
        self._installed: list[tuple[nn.Module, bool, bool]] = []
        for g, blk in enumerate(blocks):
            had_registry = hasattr(blk, "_diffusers_hook")
            had_forward = "forward" in vars(blk)
            HookRegistry.check_if_exists_or_initialize(blk).register_hook(
                BlockHook(g, run, self.listener), HOOK_NAME
            )
            self._installed.append((blk, had_registry, had_forward))
        self._invalidate_registry_caches()

    def _invalidate_registry_caches(self) -> None:
        # diffusers caches each registry's list of child registries (cache_context walks it)
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    @property
    def context(self) -> Any:
        """The pipeline's current ``cache_context`` (``None`` outside one)."""
        return self.listener.current

    def remove(self) -> None:
        for blk, had_registry, had_forward in self._installed:
            registry = getattr(blk, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks and not had_registry:
                del blk._diffusers_hook
                if not had_forward:
                    vars(blk).pop("forward", None)
        self._installed.clear()
        self._invalidate_registry_caches()


#: Hooks that only place or cast a block's weights (diffusers' group offloading and layerwise
#: casting, accelerate's device alignment and CPU offload): the step probe, which reads block 0's
#: norm before X-Slim decides whether block 0 runs, runs inside them. Other hooks (counters,
#: caches) see one call per block call, never the probe.
WEIGHT_PLACEMENT_HOOKS = frozenset(
    {"GroupOffloadingHook", "LayerwiseCastingHook", "AlignDevicesHook", "CpuOffload"}
)


def _placement_hooks(block: nn.Module) -> list[Any]:
    """The weight-placement hooks X-Slim's block hook wraps, outermost first."""
    found: list[Any] = []
    registry = getattr(block, "_diffusers_hook", None)
    if registry is not None and HOOK_NAME in registry._hook_order:
        inner = registry._hook_order[: registry._hook_order.index(HOOK_NAME)]
        found += [registry.hooks[n] for n in reversed(inner)]
    accelerate_hook = getattr(block, "_hf_hook", None)
    if accelerate_hook is not None:
        found += list(getattr(accelerate_hook, "hooks", None) or [accelerate_hook])
    return [h for h in found if type(h).__name__ in WEIGHT_PLACEMENT_HOOKS]


def call_with_weights_placed(
    block: nn.Module, fn: Callable[[tuple, dict], Any], args: tuple, kwargs: dict
) -> Any:
    """``fn(args, kwargs)`` with the block's weights where its own forward would find them
    (group offloading has onloaded them, layerwise casting has cast them to the compute dtype)."""
    hooks = _placement_hooks(block)
    for hook in hooks:
        args, kwargs = hook.pre_forward(block, *args, **kwargs)
    out = fn(args, kwargs)
    for hook in reversed(hooks):
        hook.post_forward(block, out)
    return out


def inner_scheduler(scheduler: Any) -> Any:
    """The scheduler object itself: xfuser wraps schedulers (``.module``) and forwards attributes."""
    for _ in range(4):
        inner = (
            vars(scheduler).get("module")
            if scheduler is not None and hasattr(scheduler, "__dict__")
            else None
        )
        if inner is None:
            break
        scheduler = inner
    return scheduler


def is_wrapped_scheduler(scheduler: Any) -> bool:
    """xfuser's scheduler wrappers step once per PipeFusion patch, not once per step."""
    return (
        scheduler is not None and hasattr(scheduler, "__dict__") and vars(scheduler).get("module") is not None
    )


class SchedulerHooks:
    """Tell the engine when a run starts (``set_timesteps``, and ``set_begin_index`` where a
    pipeline starts part-way) and when a step ends (``step``)."""

    def __init__(
        self,
        scheduler: Any,
        on_timesteps: Callable[[Any], None],
        on_step: Callable[[], None] | None,
    ) -> None:
        self.scheduler = scheduler
        self.patches: list[AttributePatch] = []
        set_timesteps = scheduler.set_timesteps

        def set_timesteps_hooked(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            on_timesteps(scheduler)
            return out

        self.patches.append(
            AttributePatch(
                scheduler,
                "set_timesteps",
                _InstanceMethodHook(scheduler, set_timesteps_hooked, set_timesteps),
            )
        )
        set_begin_index = getattr(scheduler, "set_begin_index", None)
        if callable(set_begin_index):
            # img2img, inpainting (strength < 1): the pipeline starts part-way down the timesteps
            # after setting them; the run is then the steps from there on.
            def set_begin_index_hooked(*args: Any, **kwargs: Any) -> Any:
                out = set_begin_index(*args, **kwargs)
                on_timesteps(scheduler)
                return out

            self.patches.append(
                AttributePatch(
                    scheduler,
                    "set_begin_index",
                    _InstanceMethodHook(scheduler, set_begin_index_hooked, set_begin_index),
                )
            )
        if on_step is not None:
            step = scheduler.step

            def step_hooked(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                on_step()
                return out

            self.patches.append(
                AttributePatch(scheduler, "step", _InstanceMethodHook(scheduler, step_hooked, step))
            )

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.restore()
        self.patches.clear()


class _InstanceMethodHook:
    """``wrapper`` standing in for ``owner``'s method ``wrapped`` in the instance's ``__dict__``.

    A deep copy of the owner would share a plain function there, and the copy's calls would run the
    hook and the owner's method; here the copy gets ``wrapped`` itself, bound to the copy when it
    is the owner's bound method (the class's method, unhooked).

    Example:
        >>> import copy
        >>> class Counter:
        ...     n = 0
        ...     def step(self):
        ...         self.n += 1
        >>> c, seen = Counter(), []
        >>> def hooked():
        ...     Counter.step(c)
        ...     seen.append(1)
        >>> c.step = _InstanceMethodHook(c, hooked, c.step)
        >>> twin = copy.deepcopy(c)
        >>> twin.step()
        >>> c.step()
        >>> twin.n, c.n, len(seen)
        (1, 1, 1)
    """

    def __init__(self, owner: Any, wrapper: Callable[..., Any], wrapped: Callable[..., Any]) -> None:
        import functools

        functools.update_wrapper(self, wrapped)
        self._owner, self._wrapper, self._wrapped = owner, wrapper, wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        import copy
        import types

        wrapped = self._wrapped
        twin = memo.get(id(self._owner))  # the owner's copy, registered before its __dict__ is copied
        if twin is not None and getattr(wrapped, "__self__", None) is self._owner:
            return types.MethodType(wrapped.__func__, twin)
        return copy.deepcopy(wrapped, memo)


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments (what the FLOP meter counts once)."""

    def k(v: Any) -> Any:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    return tuple(k(a) for a in args) + tuple((n, k(v)) for n, v in sorted(kwargs.items()))


#: X-Slim's own modules whose Python dynamo never traces (see :func:`keep_out_of_compiled_graphs`;
#: ``api`` for the check of the pipeline's scheduler before each call).
EAGER_MODULES = (
    "xslim_xdit.adapters.base",
    "xslim_xdit.api",
    "xslim_xdit.batch",
    "xslim_xdit.batch_executor",
    "xslim_xdit.caches",
    "xslim_xdit.clock",
    "xslim_xdit.compiled",
    "xslim_xdit.controller",
    "xslim_xdit.decision",
    "xslim_xdit.engine",
    "xslim_xdit.engine_caches",
    "xslim_xdit.executor",
    "xslim_xdit.flops",
    "xslim_xdit.hooks",
    "xslim_xdit.observers",
    "xslim_xdit.parallel.pipeline",
    "xslim_xdit.parallel.sync",
    "xslim_xdit.stats",
)


def keep_out_of_compiled_graphs() -> None:
    """Under ``torch.compile`` X-Slim's bookkeeping (step clock, decisions, cache updates,
    statistics) runs as plain Python and the model's own code compiles: the decisions change from
    step to step, and traced into a graph they would guard it on every step index, plan kind and
    block mask (a recompilation per step, then dynamo's recompile limit and eager fallback).
    Registered in dynamo's skip rules, X-Slim's modules are never traced; each block's own
    forward, called from them, compiles once per input shape and is reused at every step.
    (Token refresh's attention processors stay traceable: they are tensor code inside the block.)"""
    try:
        from torch._dynamo import trace_rules
    except ImportError:  # a torch without dynamo: nothing is compiled
        return
    for name in EAGER_MODULES:
        trace_rules.add(name)


keep_out_of_compiled_graphs()
