"""The pieces of calibration, each alone: planning from a synthetic profile, the closed-loop check
on a synthetic replay, selection by geometric mean, profiling on a tiny model, and the argument
checks of calibrate() (made before anything runs)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from xslim_xdit import get_engine
from xslim_xdit.calibration import calibrate
from xslim_xdit.calibration.check import check_candidates, relative_error
from xslim_xdit.calibration.plan import (
    candidate_plans,
    estimated_cost,
    mean_indicator,
    profile_gram,
    simulate,
    threshold_search,
)
from xslim_xdit.calibration.profile import profile_runs
from xslim_xdit.calibration.select import geometric_mean, optimal_result, select_candidate
from xslim_xdit.config import ConfigError
from xslim_xdit.planner import optimal_full_steps
from xslim_xdit.testing import sample, tiny_model


def synthetic_profile(residuals: list[list[float]]) -> list[dict]:
    """A profile as the engine records it, from known stack residuals (no model)."""
    profile = []
    for i, r in enumerate(residuals):
        row = [sum(x * y for x, y in zip(residuals[j], r, strict=True)) for j in range(i + 1)]
        change = None if i == 0 else math.dist(r, residuals[i - 1]) / max(math.hypot(*r), 1e-12)
        profile.append(dict(step=i, kind="full", probe_change=change, residual_change=change, gram_row=row))
    return profile


def u_shaped(n: int, shift: float = 0.0) -> list[list[float]]:
    """Residuals that move fast at the start and the end of the run, slowly in the middle."""
    return [[math.tanh(3.0 * (i / (n - 1) - 0.5)) + shift, 1.0, 0.1 * i] for i in range(n)]


# ---------------------------------------------------------------- plan (no model)


def test_candidate_plans_from_a_synthetic_profile():
    n, speedup = 20, 4.0
    grams = [profile_gram(synthetic_profile(u_shaped(n, s))) for s in (0.0, 0.3)]
    assert grams[0][3][5] == grams[0][5][3]  # symmetric, filled from the lower rows
    plans = candidate_plans(grams, speedup, warmup_steps=1)
    num_full = int(n / speedup)
    assert len(plans) == len(set(plans)) >= 1
    for p in plans:
        assert len(p) == num_full and p[0] == 0 and p[-1] == n - 1 and list(p) == sorted(set(p))
    # the first candidate is the uncapped plan for the requested warm-up
    assert plans[0] == optimal_full_steps(grams, num_full, warmup_steps=1, max_gap=None)
    # without the check: that one plan only; with max_gap: that cap, one plan per warm-up
    assert candidate_plans(grams, speedup, warmup_steps=1, closed_loop=False) == plans[:1]
    capped = candidate_plans(grams, speedup, warmup_steps=1, max_gap=6)
    assert capped == [optimal_full_steps(grams, num_full, warmup_steps=w, max_gap=6) for w in (1, 2, 3)]
    # the cap holds where it can cover the run (the planner widens it where it cannot: 3 warm-up
    # steps leave 17 steps for 2 jumps)
    assert all(b - a <= 6 for a, b in zip(capped[0], capped[0][1:], strict=False))


def test_candidate_plans_never_exceed_the_steps_the_warmup_allows():
    grams = [profile_gram(synthetic_profile(u_shaped(6)))]
    # 6 steps at 3x: 2 full steps, the warm-up and the last; longer warm-ups do not fit
    assert candidate_plans(grams, 3.0, warmup_steps=1) == [(0, 5)]


def test_profile_gram_refuses_a_profile_without_gram_rows():
    with pytest.raises(ConfigError, match="gram_row"):
        profile_gram([{"gram_row": [1.0]}, {"gram_row": [1.0]}])


def test_threshold_search_reaches_the_target_from_a_synthetic_profile():
    profiles = [synthetic_profile(u_shaped(20, s)) for s in (0.0, 0.3)]
    values = mean_indicator(profiles, "residual_change")
    assert values[0] is None and all(v is not None for v in values[1:])
    for speedup in (2.0, 3.0):
        plan = threshold_search(
            values,
            speedup,
            warn_fraction=0.5,
            warmup_steps=3,
            polish="token",
            token_ratio=0.5,
            block_thresh=2.0,
        )
        assert plan.estimated_fraction <= 1 / speedup + 1e-12
        assert plan.warn == pytest.approx(0.5 * plan.crit)
        kinds = simulate(values, plan.warn, plan.crit, warmup_steps=3, polish="token")
        assert tuple(i for i, k in enumerate(kinds) if k.name == "FULL") == plan.schedule.full_steps
        assert estimated_cost(kinds, 0.5, 0.5) == plan.estimated_fraction


# ---------------------------------------------------------------- check (no model)


def test_check_replays_every_plan_on_every_run_and_the_least_error_is_selected():
    refs = [torch.ones(4), torch.full((4,), 3.0)]
    plans = [(0, 5, 9), (0, 1, 9), (0, 3, 6, 9)]
    # per plan, the relative error its replay makes on each run
    made = {(0, 5, 9): [0.02, 0.50], (0, 1, 9): [0.10, 0.10], (0, 3, 6, 9): [0.30, 0.01]}
    calls = []

    def replay(full_steps, run):
        calls.append((full_steps, run))
        return refs[run] * (1.0 + made[full_steps][run])

    cands = check_candidates(plans, refs, replay)
    assert calls == [(p, i) for p in plans for i in range(2)]  # plan by plan, runs in order
    assert [c["full_steps"] for c in cands] == [list(p) for p in plans]
    for c, p in zip(cands, plans, strict=True):
        assert c["closed_loop_error"] is None  # select's job
        assert c["run_errors"] == pytest.approx(made[p])
    best = select_candidate(cands)
    # geometric means: 0.1, 0.1, 0.0548: the third, although its worst run is worse than the second's
    assert best == 2
    assert cands[2]["closed_loop_error"] == pytest.approx(math.sqrt(0.30 * 0.01))
    result = optimal_result(
        [{} for _ in range(10)],
        [[1.0 + (i == j) for j in range(10)] for i in range(10)],
        cands,
        best,
        num_runs=2,
        token_ratio=0.5,
        block_thresh=2.0,
        extrapolate="linear",
    )
    assert result.schedule.full_steps == (0, 3, 6, 9) and result.candidates is cands
    assert result.estimated_fraction == 0.4 and result.profile[0]["planned_skip_error"] is None


def test_check_replays_nothing_when_there_is_nothing_to_choose():
    def replay(full_steps, run):
        raise AssertionError("replayed")

    one = check_candidates([(0, 9)], [torch.ones(2)], replay)
    assert one == [{"full_steps": [0, 9], "closed_loop_error": None}]
    no_ref = check_candidates([(0, 9), (0, 1, 9)], [torch.ones(2), None], replay)
    assert all("run_errors" not in c for c in no_ref)
    assert select_candidate(no_ref) == 0 and no_ref[0]["closed_loop_error"] is None


def test_relative_error_of_missing_or_misshapen_outputs_is_infinite():
    assert relative_error(None, torch.ones(3)) == math.inf
    assert relative_error(torch.ones(2), torch.ones(3)) == math.inf
    assert relative_error(torch.ones(3), torch.zeros(3)) == pytest.approx(math.sqrt(3))


# ---------------------------------------------------------------- select (no model)


def test_select_ranks_by_geometric_mean():
    assert geometric_mean([0.1, 0.4]) == pytest.approx(0.2)
    assert geometric_mean([0.0, 0.0]) == 0.0
    assert geometric_mean([0.0, 0.25]) == pytest.approx(0.25)  # exact zeros drop out
    assert geometric_mean([0.1, math.inf]) == math.inf
    # arithmetic mean would pick the second (0.1 < 0.255), the geometric mean the first
    cands = [
        {"full_steps": [0, 9], "closed_loop_error": None, "run_errors": [0.01, 0.5]},
        {"full_steps": [0, 1, 9], "closed_loop_error": None, "run_errors": [0.1, 0.1]},
        {"full_steps": [0, 2, 9], "closed_loop_error": None, "run_errors": [0.01, math.inf]},
    ]
    assert select_candidate(cands) == 0
    assert [c["closed_loop_error"] for c in cands] == pytest.approx([math.sqrt(0.005), 0.1, math.inf])
    ties = [{"full_steps": [i], "closed_loop_error": None, "run_errors": [0.2]} for i in range(3)]
    assert select_candidate(ties) == 0


# ---------------------------------------------------------------- profile (tiny model)


def test_profile_runs_records_every_step_and_the_reference_outputs():
    m = tiny_model("dit")
    runs = [lambda s=s: sample(m, "dit", steps=6, seed=s) for s in (0, 1)]
    got = profile_runs(m, runs, num_inference_steps=6)
    assert get_engine(m) is None  # disabled after each run
    assert got.num_runs == 2 and got.num_steps == 6
    for profile, seed, ref in zip(got.profiles, (0, 1), got.references, strict=True):
        assert [p["step"] for p in profile] == list(range(6))
        assert all(p["kind"] == "full" for p in profile)
        assert [len(p["gram_row"]) for p in profile] == list(range(1, 7))
        assert profile[0]["residual_change"] is None and profile[1]["residual_change"] > 0
        assert ref.dtype == torch.float64
        torch.testing.assert_close(ref, sample(m, "dit", steps=6, seed=seed).double())
    assert not torch.equal(got.references[0], got.references[1])


def test_profile_runs_refuses_runs_that_disagree_or_never_call_the_transformer():
    m = tiny_model("dit")
    with pytest.raises(ConfigError, match=r"\[4, 5\] transformer calls"):
        profile_runs(m, [lambda: sample(m, "dit", steps=4), lambda: sample(m, "dit", steps=5)], 5)
    with pytest.raises(RuntimeError, match="no time"):
        profile_runs(m, [lambda: None], num_inference_steps=4)
    assert get_engine(m) is None


# ---------------------------------------------------------------- calibrate's argument checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_speedup=1.0), "target_speedup must be > 1"),
        (dict(strategy="greedy"), "strategy must be 'optimal' or 'threshold'"),
        (dict(polish="token"), "polish must be 'none' with strategy='optimal'"),
        (dict(strategy="threshold", warn_fraction=1.0), r"warn_fraction must be in \(0, 1\)"),
        (dict(strategy="threshold", indicator="psnr"), "indicator must be"),
        (dict(max_gap=0), "max_gap must be an integer >= 1"),
        (dict(token_ratio=2.0, strategy="threshold"), "token_ratio"),
        (dict(target_speedup=8.0, warmup_steps=2), "out of reach for 10 steps"),
    ],
)
def test_calibrate_checks_its_arguments_before_running_anything(kwargs, match):
    def run():
        raise AssertionError("ran")

    with pytest.raises(ConfigError, match=match):
        calibrate(tiny_model("dit"), run, num_inference_steps=10, **kwargs)


def test_calibrate_needs_a_run():
    with pytest.raises(ConfigError, match="run must be a callable"):
        calibrate(tiny_model("dit"), [], num_inference_steps=10)


# ---------------------------------------------------------------- the engine seam


def test_only_profile_py_touches_the_engine():
    """The engine's recording interface is changing: all contact goes through profile._replay,
    and no calibration module imports xslim_xdit.api (it sits above calibration)."""
    pkg = Path(__file__).resolve().parents[1] / "xslim_xdit" / "calibration"
    engine_modules = {"api", "engine", "parallel", "stats", "flops"}
    for path in sorted(pkg.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 2
        }
        assert "api" not in imported, f"{path.name} imports xslim_xdit.api"
        if path.name != "profile.py":
            assert not imported & engine_modules, f"{path.name} imports {imported & engine_modules}"
    profile_src = (pkg / "profile.py").read_text()
    tree = ast.parse(profile_src)
    callers = {
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"enable", "disable"}
    }
    assert callers == {"_replay"}


def test_api_hands_calibration_its_engine_access():
    """api registers enable/disable/get_engines at import; a caller's enable replaces only enable."""
    from xslim_xdit import api
    from xslim_xdit.calibration import profile

    access = profile._access(None)
    assert (access.enable, access.disable, access.engines) == (
        api.enable_xslim,
        api.disable_xslim,
        api.get_engines,
    )

    def other_enable(*args, **kwargs):
        return None

    replaced = profile._access(other_enable)
    assert replaced.enable is other_enable
    assert (replaced.disable, replaced.engines) == (api.disable_xslim, api.get_engines)


def test_check_candidates_acts_on_the_shared_errors_and_verdict():
    """Under several ranks every rank replays (or not) and selects from one rank's numbers."""
    refs = [torch.ones(3)]
    replays: list[tuple[int, ...]] = []

    def replay(plan, run):
        replays.append(plan)
        return refs[run] * 2

    def share(values):  # the output rank's: "checkable", then its errors
        return [1.0] if len(values) == 1 else [0.5 + i for i in range(len(values))]

    shared = check_candidates([(0, 3), (0, 1, 3)], refs, replay, share=share)
    assert [c["run_errors"] for c in shared] == [[0.5], [1.5]]  # not this rank's (1.0, 1.0)
    replays.clear()
    # this rank has no reference; the output rank has: it replays all the same
    check_candidates([(0, 3), (0, 1, 3)], [None], replay, share=lambda v: [1.0] if len(v) == 1 else v)
    assert replays == [(0, 3), (0, 1, 3)]
    replays.clear()
    # the output rank has none: nobody replays, even with a reference here
    assert "run_errors" not in check_candidates([(0, 3), (0, 1, 3)], refs, replay, share=lambda v: [0.0])[0]
    assert replays == []


def test_profile_recorder_reduces_once_the_run_is_over():
    """One device: the profile finishes by itself; the Gram rows are the residuals' products."""
    from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
    from xslim_xdit.observers import ProfileRecorder
    from xslim_xdit.testing import sample, tiny_model

    m = tiny_model("dit")
    rec = ProfileRecorder()
    enable_xslim(m, XSlimConfig(), num_inference_steps=4, observers=[rec], record=True)
    sample(m, "dit", steps=4)
    disable_xslim(m)
    rows = rec.profile
    assert [len(r["gram_row"]) for r in rows] == [1, 2, 3, 4]
    assert rows[0]["residual_change"] is None and all(r["residual_change"] > 0 for r in rows[1:])
    assert all(len(r["block_magnitudes"]) == len(m.transformer_blocks) for r in rows)
    assert rec.finish() is rows  # reduced once


def test_profile_recorder_refuses_a_residual_that_changes_shape():
    """PipeFusion's asynchronous phase runs patches: a step's residual is no longer one tensor.
    (Through xfuser, 2 stages, 2 patches: both stages raise this at the first profile's end;
    measured 65 s, run by hand rather than in CI.)"""
    from types import SimpleNamespace

    from xslim_xdit.controller import StepDecision, StepKind
    from xslim_xdit.observers import ProfileRecorder
    from xslim_xdit.parallel import LocalSync

    rec = ProfileRecorder()
    for step, rows in enumerate((8, 4)):  # a whole image, then a patch
        plan = SimpleNamespace(decision=StepDecision(step, StepKind.FULL, None, 0.0, "recording"))
        engine = SimpleNamespace(
            branch=0,
            plan=plan,
            sync=LocalSync(),
            block_offset=0,
            step=step,
            room=SimpleNamespace(layout=SimpleNamespace(total_blocks=2)),
        )
        caches = SimpleNamespace(residual=None, block_mag=None)
        rec.on_stack_residual(engine, caches, torch.ones(1, rows, 4))
    with pytest.raises(NotImplementedError, match="asynchronous phase"):
        rec.finish()
