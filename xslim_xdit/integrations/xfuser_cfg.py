"""Which guidance branch a CFG-parallel rank holds, for the lead-branch rule.

Under xfuser's CFG parallel each rank runs one guidance branch, and the rank holding the branch a
single device calls first (``cache_context("cond")``) supplies the step's statistics
(:func:`~xslim_xdit.parallel.sync.sum_from_lead_branch`). The rule reads the branch from the
call's ``cache_context`` name. Some xFuser pipelines run the parent pipeline's one-branch path on
every CFG rank, so every call is named ``"cond"`` whatever the rank holds: for those the branch
comes from the CFG rank (:data:`CFG_BRANCHES_BY_RANK`). Imports nothing from xfuser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

#: xFuser pipelines whose every call is named ``cache_context("cond")`` under CFG parallel, and the
#: branch each CFG rank really holds. ``xFuserQwenImageEditPipeline``
#: (``xfuser/model_executor/pipelines/pipeline_qwen_image_edit.py``): CFG rank 0 gets the negative
#: prompt as its ``prompt``, and the all-gather of the predictions unpacks ``(uncond, cond)`` in
#: rank order.
CFG_BRANCHES_BY_RANK: dict[str, tuple[str, ...]] = {"xFuserQwenImageEditPipeline": ("uncond", "cond")}


class _NamedClock(Protocol):
    name: str | None  # the current call's cache_context name (StepClock.name)


def branches_by_rank(pipe_or_transformer: Any) -> tuple[str, ...] | None:
    """The branch names by CFG rank of a pipeline in :data:`CFG_BRANCHES_BY_RANK` (its class or a
    base class, matched by name: xfuser need not be imported); None for anything else.

    Example:
        >>> class xFuserQwenImageEditPipeline: ...
        >>> class MyEditPipeline(xFuserQwenImageEditPipeline): ...
        >>> branches_by_rank(MyEditPipeline()), branches_by_rank(object())
        (('uncond', 'cond'), None)
    """
    for cls in type(pipe_or_transformer).__mro__:
        if cls.__name__ in CFG_BRANCHES_BY_RANK:
            return CFG_BRANCHES_BY_RANK[cls.__name__]
    return None


def cfg_branch_name(pipe_or_transformer: Any, clock: _NamedClock, cfg_rank: int) -> Callable[[], str | None]:
    """The function the decision room asks for the current call's guidance branch
    (``engine.room.branch_name``) on CFG rank ``cfg_rank``: the call's ``cache_context`` name
    (``clock.name``), or, for a pipeline of :data:`CFG_BRANCHES_BY_RANK`, the branch that rank
    holds for every named call (an unnamed call stays unnamed: the plain sums).

    Raises:
        ValueError: ``cfg_rank`` is not a rank of the pipeline's table entry.

    Example:
        >>> from types import SimpleNamespace
        >>> class xFuserQwenImageEditPipeline: ...
        >>> clock = SimpleNamespace(name="cond")  # xfuser's pipeline names both ranks' calls "cond"
        >>> cfg_branch_name(xFuserQwenImageEditPipeline(), clock, cfg_rank=0)()
        'uncond'
        >>> cfg_branch_name(object(), clock, cfg_rank=0)()  # any other pipeline: the call's own name
        'cond'
    """
    names = branches_by_rank(pipe_or_transformer)
    if names is None:
        return lambda: clock.name
    if isinstance(cfg_rank, bool) or not isinstance(cfg_rank, int) or not 0 <= cfg_rank < len(names):
        raise ValueError(
            f"cfg_rank must be one of {list(range(len(names)))} for {type(pipe_or_transformer).__name__} "
            f"(its branches by CFG rank: {names}); got {cfg_rank!r}"
        )
    mine = names[cfg_rank]
    return lambda: None if clock.name is None else mine
