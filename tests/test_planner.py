"""The optimal full-step planner: exact against brute force, its error model against direct
vector arithmetic, and the profile Gram matrix against residuals hooked independently."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from xslim_xdit.calibration import calibrate, profile_gram
from xslim_xdit.config import ConfigError, Schedule
from xslim_xdit.planner import optimal_full_steps, skip_error, skip_errors_of
from xslim_xdit.testing import sample, tiny_model


def _residuals(n: int, seed: int = 0) -> torch.Tensor:
    # a smooth drift plus curvature plus noise, like a profiled stack residual
    g = torch.Generator().manual_seed(seed)
    base, d1, d2 = (torch.randn(12, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.linspace(0, 1, n, dtype=torch.float64)[:, None]
    return base + t * d1 + 3 * t**2 * d2 + 0.05 * torch.randn(n, 12, generator=g, dtype=torch.float64)


def _gram(r: torch.Tensor) -> list[list[float]]:
    return (r @ r.T).tolist()


@pytest.mark.parametrize("extrapolate", ["linear", "none"])
def test_skip_error_matches_vector_arithmetic(extrapolate):
    r = _residuals(8)
    g = _gram(r)
    for a, b, s in [(-1, 0, 3), (0, 1, 2), (1, 4, 7), (2, 3, 6)]:
        est = r[b].clone()
        if extrapolate == "linear" and a >= 0:
            est = est + (s - b) / (b - a) * (r[b] - r[a])
        want = float((est - r[s]).pow(2).sum() / r[s].pow(2).sum())
        assert skip_error(g, a, b, s, extrapolate) == pytest.approx(want, rel=1e-9, abs=1e-12)


def _total(g, fulls, extrapolate):
    return sum(e for e in skip_errors_of(g, fulls, extrapolate) if e is not None)


@pytest.mark.parametrize("extrapolate", ["linear", "none"])
@pytest.mark.parametrize(("n", "k", "warmup"), [(9, 4, 1), (10, 5, 2), (8, 3, 1), (7, 7, 1)])
def test_optimal_equals_brute_force(extrapolate, n, k, warmup):
    g = _gram(_residuals(n, seed=n + k))
    got = optimal_full_steps(g, k, warmup_steps=warmup, max_gap=n, extrapolate=extrapolate)
    assert len(got) == k and got[:warmup] == tuple(range(warmup)) and got[-1] == n - 1
    middle = range(warmup, n - 1)
    best = min(
        _total(g, tuple(range(warmup)) + c + (n - 1,), extrapolate)
        for c in itertools.combinations(middle, k - warmup - 1)
    )
    assert _total(g, got, extrapolate) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_max_gap_is_respected_and_widened_only_when_needed():
    g = _gram(_residuals(30))
    got = optimal_full_steps(g, 8, max_gap=5)
    assert max(b - a for a, b in itertools.pairwise(got)) <= 5
    # 4 full steps cannot cover 30 steps with gaps of 5: the gap widens to the least that can
    got = optimal_full_steps(g, 4, max_gap=5)
    assert len(got) == 4 and max(b - a for a, b in itertools.pairwise(got)) <= math.ceil(29 / 3)


def test_bad_inputs_name_the_parameter():
    g = _gram(_residuals(6))
    with pytest.raises(ValueError, match="num_full"):
        optimal_full_steps(g, 1)  # step 0 and the last step are always full
    with pytest.raises(ValueError, match="num_full"):
        optimal_full_steps(g, 7)
    with pytest.raises(ValueError, match="extrapolate"):
        optimal_full_steps(g, 3, extrapolate="quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        optimal_full_steps(g, 3, warmup_steps=0)
    with pytest.raises(ValueError, match="gram"):
        optimal_full_steps([[1.0, 0.0]], 1)


def test_profile_gram_matches_independently_hooked_residuals():
    m = tiny_model("dit")
    blocks = m.transformer_blocks
    seen: list[torch.Tensor] = []
    inp: list[torch.Tensor] = []
    h1 = blocks[0].register_forward_pre_hook(
        lambda mod, args, kw: inp.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
    )
    h2 = blocks[-1].register_forward_hook(
        lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out) - inp[-1])
    )
    try:
        result = calibrate(
            m,
            lambda: sample(m, "dit", steps=12),
            num_inference_steps=12,
            target_speedup=3.0,
            closed_loop_check=False,
        )
    finally:
        h1.remove()
        h2.remove()
    r = torch.stack(seen).flatten(1).double()
    want = r @ r.T
    got = torch.tensor(profile_gram(result.profile), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert result.strategy == "optimal" and result.warn is None
    assert result.schedule.full_steps == optimal_full_steps(want.tolist(), 4)
    assert result.estimated_fraction == pytest.approx(4 / 12)
    errs = [p["planned_skip_error"] for p in result.profile]
    assert [i for i, e in enumerate(errs) if e is None] == list(result.schedule.full_steps)


def test_closed_loop_check_keeps_the_plan_closest_to_the_full_runs():
    from xslim_xdit import disable_xslim, enable_xslim

    m = tiny_model("dit")
    runs = [lambda seed=seed: sample(m, "dit", steps=16, seed=seed) for seed in (0, 1)]
    full = [r() for r in runs]
    result = calibrate(m, runs, num_inference_steps=16, target_speedup=3.0)
    assert result.num_runs == 2
    plans = [tuple(c["full_steps"]) for c in result.candidates]
    assert len(plans) == len(set(plans)) >= 2
    assert any(p[:3] == (0, 1, 2) for p in plans) or any(p[:2] == (0, 1) for p in plans)  # longer warm-ups
    errors = [c["closed_loop_error"] for c in result.candidates]
    assert result.schedule.full_steps == plans[errors.index(min(errors))]
    # each recorded error is that schedule's, replayed on each run: the final output's relative
    # distance to the full run's, combined as a geometric mean
    for plan, cand in zip(plans, result.candidates, strict=True):
        want = []
        for r, ref in zip(runs, full, strict=True):
            enable_xslim(m, result.config(schedule=Schedule(16, plan)), num_inference_steps=16)
            out = r()
            disable_xslim(m)
            want.append(float((out.double() - ref.double()).norm() / ref.double().norm()))
        assert cand["run_errors"] == pytest.approx(want, rel=1e-6)
        assert cand["closed_loop_error"] == pytest.approx(math.sqrt(want[0] * want[1]), rel=1e-6)


def test_several_runs_plan_on_their_summed_errors():
    m = tiny_model("dit")
    runs = [lambda seed=seed: sample(m, "dit", steps=12, seed=seed) for seed in (3, 4)]
    each = [
        calibrate(m, r, num_inference_steps=12, target_speedup=3.0, closed_loop_check=False) for r in runs
    ]
    grams = [profile_gram(e.profile) for e in each]
    both = calibrate(m, runs, num_inference_steps=12, target_speedup=3.0, closed_loop_check=False)
    assert both.schedule.full_steps == optimal_full_steps(grams, 4)
    assert both.profile == each[0].profile  # the first run's profile is the one kept
    with pytest.raises(ConfigError, match="run"):
        calibrate(m, [], num_inference_steps=12)
    with pytest.raises(ConfigError, match="run"):
        calibrate(m, [runs[0], "not callable"], num_inference_steps=12)  # type: ignore[list-item]


def test_summed_grams_equal_brute_force_over_both():
    n, k = 9, 4
    g1, g2 = _gram(_residuals(n, seed=1)), _gram(_residuals(n, seed=2))
    got = optimal_full_steps([g1, g2], k, max_gap=n)
    middle = range(1, n - 1)
    totals = {
        c: _total(g1, (0, *c, n - 1), "linear") + _total(g2, (0, *c, n - 1), "linear")
        for c in itertools.combinations(middle, k - 2)
    }
    best = min(totals.values())
    assert _total(g1, got, "linear") + _total(g2, got, "linear") == pytest.approx(best, rel=1e-12)
    # a sequence of one matrix is that matrix; arrays work as lists do
    assert optimal_full_steps([g1], k, max_gap=n) == optimal_full_steps(g1, k, max_gap=n)
    stacked = torch.tensor([g1, g2]).numpy()
    assert optimal_full_steps(stacked, k, max_gap=n) == got
    with pytest.raises(ValueError, match="gram"):
        optimal_full_steps([g1, _gram(_residuals(n + 1))], k)


def test_final_output_reads_what_pipelines_return():
    import numpy as np
    from PIL import Image

    from xslim_xdit.calibration import _as_tensor

    class Out:
        images = [Image.new("RGB", (4, 3), (10, 20, 30)), Image.new("RGB", (4, 3), (1, 2, 3))]

    got = _as_tensor(Out())
    assert got.shape == (2, 3, 4, 3) and got[0, 0, 0].tolist() == [10.0, 20.0, 30.0]
    assert _as_tensor((torch.ones(2, 2),)).shape == (1, 2, 2)
    assert _as_tensor(np.zeros((2, 5))).dtype == torch.float64
    assert _as_tensor("text") is None and _as_tensor(None) is None


def test_calibrate_optimal_rejects_what_it_cannot_do():
    m = tiny_model("dit")
    with pytest.raises(ConfigError, match="polish"):
        calibrate(m, lambda: None, num_inference_steps=10, polish="token")
    with pytest.raises(ConfigError, match="target_speedup"):
        calibrate(m, lambda: None, num_inference_steps=10, target_speedup=6.0)  # at most 10 / 2
    with pytest.raises(ConfigError, match="strategy"):
        calibrate(m, lambda: None, num_inference_steps=10, strategy="greedy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_gap"):
        calibrate(m, lambda: None, num_inference_steps=10, max_gap=0)


def test_step_weights_scale_each_steps_error():
    n, k = 9, 4
    g = _gram(_residuals(n, seed=7))
    weights = [float(x) for x in torch.rand(n, generator=torch.Generator().manual_seed(1)) * 3]
    got = optimal_full_steps(g, k, max_gap=n, step_weights=weights)

    def total(fulls):
        return sum(w * e for w, e in zip(weights, skip_errors_of(g, fulls), strict=True) if e is not None)

    best = min(total((0, *c, n - 1)) for c in itertools.combinations(range(1, n - 1), k - 2))
    assert total(got) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="step_weights"):
        optimal_full_steps(g, k, step_weights=[1.0] * (n - 1))
