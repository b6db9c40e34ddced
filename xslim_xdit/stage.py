"""An engine joins a PipeFusion pipeline as one stage: the wiring between the engine, its
decision room and :mod:`xslim_xdit.parallel.pipeline` (the channel, the first stage's decision
forwarded, the token exchange), kept out of :mod:`xslim_xdit.engine` (docs/parallel.md,
"PipeFusion").

Example:
    >>> from xslim_xdit.stage import join_pipeline
    >>> callable(join_pipeline)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .adapters.token_context import KVBufferFn
from .decision import DepthLayout
from .parallel.pipeline import TOKEN_REFRESH_FAMILIES, PipelineSync, PipelineTokens


class StageMismatchError(RuntimeError):
    """The stage's blocks are not the ones the pipeline's block ranges give it."""


def pipefusion_token_refusal(family: str) -> str | None:
    """Why token refresh under PipeFusion is refused for ``family`` (None: supported; its token
    processor writes PipeFusion's patch K/V buffer). ``enable_xslim_xdit`` asks before anything is
    attached; :func:`join_pipeline` again.

    Example:
        >>> pipefusion_token_refusal("pixart") is None
        True
        >>> pipefusion_token_refusal("dit")[:60]
        'token refresh under PipeFusion is supported for flux, pixart'
    """
    if family in TOKEN_REFRESH_FAMILIES:
        return None
    return (
        f"token refresh under PipeFusion is supported for {', '.join(TOKEN_REFRESH_FAMILIES)}, not "
        f"{family!r} (its token processor does not write PipeFusion's patch K/V buffers); use "
        "polish='block' or 'none', or a schedule without token steps"
    )


def join_pipeline(
    engine: Any,
    channel: Any,
    global_stacks: list[tuple[int, int]],
    *,
    patch_info: Callable[[], tuple[int, int]] | None = None,
    num_patches: int = 1,
    token_groups: Callable[[], tuple[Sequence[int] | None, int | None]] | None = None,
    kv_buffer: KVBufferFn | None = None,
) -> None:
    """Make ``engine`` one stage of a PipeFusion pipeline (what
    :meth:`xslim_xdit.engine.XSlimEngine.set_pipeline` does; its docstring has the arguments)."""
    if engine.per_sample:
        raise NotImplementedError(
            "per_sample decisions under PipeFusion are not supported: the stages forward one "
            "decision per call; use per_sample=False"
        )
    refusal = pipefusion_token_refusal(engine.adapter.name) if engine.use_token else None
    if refusal is not None:
        raise NotImplementedError(refusal)
    if engine.use_token and (token_groups is None or kv_buffer is None):
        raise NotImplementedError(
            "token refresh under PipeFusion needs the patches' token groups and PipeFusion's K/V "
            "buffer (token_groups=, kv_buffer=; enable_xslim_xdit passes both)"
        )
    first, n = channel.block_ranges[channel.stage]
    if n != len(engine.blocks):
        raise StageMismatchError(f"stage {channel.stage} holds {len(engine.blocks)} blocks, expected {n}")
    engine.pipeline = channel
    engine.block_offset = first
    if first > 0:
        engine.seg_start = 0  # the probe block lives on the first stage
    managed_from = 1 if engine.config.step_indicator == "first_block_residual" else 0
    engine.room.layout = DepthLayout(tuple(tuple(s) for s in global_stacks), managed_from)  # type: ignore[misc]
    engine.room.sync = PipelineSync(engine.room.sync, channel)
    engine.patch_info = patch_info
    if engine.config.lagged_indicator is None and num_patches > 1:
        # patch 0 decides the step before the later patches of the step exist (docs/parallel.md)
        engine.room.lagged = True
    if engine.token_ctx is not None:
        # tokens are selected within each patch (one device: the same groups) on the whole
        # depth's residual change, by the first stage; the patch's K/V go through PipeFusion's
        # buffer (docs/parallel.md, "Token refresh under PipeFusion")
        tokens = PipelineTokens(channel)
        engine.room.token_group_sizes = token_groups
        engine.room.pipeline_tokens = tokens
        engine.token_ctx.kv_buffer = kv_buffer
        engine.observers.append(tokens)  # its call events: the changes travel, the switch is seeded
