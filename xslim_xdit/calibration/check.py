"""The closed-loop check: replay each candidate plan on each calibration run and measure how far
its final output lands from that run's full (reference) output.

``strategy="optimal"`` plans on the full runs' trajectories (open loop), which misjudges how the
errors of the first steps carry on; replaying the plans is what tells them apart. The replay is
a callable, so the check runs without a model in tests.

Example:
    >>> import torch
    >>> refs = [torch.ones(3), torch.full((3,), 2.0)]
    >>> def replay(plan, run):  # a stand-in for the engine: more full steps, smaller error
    ...     return refs[run] * (1 + 0.1 / len(plan))
    >>> cands = check_candidates([(0, 3), (0, 1, 3)], refs, replay)
    >>> [[round(e, 4) for e in c["run_errors"]] for c in cands]
    [[0.05, 0.05], [0.0333, 0.0333]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: ``replay(full_steps, run_index)``: the final output of calibration run ``run_index`` replayed
#: with the schedule of those full steps (``None`` when it has none).
Replay = Callable[[tuple[int, ...], int], "torch.Tensor | None"]


#: ``share(values)``: the values every rank acts on, taken from one rank (the one that holds the
#: pipeline's output; :meth:`~xslim_xdit.parallel.DecisionSync.from_output_rank`)
Share = Callable[[list[float]], list[float]]


def check_candidates(
    plans: Sequence[tuple[int, ...]],
    references: Sequence[torch.Tensor | None],
    replay: Replay,
    share: Share | None = None,
) -> list[dict[str, Any]]:
    """The candidates: one ``{"full_steps": [...], "closed_loop_error": None}`` per plan, with
    ``"run_errors"`` (:func:`relative_error` of each run's replay to its reference, in the order
    of the runs) when the plans can be told apart: more than one plan and a reference for every
    run. ``closed_loop_error`` is filled by :func:`~xslim_xdit.calibration.select.select_candidate`.

    Plans are replayed in order, each on every run in order (see the module example). With
    ``share`` (several ranks), whether to replay and the errors themselves are one rank's, on
    every rank: every rank replays the same plans (a rank that skipped one would leave the others
    waiting in xfuser's collectives) and selects the same one.
    """
    candidates: list[dict[str, Any]] = [{"full_steps": list(p), "closed_loop_error": None} for p in plans]
    checkable = all(ref is not None for ref in references)
    if share is not None:
        checkable = share([1.0 if checkable else 0.0])[0] == 1.0
    if len(plans) > 1 and checkable:
        # every rank replays every plan (the replays are collective under xDiT), with or
        # without a reference of its own
        errors = [[_error(replay(tuple(plan), i), ref) for i, ref in enumerate(references)] for plan in plans]
        if share is not None:
            flat = share([e for row in errors for e in row])
            errors = [flat[j * len(references) : (j + 1) * len(references)] for j in range(len(plans))]
        for cand, row in zip(candidates, errors, strict=True):
            cand["run_errors"] = row
    return candidates


def _error(out: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    return float("inf") if ref is None else relative_error(out, ref)


def relative_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (``|out - ref|`` when ``ref`` is zero; ``inf`` when ``out`` is
    missing or of another shape).

    Example:
        >>> import torch
        >>> relative_error(torch.tensor([0.0, 4.0]), torch.tensor([0.0, 5.0]))
        0.2
        >>> relative_error(None, torch.ones(2))
        inf
    """
    if out is None or out.shape != ref.shape:
        return float("inf")
    num = (out.double() - ref.double()).norm()
    den = ref.double().norm()
    return float(num / den) if float(den) > 0 else float(num)
