"""PipeFusion: the step decision travels from stage to stage, point to point.

A collective that spans pipeline stages cannot sit inside the transformer's forward: while the
first stage runs its blocks, the next stage is waiting to receive them, so both would wait for
each other. The first stage (which holds block 0 and so the probe) decides; the decision is sent
to the next stage before the activations are, and each stage forwards it. After a full step the
later stages send their per-block statistics back to the first stage, which reads them when it
next decides, by which time the pipeline has delivered them (the first stage cannot start the
next step before the last stage has returned the current one).

All messages go through a process group of their own, so they never interleave with xfuser's
own pipeline traffic. Sends are posted without waiting (a gloo send blocks until its receive is
posted) and their handles kept until complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .failure import EXIT_GRACE_S, arm_exit_guard
from .sync import DecisionSync, XSlimCollectiveError

#: families whose token processor hands its K/V to PipeFusion's patch buffer in the layout of
#: xfuser's own processor (``TokenContext.kv_buffer``: the joint processor for FLUX, the
#: self-attention processor for PixArt's ``attn1``); token refresh is refused for others
TOKEN_REFRESH_FAMILIES = ("flux", "pixart")


@dataclass
class PipelineChannel:
    """Decision and statistics messages between the stages of one pipeline.

    Attributes:
        group: a process group containing exactly this pipeline's ranks.
        ranks: the global ranks of the stages, in stage order.
        stage: this rank's stage index.
        block_ranges: ``(first global block, number of blocks)`` of every stage.
        device: where message tensors live (CPU for gloo, the model's device otherwise).
        timeout_s: how long a receive waits for its message before raising
            :class:`~xslim_xdit.parallel.XSlimCollectiveError` (None: forever).
        agreement: the sync over every rank of this generation (all stages), which compares the
            run fingerprint (:meth:`PipelineSync.check_run`); None: only within the stage.
    """

    group: Any
    ranks: list[int]
    stage: int
    block_ranges: list[tuple[int, int]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float | None = None
    agreement: DecisionSync | None = None
    messages: int = 0
    _pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list, repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def total_blocks(self) -> int:
        first, n = self.block_ranges[-1]
        return first + n

    def _send(self, t: torch.Tensor, dst_stage: int, tag: int = 0) -> None:
        import torch.distributed as dist

        self._reap()
        t = t.to(self.device).contiguous()
        work = dist.isend(t, dst=self.ranks[dst_stage], group=self.group, tag=tag)
        self._pending.append((work, t))
        self.messages += 1

    def _recv(self, like: torch.Tensor, src_stage: int, tag: int = 0) -> torch.Tensor:
        import torch.distributed as dist

        t = torch.empty_like(like, device=self.device)
        work = dist.irecv(t, src=self.ranks[src_stage], group=self.group, tag=tag)
        what = f"X-Slim pipeline receive from rank {self.ranks[src_stage]} (stage {src_stage})"
        if self.timeout_s is None:
            work.wait()
        else:
            import datetime

            try:
                ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                self._fail(f"{what} failed or timed out after {self.timeout_s}s: the stage stopped ({e})", e)
            if ok is False:
                self._fail(f"{what} timed out after {self.timeout_s}s", None)
        self.messages += 1
        return t

    def _fail(self, message: str, cause: BaseException | None) -> None:
        arm_exit_guard(message, EXIT_GRACE_S)  # the receive is still pending in the group
        raise XSlimCollectiveError(message) from cause

    def _reap(self) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def forward_decision(self, values: list[int] | None, length: int) -> list[int]:
        """First stage: send ``values`` on. Later stages: receive them (and pass them on)."""
        if not self.is_first:
            t = self._recv(torch.zeros(length, dtype=torch.int64), self.stage - 1)
            values = [int(v) for v in t.tolist()]
        assert values is not None and len(values) == length
        if not self.is_last:
            self._send(torch.tensor(values, dtype=torch.int64), self.stage + 1)
        return values

    def send_block_stats(self, stats: torch.Tensor) -> None:
        """A later stage sends its blocks' statistics (rows of its own blocks) to the first."""
        self._send(stats.to(torch.float64), 0)

    def recv_block_stats(self) -> list[torch.Tensor]:
        """The first stage receives every later stage's statistics, in stage order."""
        return [
            self._recv(torch.zeros(n, 2, dtype=torch.float64), s)
            for s, (_, n) in enumerate(self.block_ranges)
            if s > 0
        ]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` of every stage, in stage order (one all-gather over the pipeline's group; for
        calibration profiles, after a run: never inside the forward)."""
        import torch.distributed as dist

        t = t.to(self.device).contiguous()
        parts = [torch.empty_like(t) for _ in self.ranks]
        work = dist.all_gather(parts, t, group=self.group, async_op=True)
        what = f"X-Slim pipeline all-gather over ranks {self.ranks}"
        if self.timeout_s is None:
            work.wait()
        else:
            import datetime

            try:
                ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                self._fail(f"{what} failed or timed out after {self.timeout_s}s: a stage stopped ({e})", e)
            if ok is False:
                self._fail(f"{what} timed out after {self.timeout_s}s", None)
        # the group lists its ranks in its own order; hand them back in stage order
        return [parts[dist.get_group_rank(self.group, r)] for r in self.ranks]

    def close(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


class PipelineSync(DecisionSync):
    """The PipeFusion protocol behind the :class:`DecisionSync` interface: ``inner`` agrees within
    this stage's group (sequence shards, CFG branches); the first stage decides and forwards the
    decision with the whole-depth block mask; later stages receive it and send their block
    statistics back after each full step.

    Example:
        >>> sync = PipelineSync(inner=DecisionSync(), channel=channel)  # doctest: +SKIP
    """

    def __init__(self, inner: DecisionSync, channel: PipelineChannel) -> None:
        self.inner = inner
        self.channel = channel
        self._statistics_due = False
        self._remote: list[torch.Tensor] = []

    # counters are the inner group's (the channel counts its own messages)
    @property  # type: ignore[override]
    def collectives(self) -> int:
        return self.inner.collectives

    @property  # type: ignore[override]
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    def reset_counters(self) -> None:
        self.inner.reset_counters()

    @property
    def is_distributed(self) -> bool:
        return True

    @property  # type: ignore[override]
    def is_decider(self) -> bool:
        return self.channel.is_first

    def sum_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return self.inner.sum_partials(partials)

    def sum_block_partials(self, partials: torch.Tensor) -> torch.Tensor:
        return self.inner.sum_block_partials(partials)

    def agree(self, values: Sequence[int], device: torch.device | None = None) -> list[int]:
        return self.inner.agree(values, device)

    def sum_exact(self, partials: torch.Tensor) -> torch.Tensor:
        return self.inner.sum_exact(partials)

    def gather_stages(self, local: torch.Tensor) -> list[torch.Tensor]:
        return self.channel.all_gather(local)

    def from_output_rank(self, values: Sequence[float], holds_output: bool) -> list[float]:
        # over every rank of the generation (all stages): the last stage holds the output
        return (self.channel.agreement or self.inner).from_output_rank(values, holds_output)

    def begin_decision(self) -> None:
        if self._statistics_due:
            self._remote = self.channel.recv_block_stats()

    def receive_decision(self, length: int) -> list[int] | None:
        if self.channel.is_first:
            return None
        return self.channel.forward_decision(None, length)

    def publish_decision(self, values: Sequence[int], block_statistics_follow: bool) -> None:
        self._statistics_due = block_statistics_follow
        if self.channel.is_first:
            self.channel.forward_decision([int(v) for v in values], len(values))

    def whole_depth_block_partials(self, local: torch.Tensor) -> torch.Tensor:
        return torch.cat([local.to(torch.float64)] + [m.to(local.device) for m in self._remote])

    def publish_block_statistics(self, stats: torch.Tensor) -> None:
        if not self.channel.is_first:
            self.channel.send_block_stats(stats)

    def check_run(self, fingerprint: Mapping[str, str]) -> None:
        """Every stage of the generation compares the fingerprint, in one all-gather over all of
        them (at the run's start every stage is outside xfuser's pipeline traffic)."""
        (self.channel.agreement or self.inner).check_run(fingerprint)

    def start_run(self) -> None:
        """A new run: nothing is due from the last one."""
        self._statistics_due = False
        self._remote = []


class PipelineTokens:
    """Token refresh across PipeFusion's stages: every stage refreshes the tokens one device would.

    One device scores a token by the change of the *whole depth's* stack residual since the
    token history (``BranchCaches.token_history``); a stage holds only its blocks' part of it. Both
    the residual and the history are sums over the stages' parts (each stage's input is the last
    one's output; the history moves on the same rows everywhere), so the whole depth's change is
    the sum of every stage's ``residual - history``. After each call that records a stack residual
    (full, block and token steps; not on the run's last step) every later stage sends its change
    ``(batch, tokens, channels)`` to the first stage (tag 1); the first stage receives them at its
    next call of the same patch (the messages come in call order) and scores on the sum
    (:meth:`whole_change`); on a token step it selects and sends the token index to every later
    stage (tag 2), which receive it instead of selecting (:meth:`receive_index`).

    At the switch from whole images to patches each patch's token history and full-step track
    start from its rows of the last whole-image ones, as one device's hold them.

    It is one of the engine's observers (the call events, duck-typed: this module sits below
    :mod:`xslim_xdit.observers`); ``XSlimEngine.set_pipeline`` installs it. Cost: one
    residual-sized message per later stage and computed call (the size of the activations
    PipeFusion sends anyway), one index per later stage and token call.
    """

    TAG_CHANGE = 1
    TAG_INDEX = 2

    def __init__(self, channel: PipelineChannel) -> None:
        self.channel = channel
        self._due: set[int] = set()  # branches whose later stages' changes are in flight
        self._remote: dict[int, torch.Tensor] = {}  # per branch: the later stages' summed change
        self.branch = 0
        self._whole: torch.Tensor | None = None  # the last whole-image residual, at the switch
        self._whole_exact: tuple[Any, int] | None = None  # and its full-step track (values, step)

    @property
    def selects(self) -> bool:
        """This stage selects the tokens (the first); the others receive them."""
        return self.channel.is_first

    # ------------------------------------------------------------------ the engine's call events
    def on_run_start(self, engine: Any, num_steps: int) -> None:
        self._due.clear()
        self._remote.clear()
        self.branch = 0
        self._whole = self._whole_exact = None

    def around_block(self, engine: Any, key: Any, run: Any) -> Any:
        return run()

    def on_stack_residual(self, engine: Any, caches: Any, residual: torch.Tensor) -> None:
        pass

    def on_call_start(self, engine: Any, key: Any) -> None:
        """A call of ``engine.branch`` (the patch) starts: seed the patch's tracks at the switch
        to patches; the first stage receives the later stages' changes of the patch's last call."""
        self.branch = branch = engine.branch
        caches = engine.branches.get(branch)
        residual = None if caches is None else caches.residual
        sizes, part = _groups(engine)
        if branch == 0:
            whole = part is not None and residual is not None and residual.shape[1] == sum(sizes)
            self._whole = residual if whole else None
            self._whole_exact = (caches.exact.values, caches.exact.step) if whole else None
        if self._whole_exact is not None and part is not None:
            # the patch's full-step track starts from its rows of the last whole-image full step,
            # so the extrapolation slope of the steps after the switch is one device's
            values, step = self._whole_exact
            track = engine.current_caches().exact
            if values is not None and (track.values is None or track.values[0].shape[1] != sizes[part]):
                start = sum(sizes[:part])
                track.values = (values[0][:, start : start + sizes[part]],) + (None,) * (len(values) - 1)
                track.step = step
        if not self.channel.is_first or branch not in self._due:
            return
        self._due.discard(branch)
        assert residual is not None
        total: torch.Tensor | None = None
        for s in range(1, self.channel.num_stages):
            part_change = self.channel._recv(residual, s, self.TAG_CHANGE)
            total = part_change if total is None else total + part_change
        assert total is not None
        self._remote[branch] = total.to(residual.device)

    def on_call_end(self, engine: Any, record: Any) -> None:
        """A call ended: after one that recorded a stack residual, each later stage sends its
        ``residual - history`` (the first stage expects them at the patch's next call)."""
        if record.kind == "skip":
            return
        caches = engine.current_caches()
        current = caches.residual
        assert current is not None
        if self._whole is not None and (
            caches.token_history is None or caches.token_history.shape != current.shape
        ):
            # the switch to patches: this patch's token history is its rows of the last
            # whole-image residual, as one device's history holds them
            sizes, part = _groups(engine)
            if part is not None:
                start = sum(sizes[:part])
                caches.token_history = self._whole[:, start : start + sizes[part]]
        if engine.step >= (engine.num_steps or 0) - 1:
            return  # nothing decides after the run's last step
        if self.channel.is_first:
            self._due.add(self.branch)
        else:
            self.channel._send(_own_change(caches).detach(), 0, self.TAG_CHANGE)

    # ------------------------------------------------------------------ the decision room's side
    def select(self, room: Any, caches: Any) -> torch.Tensor:
        """The token set of a token call (``DecisionRoom._select_tokens`` under PipeFusion): the
        first stage selects on the whole depth's change (its own plus the later stages' last
        ones) and sends the index on; a later stage receives it (``room._token_whole``: the
        tokens refreshed over the whole image, which the record counts)."""
        current = caches.residual
        assert current is not None
        if not self.selects:
            _, counts, room._token_whole = room._token_groups(current.shape[1])
            return self.receive_index((current.shape[0], sum(counts)), current.device)
        index = room._select_tokens(caches, self.whole_change(_own_change(caches)))
        self.send_index(index)
        return index

    def whole_change(self, own: torch.Tensor) -> torch.Tensor:
        """First stage: the whole depth's change of the current branch (its own plus the later
        stages' last ones)."""
        remote = self._remote.get(self.branch)
        if remote is None or remote.shape != own.shape:
            return own
        return own + remote.to(own.dtype)

    def send_index(self, index: torch.Tensor) -> None:
        for s in range(1, self.channel.num_stages):
            self.channel._send(index.to(torch.int64), s, self.TAG_INDEX)

    def receive_index(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        like = torch.zeros(shape, dtype=torch.int64)
        return self.channel._recv(like, 0, self.TAG_INDEX).to(device)


def _own_change(caches: Any) -> torch.Tensor:
    """This stage's part of the stack residual's change since the token history (the residual
    itself after only one computed step)."""
    current, history = caches.residual, caches.token_history
    return current - history if history is not None and history.shape == current.shape else current


def _groups(engine: Any) -> tuple[list[int], int | None]:
    """The image's token groups and the part the current call holds (``DecisionRoom.token_group_sizes``)."""
    spec = engine.room.token_group_sizes
    sizes, part = spec() if callable(spec) else (spec, None)
    return list(sizes or ()), part
