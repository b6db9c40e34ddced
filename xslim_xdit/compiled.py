"""X-Slim under ``torch.compile``: at most one graph break per transformer call, the blocks compiled.

Decisions are taken once per call, outside compiled code. X-Slim's forward pre-hook on the
transformer (in dynamo's skip rules, :func:`~xslim_xdit.hooks.keep_out_of_compiled_graphs`)
is the one place a compiled call stops for X-Slim: ``torch.compile(transformer)`` runs module
hooks outside dynamo (no break at all); ``transformer.compile()``, or a compiled function that
calls the transformer, traces up to the hook and breaks there (one break). The pre-hook then
switches dynamo's frame callback off until X-Slim's forward hook puts it back
(:class:`CompiledRegions`), and the call runs like diffusers' regional compilation
(``compile_repeated_blocks``):

* the model's own forward, X-Slim's step clock, decision and block hooks run eagerly (dynamo's
  frame callback is switched off: nothing there is traced, so no decision ever guards a graph);
* each block X-Slim computes runs its original forward under the very callback the user
  compiled with (same backend, options, ``dynamic`` and stance): it compiles once per block
  class and input shape and is reused at every step and by every block of that class.

The callback is read and set with the eval-frame hook that ``torch.compile``'s own wrappers use
(``torch._C._dynamo.eval_frame``): torch has no public API that returns the active compile's
backend. Where that hook is missing, the call runs as dynamo traces it (a break at each block).

Blocks compiled by the user (``nn.Module.compile()`` on a block, as diffusers'
``compile_repeated_blocks()`` does) would otherwise call X-Slim's block hook from inside their
compiled call: X-Slim takes their compiled call off while it is enabled (``_compiled_call_impl``,
put back on disable), runs its block hook eagerly, and runs the block's original forward under
that compiled call's callback.

Example:
    >>> import torch
    >>> regions = CompiledRegions()
    >>> regions.enter_call()  # not under a compile: nothing changes
    >>> regions.call_block(0, torch.add, torch.ones(1), 1)
    tensor([2.])
    >>> regions.leave_call()
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .schedule import ConfigError

try:  # the hook torch.compile's wrappers switch dynamo's frame callback with
    from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_eval_frame
except ImportError:  # a torch without dynamo: nothing is ever compiled
    get_eval_frame_callback = set_eval_frame = None  # type: ignore[assignment]

#: the frame callback when no compile is active
_NO_CALLBACK = None


def compile_callback(compiled_call: Callable[..., Any]) -> Any:
    """The dynamo callback of a ``torch.compile`` wrapper (what ``nn.Module.compile()`` stores as
    ``_compiled_call_impl``), or None when it has none that can be read."""
    try:
        found = inspect.getclosurevars(compiled_call).nonlocals.get("callback")
    except TypeError:  # not a Python function
        return None
    return found if callable(found) else None


def _compile_context(module: Any) -> Any:
    """The dynamo context a module was compiled with (``torch.compile(module)`` or
    ``module.compile()``), or None."""
    context = getattr(module, "dynamo_ctx", None)
    compiled_call = getattr(module, "_compiled_call_impl", None) if context is None else None
    if callable(compiled_call):
        try:
            context = inspect.getclosurevars(compiled_call).nonlocals.get("self")
        except TypeError:
            context = None
    return context


def refuse_whole_graph(modules: list[Any]) -> None:
    """:class:`~xslim_xdit.config.ConfigError` for a transformer compiled with
    ``fullgraph=True``: X-Slim's call hook is a graph break by design (its decisions stay out of
    graphs). Compiling the blocks with ``fullgraph=True`` (``compile_repeated_blocks``) works.

    Example:
        >>> import torch
        >>> refuse_whole_graph([torch.compile(torch.nn.Linear(2, 2), fullgraph=True)])
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: the transformer (Linear) is compiled with fullgraph=True; ...
    """
    for module in modules:
        if getattr(_compile_context(module), "fullgraph", False) is True:
            name = type(getattr(module, "_orig_mod", module)).__name__
            raise ConfigError(
                f"the transformer ({name}) is compiled with fullgraph=True; X-Slim breaks the graph "
                "once per transformer call (its decisions stay outside compiled code): compile it "
                "without fullgraph, or compile its blocks with fullgraph=True "
                "(transformer.compile_repeated_blocks(fullgraph=True))"
            )


class CompiledRegions:
    """Where a transformer call under ``torch.compile`` is eager and where it is compiled.

    One per engine. :meth:`eager_call` wraps the model's forward (inside X-Slim's call hook);
    :meth:`call_block` runs one block's original forward, compiled when the call is.
    :meth:`take_block_compiles` / :meth:`restore_block_compiles` handle blocks the user compiled
    one by one.
    """

    def __init__(self) -> None:
        self._callback: Any = _NO_CALLBACK  # the compile's callback during a compiled call
        self._block_callbacks: dict[int, Any] = {}  # block index -> its own compiled call's callback
        self._taken: list[tuple[nn.Module, Any]] = []  # (block, its _compiled_call_impl)

    @property
    def active(self) -> bool:
        """A compiled call is running (its model code eagerly)."""
        return self._callback is not _NO_CALLBACK

    def compiles(self) -> bool:
        """A transformer call starting now runs compiled code: a compile is active, or the user
        compiled blocks (a dispatch mode such as FLOP counting must then stay off: under one,
        dynamo gives up on a frame for good)."""
        active = get_eval_frame_callback is not None and get_eval_frame_callback() is not _NO_CALLBACK
        return self.active or active or bool(self._block_callbacks)

    def enter_call(self) -> None:
        """A transformer call starts (X-Slim's forward pre-hook, the first thing it does): if a
        compile is active, switch dynamo's callback off (X-Slim's work and the model's forward
        run eagerly) and keep it for the blocks."""
        callback = get_eval_frame_callback() if get_eval_frame_callback is not None else _NO_CALLBACK
        self._callback = callback
        if callback is not _NO_CALLBACK:
            set_eval_frame(_NO_CALLBACK)

    def leave_call(self) -> None:
        """The call ended (X-Slim's forward hook, the first thing it does): dynamo's callback back."""
        callback, self._callback = self._callback, _NO_CALLBACK
        if callback is not _NO_CALLBACK:
            set_eval_frame(callback)

    def forget(self) -> None:
        """Drop the call's callback without setting it (a call that never ended: a
        ``KeyboardInterrupt``, after which ``torch.compile``'s wrapper restored dynamo itself)."""
        self._callback = _NO_CALLBACK

    def call_block(self, index: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward(*args, **kwargs)`` of block ``index``: under the compile's callback (or the
        block's own) when one applies, so its frame is compiled (or found compiled)."""
        callback = self._block_callbacks.get(index, self._callback)
        if callback is _NO_CALLBACK:
            return forward(*args, **kwargs)
        prior = set_eval_frame(callback)
        try:
            return forward(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    def take_block_compiles(self, blocks: list[nn.Module]) -> None:
        """Take the compiled call off blocks the user compiled (``nn.Module.compile()``): X-Slim's
        block hook must run outside it; the block's original forward then runs under its callback."""
        if set_eval_frame is None:
            return
        for index, blk in enumerate(blocks):
            compiled_call = getattr(blk, "_compiled_call_impl", None)
            callback = compile_callback(compiled_call) if compiled_call is not None else None
            if callback is None:  # not compiled, or by a wrapper whose callback cannot be read
                continue
            self._taken.append((blk, compiled_call))
            self._block_callbacks[index] = callback
            blk._compiled_call_impl = None

    def restore_block_compiles(self) -> None:
        """Put back every compiled call :meth:`take_block_compiles` took."""
        for blk, compiled_call in self._taken:
            blk._compiled_call_impl = compiled_call
        self._taken.clear()
        self._block_callbacks.clear()
