"""The one narrow interface through which every X-Slim decision passes.

The engine never calls torch.distributed itself. At each decision point it hands this object
(1) the *partial sums* behind an indicator, packed in one tensor, and gets back their exact
global sums, and (2) the decision as integers, and gets back the integers every rank will act
on. On one device both are identities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .failure import EXIT_GRACE_S, arm_exit_guard
from .fingerprint import RankMismatchError, differing_fields, fingerprint_vector, mismatch


class XSlimCollectiveError(RuntimeError):
    """An X-Slim collective failed or timed out: another rank stopped answering. The process
    groups it used are no longer usable; the exit guard ends the process soon after (see
    :mod:`xslim_xdit.parallel.failure`)."""


class DecisionSync:
    """Base class: no collectives. Subclasses reduce over process groups.

    Attributes:
        collectives: number of collective calls issued so far.
        bytes_sent: payload bytes handed to those collectives.

    Example:
        >>> sync = LocalSync()
        >>> sync.sum_partials(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
        >>> sync.agree([3, 1])
        [3, 1]
    """

    def __init__(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0

    @property
    def is_distributed(self) -> bool:
        return False

    def sum_partials(self, partials: torch.Tensor) -> torch.Tensor:
        """Exact global sums of per-rank partial sums (float64 on the wire)."""
        return partials

    def sum_block_partials(self, partials: torch.Tensor) -> torch.Tensor:
        """Like :meth:`sum_partials`, for per-block statistics; pipeline stages contribute the
        rows of the blocks they own (the others are zero), so the sum is the whole depth."""
        return self.sum_partials(partials)

    def agree(self, values: Sequence[int], device: torch.device | None = None) -> list[int]:
        """The integers every rank acts on (rank 0's, on every rank of the decision group).
        ``device`` is where the model's tensors live (accelerator backends reduce there)."""
        return [int(v) for v in values]

    # ---------------------------------------------- calibration: exact, outside the forward
    def sum_exact(self, partials: torch.Tensor) -> torch.Tensor:
        """Global sums of per-rank partial sums (float64) with the same bytes on every rank of the
        decision group: every rank's partials are gathered and added in rank order, so no
        backend's summation order can make two ranks differ. Calibration profiles use it."""
        return partials.detach().to(torch.float64)

    def gather_stages(self, local: torch.Tensor) -> list[torch.Tensor]:
        """``local`` of every pipeline stage of this rank's pipeline, in stage order (one
        all-gather; ``[local]`` without PipeFusion). Same shape on every stage. Call it outside
        the forward (a collective across stages inside it would deadlock)."""
        return [local]

    def from_output_rank(self, values: Sequence[float], holds_output: bool) -> list[float]:
        """``values`` (float64) of one rank of the whole generation, on every rank of it: the
        highest rank with ``holds_output`` (the pipeline's final output, e.g. PipeFusion's last
        stage), else the highest rank. Lets every rank act on the closed-loop check of the rank
        that saw the real output."""
        return [float(v) for v in values]

    def reset_counters(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0

    def start_run(self) -> None:
        """A new denoising run starts: forget any protocol state of the last one."""

    def check_run(self, fingerprint: Mapping[str, str]) -> None:
        """At the start of a run, before any decision: raise
        :class:`~xslim_xdit.parallel.fingerprint.RankMismatchError` on every rank when the ranks
        that decide together hold different ``fingerprint`` values (one collective; nothing on
        one device). ``fingerprint`` maps each decision-relevant field to its ``repr``
        (:func:`~xslim_xdit.parallel.fingerprint.run_fingerprint`)."""

    # -------------------------------------------- where the decision is taken and how it travels
    #: this rank decides (with its group); False on the later stages of a PipeFusion pipeline,
    #: which act on the decision the previous stage forwards (:meth:`receive_decision`)
    is_decider: bool = True

    def begin_decision(self) -> None:
        """Called on a deciding rank before each step's decision (PipeFusion's first stage reads
        the block statistics the later stages sent after the last full step)."""

    def receive_decision(self, length: int) -> list[int] | None:
        """The decision ``[kind, whole-depth block mask...]`` taken elsewhere, on a rank that does
        not decide; ``None`` on a deciding rank."""
        return None

    def publish_decision(self, values: Sequence[int], block_statistics_follow: bool) -> None:
        """A deciding rank hands its step decision on (PipeFusion: to the next stage).
        ``block_statistics_follow``: the later stages will send block statistics after this step."""

    def whole_depth_block_partials(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's per-block partial sums extended to the whole depth (PipeFusion's first
        stage appends the later stages' rows), ready for :meth:`sum_block_partials`."""
        return local

    def publish_block_statistics(self, stats: torch.Tensor) -> None:
        """A later PipeFusion stage sends its blocks' statistics to the deciding stage."""


class LocalSync(DecisionSync):
    """Single device, no torch.distributed: every call is an identity."""


#: the guidance branches a single device calls first in each step: every diffusers pipeline that
#: calls its branches separately opens ``cache_context("cond")`` before ``("uncond")`` (Wan,
#: Qwen-Image, FLUX, HunyuanVideo, CogView4, ...), the guider-driven ones ``"pred_cond"`` first
LEAD_BRANCHES: frozenset[str] = frozenset({"cond", "pred_cond"})


def sum_from_lead_branch(
    partials: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    branch: str | None,
    lead_branches: frozenset[str] = LEAD_BRANCHES,
) -> torch.Tensor:
    """``reduce`` (an exact sum over the decision group) of ``partials``, counting only the ranks
    that hold the lead guidance branch when the group's calls hold different named branches.

    A single device that calls each guidance branch separately decides a step at its first call,
    the lead branch (:data:`LEAD_BRANCHES`), from that branch's statistics alone; under CFG
    parallelism (one branch per rank, e.g. xfuser's Wan I2V pipeline) every rank's call is the
    first of its step. So the partial sums travel twice in one reduction: as they are, and zeroed
    on every rank whose ``branch`` (its ``cache_context`` name) is not a lead branch, with two
    counters (ranks holding a lead branch, ranks holding another named branch). When both
    counters are positive the lead-only sums are returned (the lead's values plus zeros: the
    single device's, exactly, without SP); otherwise (one device, SP alone, batched guidance,
    unnamed calls) the plain sums. Every rank gets the same sums, so no agreement is needed.
    Every rank of the group must call it alike (the payload is ``2 * numel + 2`` float64).

    Example:
        >>> def with_cond_rank(packed):  # the other rank holds "cond", with partial sums [5, 2]
        ...     return packed + torch.tensor([5.0, 2.0, 5.0, 2.0, 1.0, 0.0], dtype=torch.float64)
        >>> sum_from_lead_branch(torch.tensor([3.0, 2.0]), with_cond_rank, "uncond").tolist()
        [5.0, 2.0]
        >>> sum_from_lead_branch(torch.tensor([3.0, 2.0]), LocalSync().sum_partials, "uncond").tolist()
        [3.0, 2.0]
    """
    flat = partials.detach().to(torch.float64).reshape(-1)
    lead = branch is not None and branch in lead_branches
    other = branch is not None and not lead
    packed = torch.cat(
        [
            flat,
            flat if lead else torch.zeros_like(flat),  # zeros, not a product: inf * 0 is NaN
            torch.tensor([float(lead), float(other)], dtype=torch.float64, device=flat.device),
        ]
    )
    total = reduce(packed)
    n = flat.numel()
    separate_branches = float(total[-2]) > 0 and float(total[-1]) > 0
    chosen = total[n : 2 * n] if separate_branches else total[:n]
    return chosen.reshape(partials.shape).to(partials.device)


def _comm_device(group: object, device: torch.device | None) -> torch.device:
    """gloo reduces CPU tensors; NCCL (and other accelerator backends) the model's own device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo" or device is None:
        return torch.device("cpu")
    return device


class GroupSync(DecisionSync):
    """Exact reductions and integer agreement over one torch.distributed process group.

    ``group`` is every rank that takes part in one generation (sequence-parallel shards,
    CFG-parallel branches, pipeline stages); data-parallel replicas get a group each, so they
    decide independently and never wait for each other. Partial sums travel as float64 in one
    all-reduce; decisions as int64 in one broadcast from the group's first rank.

    ``timeout_s`` bounds every X-Slim collective: a rank that stops answering makes the others
    raise :class:`XSlimCollectiveError` instead of hanging, and the exit guard then ends the
    process within ``exit_grace_s`` if it cannot exit by itself (a pending collective blocks
    a process group's destructor; :mod:`xslim_xdit.parallel.failure`). Create ``group`` with
    ``timeout=timedelta(seconds=timeout_s)`` so that the backend, too, drops the pending
    operation by then (the xDiT integration does).

    Example:
        >>> import torch.distributed as dist  # doctest: +SKIP
        >>> sync = GroupSync(dist.group.WORLD)  # doctest: +SKIP
    """

    def __init__(
        self, group: object = None, timeout_s: float | None = 300.0, exit_grace_s: float | None = EXIT_GRACE_S
    ) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GroupSync needs torch.distributed initialised (use LocalSync on one device)")
        self.group = group
        ranks = (
            dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        )
        self.ranks = list(ranks)
        self.src = min(self.ranks)
        self.timeout_s = timeout_s
        self.exit_grace_s = exit_grace_s
        #: run fingerprints compared (one all-gather each); not counted in ``collectives``,
        #: which are the per-step decision traffic
        self.run_checks = 0

    @property
    def is_distributed(self) -> bool:
        return len(self.ranks) > 1

    def _wait(self, work: object, what: str) -> None:
        import datetime

        if self.timeout_s is None:
            work.wait()  # type: ignore[attr-defined]
            return
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))  # type: ignore[attr-defined]
        except RuntimeError as e:
            self._fail(
                f"X-Slim {what} over ranks {self.ranks} failed or timed out after {self.timeout_s}s: "
                f"another rank stopped ({e})",
                e,
            )
        if ok is False:
            self._fail(f"X-Slim {what} over ranks {self.ranks} timed out after {self.timeout_s}s", None)

    def _fail(self, message: str, cause: BaseException | None) -> None:
        """Raise the failure, with the exit guard armed: the operation is still pending in the
        group, so the interpreter may not be able to exit on its own."""
        if self.exit_grace_s is not None:
            arm_exit_guard(message, self.exit_grace_s)
        raise XSlimCollectiveError(message) from cause

    def check_run(self, fingerprint: Mapping[str, str]) -> None:
        if not self.is_distributed:
            return
        import torch.distributed as dist

        mine = torch.tensor(fingerprint_vector(fingerprint), dtype=torch.int64, device=self._device())
        parts = [torch.empty_like(mine) for _ in self.ranks]
        self.run_checks += 1
        self._wait(
            dist.all_gather(parts, mine, group=self.group, async_op=True), "run fingerprint all-gather"
        )
        gathered = [p.tolist() for p in parts]
        problem = mismatch(fingerprint, gathered, self.ranks)
        if problem is None:
            return
        # Every rank saw the same gathered vectors, so every rank is here: the readable values
        # of the differing fields can be exchanged (only on this failure path) for the message.
        detail = ""
        differing = differing_fields(fingerprint, gathered)
        if differing:
            try:
                seen: list[object] = [None] * len(self.ranks)
                dist.all_gather_object(seen, {n: fingerprint[n] for n in differing}, group=self.group)
                detail = "; values: " + ", ".join(
                    f"rank {r} " + " ".join(f"{n}={v}" for n, v in d.items())  # type: ignore[union-attr]
                    for r, d in zip(self.ranks, seen, strict=True)
                )
            except Exception:  # noqa: BLE001 - the hashes already name the fields
                detail = ""
        raise RankMismatchError(
            f"X-Slim ranks {self.ranks} are configured differently for this run (found on rank "
            f"{dist.get_rank()}): {problem}{detail}. Pass the same XSlimConfig and num_inference_steps "
            "on every rank"
        )

    def _device(self) -> torch.device:
        """Where this group's tensors travel when no tensor says it: CPU for gloo, the current
        accelerator otherwise (whatever its kind: torch.accelerator, not a device literal)."""
        import torch.distributed as dist

        accelerator = torch.accelerator.current_accelerator()
        if dist.get_backend(self.group) == "gloo" or accelerator is None:
            return torch.device("cpu")
        return torch.device(accelerator.type, torch.accelerator.current_device_index())

    def sum_partials(self, partials: torch.Tensor) -> torch.Tensor:
        if not self.is_distributed:
            return partials
        import torch.distributed as dist

        t = (
            partials.detach()
            .to(device=_comm_device(self.group, partials.device), dtype=torch.float64)
            .contiguous()
        )
        self.collectives += 1
        self.bytes_sent += t.numel() * t.element_size()
        self._wait(
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True), "indicator all-reduce"
        )
        return t.to(partials.device)

    def sum_exact(self, partials: torch.Tensor) -> torch.Tensor:
        if not self.is_distributed:
            return partials.detach().to(torch.float64)
        import torch.distributed as dist

        t = (
            partials.detach()
            .to(device=_comm_device(self.group, partials.device), dtype=torch.float64)
            .contiguous()
        )
        parts = [torch.empty_like(t) for _ in self.ranks]
        self.collectives += 1
        self.bytes_sent += t.numel() * t.element_size()
        self._wait(dist.all_gather(parts, t, group=self.group, async_op=True), "exact partial-sum all-gather")
        total = parts[0].clone()
        for p in parts[1:]:  # group rank order: the same additions, in the same order, everywhere
            total += p
        return total.to(partials.device)

    def from_output_rank(self, values: Sequence[float], holds_output: bool) -> list[float]:
        if not self.is_distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        dev = self._device()
        flag = torch.tensor([1 if holds_output else 0], dtype=torch.int64, device=dev)
        flags = [torch.empty_like(flag) for _ in self.ranks]
        self._wait(dist.all_gather(flags, flag, group=self.group, async_op=True), "output-rank all-gather")
        holders = [r for r, f in zip(self.ranks, flags, strict=True) if int(f.item())]
        src = max(holders) if holders else max(self.ranks)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        self._wait(dist.broadcast(t, src=src, group=self.group, async_op=True), "closed-loop check broadcast")
        return [float(v) for v in t.tolist()]

    def agree(self, values: Sequence[int], device: torch.device | None = None) -> list[int]:
        if not self.is_distributed:
            return [int(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_comm_device(self.group, device))
        self.collectives += 1
        self.bytes_sent += t.numel() * t.element_size()
        self._wait(dist.broadcast(t, src=self.src, group=self.group, async_op=True), "decision broadcast")
        return [int(v) for v in t.tolist()]
