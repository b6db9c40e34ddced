"""The caches of one guidance branch and the estimators that turn them into a current value.

Everything X-Slim reuses lives here: the stack residual (what a skipped step adds), each block's
residual (what a reused block adds), the token history (which tokens changed most) and the step
probe. A cached quantity is a :class:`Track`: the last value computed, the step that computed
it, and the per-step slope between its last two computations; :meth:`Track.estimate` is the one
place that extrapolates (``extrapolate="linear"``) or reuses the last value (``"none"``). Room is
left for other estimators (e.g. Taylor-style, higher order): a subclass of :class:`Track`
overriding ``update``/``estimate``.

The K/V rows of token refresh live with the attention processors that use them
(:class:`~xslim_xdit.adapters.attention.TokenContext`).

Example:
    >>> import torch
    >>> track = Track(linear=True)
    >>> track.update((torch.tensor([1.0]),), step=2)
    >>> track.update((torch.tensor([3.0]),), step=4)
    >>> track.estimate(5)[0].tolist()
    [4.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters.attention import gather_rows, splice

Values = tuple[torch.Tensor | None, ...]


def _same_shape(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape


class Track:
    """A cached quantity along the steps: the last value (a tuple of tensors, e.g. the image and
    text residuals of a block), its step, and the per-step slope between its last two values.

    The slope is taken only when the first element (the image stream) kept its shape; other
    elements get a slope where they too kept theirs. Updating twice at one step keeps the slope.
    """

    def __init__(self, linear: bool) -> None:
        self.linear = linear
        self.values: Values | None = None
        self.step = -1
        self.slope: Values | None = None

    def update(self, values: Values, step: int) -> None:
        old = self.values
        if self.linear and old is not None and _same_shape(old[0], values[0]):
            gap = step - self.step
            if gap > 0:
                self.slope = tuple(
                    (v - o) / gap if _same_shape(v, o) else None  # type: ignore[operator]
                    for v, o in zip(values, old, strict=True)
                )
        else:
            self.slope = None
        self.values, self.step = values, step

    def estimate(self, step: int, base: Values | None = None, base_step: int | None = None) -> Values:
        """The value at ``step``: the last value (or ``base``, a later value computed at
        ``base_step`` that this track's slope still applies to) moved along the slope."""
        values = self.values if base is None else base
        start = self.step if base_step is None else base_step
        assert values is not None
        slope = self.slope
        if slope is None or not _same_shape(slope[0], values[0]):
            return values
        gap = step - start
        return tuple(
            v + gap * s if v is not None and s is not None else v for v, s in zip(values, slope, strict=True)
        )

    def nbytes(self) -> int:
        return sum(_nbytes(t) for part in (self.values or (), self.slope or ()) for t in part)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class BranchCaches:
    """Caches of one guidance branch (a pipeline that calls the transformer once per branch and
    step has one per branch; a pipeline that batches the branches has one).

    ``stack`` is the latest stack residual (any step that produced one); ``exact`` holds the
    residuals of full steps only, whose slope ``stack`` is moved along: a block or token step's
    residual carries stale parts, which would bend the slope (measured: worse than skips).
    """

    linear: bool
    probe_prev: torch.Tensor | None = None
    stack: Track = field(init=False)
    exact: Track = field(init=False)
    token_history: torch.Tensor | None = None  # the stack residual before ``stack``'s, for token scores
    blocks: dict[int, Track] = field(default_factory=dict)
    block_mag: torch.Tensor | None = None  # (blocks, 2) partial sums: sum|out-in|, count (full steps)

    def __post_init__(self) -> None:
        self.stack = Track(linear=False)
        self.exact = Track(linear=self.linear)

    # ------------------------------------------------------------------ stack residual
    @property
    def residual(self) -> torch.Tensor | None:
        return None if self.stack.values is None else self.stack.values[0]

    def can_reuse_stack(self, img: torch.Tensor) -> bool:
        """A stack residual of this shape exists (PipeFusion's switch to patches changes it)."""
        return _same_shape(self.residual, img)

    def stack_estimate(self, step: int) -> torch.Tensor:
        """The stack residual for a step that does not compute it: the latest one moved along the
        slope between the last two full steps (``extrapolate="linear"``), or the latest one."""
        return self.exact.estimate(step, base=self.stack.values, base_step=self.stack.step)[0]  # type: ignore[return-value]

    def text_stack_estimate(self, step: int) -> torch.Tensor | None:
        """The second stream's stack residual, estimated as :meth:`stack_estimate` is; recorded only
        for a family whose output reads that stream (``text_output_used``: LTX-2's audio), else
        ``None``."""
        values = self.exact.estimate(step, base=self.stack.values, base_step=self.stack.step)
        return values[1] if len(values) > 1 else None

    def record_stack(
        self, res: torch.Tensor, step: int, exact: bool, text_res: torch.Tensor | None = None
    ) -> None:
        values = (res,) if text_res is None else (res, text_res)
        if exact:
            self.exact.update(values, step)
        self.stack.update(values, step)

    def shift_token_history(
        self, index: torch.Tensor | None = None, flat: torch.Tensor | None = None
    ) -> None:
        """Before a new stack residual is recorded: the current one becomes the history that token
        scores compare against; after a token step only the refreshed rows move on."""
        current = self.residual
        if index is not None and self.token_history is not None and current is not None:
            self.token_history = splice(self.token_history, index, gather_rows(current, index, flat), flat)
        else:
            self.token_history = current

    # ------------------------------------------------------------------ blocks
    def block_estimate(self, g: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residuals (image, text) a reused block adds at ``step``."""
        img, txt = self.blocks[g].estimate(step)
        assert img is not None
        return img, txt

    def record_block(self, g: int, d_img: torch.Tensor, d_txt: torch.Tensor | None, step: int) -> None:
        self.blocks.setdefault(g, Track(linear=self.linear)).update((d_img, d_txt), step)

    def record_block_magnitude(self, g: int, num_blocks: int, out: torch.Tensor, inp: torch.Tensor) -> None:
        if self.block_mag is None:
            self.block_mag = torch.zeros(num_blocks, 2, dtype=torch.float64, device=out.device)
        self.block_mag[g, 0] = (out - inp).abs().sum(dtype=torch.float64)
        self.block_mag[g, 1] = float(out.numel())

    def nbytes(self) -> dict[str, int]:
        return {
            "stack_residual": self.stack.nbytes() + self.exact.nbytes(),
            "token_history": _nbytes(self.token_history),
            "block_residuals": sum(t.nbytes() for t in self.blocks.values()),
            "probe": _nbytes(self.probe_prev),
        }
