"""The engine's caches per guidance branch (and per PipeFusion patch): which one a call uses, and
how many bytes they hold. :class:`~xslim_xdit.engine.XSlimEngine` inherits this; the caches
themselves are :class:`~xslim_xdit.caches.BranchCaches`.

Example:
    >>> from xslim_xdit import XSlimConfig, enable_xslim, disable_xslim
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> engine = enable_xslim(m, XSlimConfig(), num_inference_steps=2)
    >>> _ = sample(m, "dit", steps=2)
    >>> sorted(engine.branches), engine.cache_bytes()["stack_residual"] > 0
    ([0], True)
    >>> disable_xslim(m)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .caches import BranchCaches
from .config import XSlimConfig


class EngineCaches:
    """``branches`` (branch index -> its caches), and the engine state they are chosen by."""

    branches: dict[int, BranchCaches]
    branch: int
    config: XSlimConfig
    patch_info: Callable[[], tuple[int, int]] | None
    samples: Any  # the per-sample room (xslim_xdit.batch.SampleRoom), or None
    token_ctx: Any  # the token context (xslim_xdit.adapters.attention.TokenContext), or None

    def image_parts(self) -> list[BranchCaches]:
        """Under PipeFusion's patch phase, the caches of every patch of the image, in patch
        order (created if missing); empty when one call holds the whole image."""
        if self.patch_info is None:
            return []
        count = self.patch_info()[1]
        if count <= 1:
            return []
        linear = self.config.extrapolate == "linear"
        return [self.branches.setdefault(b, BranchCaches(linear=linear)) for b in range(count)]

    def current_caches(self) -> BranchCaches:
        """The caches of the current call's branch (created if missing)."""
        caches = self.branches.get(self.branch)
        if caches is None:
            caches = self.branches[self.branch] = BranchCaches(linear=self.config.extrapolate == "linear")
        return caches

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held per cache kind."""
        out = {"stack_residual": 0, "token_history": 0, "block_residuals": 0, "probe": 0, "kv": 0}
        for caches in self.branches.values():
            for name, n in caches.nbytes().items():
                out[name] += n
        if self.samples is not None:
            for name, n in self.samples.nbytes().items():
                out[name] += n
        if self.token_ctx is not None:
            out["kv"] = self.token_ctx.cache_bytes()
        return out
