"""X-Slim under ``torch.compile``: its own Python stays out of compiled graphs.

Example:
    >>> import xslim_xdit.engine  # registers the rules on import
    >>> "xslim_xdit.decision" in EAGER_MODULES
    True
"""

from __future__ import annotations

#: X-Slim's own modules whose Python dynamo never traces (see :func:`keep_out_of_compiled_graphs`).
EAGER_MODULES = (
    "xslim_xdit.adapters.base",
    "xslim_xdit.caches",
    "xslim_xdit.clock",
    "xslim_xdit.controller",
    "xslim_xdit.decision",
    "xslim_xdit.engine",
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
