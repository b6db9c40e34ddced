"""Calibration of a run served by two transformers (Wan 2.2 A14B: ``transformer`` above the
boundary timestep, ``transformer_2`` below it), and the memory each expert holds.

With 8 steps of the tiny pipeline (shift 3, ``boundary_ratio=0.7``) the first expert serves
steps 0-3 and the second steps 4-7 (see ``tests/test_wan_pipelines.py``). Blocks that really ran
are counted with forward pre-hooks on each block's self-attention, independent of the engine.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from xslim_xdit import ConfigError, Schedule, XSlimConfig, disable_xslim, enable_xslim, get_engines
from xslim_xdit.api import release_caches
from xslim_xdit.calibration import CalibrationResult, calibrate
from xslim_xdit.calibration.plan import (
    candidate_plans,
    forced_full_steps,
    segmented_full_steps,
    segmented_skip_errors,
)
from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS, tiny_wan_pipeline

STEPS = 8
SWITCH = 4
EXPERTS = [{"name": "transformer", "steps": [0, SWITCH]}, {"name": "transformer_2", "steps": [SWITCH, STEPS]}]


def run(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **TINY_WAN_CALL_KWARGS,
    ).frames


def _gram(vectors: list[list[float]]) -> list[list[float]]:
    return [[sum(x * y for x, y in zip(u, v, strict=True)) for v in vectors] for u in vectors]


@pytest.mark.parametrize("seed", range(6))
def test_segmented_plan_is_the_least_error_plan_that_keeps_each_expert_start_full(seed):
    """The dynamic programme against brute force over every plan: same least summed error."""
    rng = random.Random(seed)
    n = rng.randint(7, 10)
    switch = rng.randint(2, n - 2)
    segments = [(0, switch), (switch, n)]
    grams = [_gram([[rng.gauss(0, 1) for _ in range(3)] for _ in range(n)]) for _ in range(2)]
    forced = forced_full_steps(n, 1, segments)
    assert forced == [0, switch, n - 1]
    free = [s for s in range(n) if s not in forced]

    def cost(plan):
        return sum(sum(e for e in segmented_skip_errors(g, plan, segments) if e is not None) for g in grams)

    for k in range(len(forced), n + 1):
        best = min(
            cost(tuple(sorted(forced + list(c)))) for c in itertools.combinations(free, k - len(forced))
        )
        got = segmented_full_steps(grams, k, segments, max_gap=n)
        assert len(got) == k and set(forced) <= set(got)
        assert cost(got) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_a_skip_after_the_switch_is_scored_against_its_own_expert_only():
    # two experts on one straight line: the second expert's first skip has no slope of its own
    line = [[float(i), 1.0] for i in range(6)]
    g = _gram(line)
    errors = segmented_skip_errors(g, (0, 1, 3, 5), [(0, 3), (3, 6)])
    assert errors[2] == 0.0  # slope of steps 0, 1: exact
    assert errors[4] == pytest.approx(1.0 / 17.0)  # step 3's residual unchanged: |R4 - R3|^2 / |R4|^2
    with pytest.raises(ConfigError, match="segment"):
        segmented_skip_errors(g, (0, 1, 5), [(0, 3), (3, 6)])  # the switch step not full
    plans = candidate_plans([g], 2.0, warmup_steps=1, segments=[(0, 3), (3, 6)])
    assert plans and all({0, 3, 5} <= set(p) and len(p) == 3 for p in plans)


def _block_counters(pipe):
    calls: list[list[int]] = [[], []]
    handles = []
    for i, model in enumerate((pipe.transformer, pipe.transformer_2)):
        handles.append(model.register_forward_pre_hook(lambda *_, i=i: calls[i].append(0)))
        for blk in model.blocks:
            handles.append(
                blk.attn1.register_forward_pre_hook(
                    lambda *_, i=i: calls[i].__setitem__(-1, calls[i][-1] + 1)
                )
            )
    return calls, handles


def test_calibration_covers_both_experts_and_the_result_applies_to_both(tmp_path):
    pipe = tiny_wan_pipeline(experts=2)
    ref = run(pipe)
    result = calibrate(pipe, [lambda: run(pipe), lambda: run(pipe, seed=1)], target_speedup=2.0)
    assert get_engines(pipe) == {}  # calibration leaves the pipeline as it was
    assert torch.equal(run(pipe), ref)
    # the profile covers the whole run, each row computed by its own expert
    assert result.experts == EXPERTS and result.expert_names == ["transformer", "transformer_2"]
    assert [row["expert"] for row in result.profile] == ["transformer"] * SWITCH + ["transformer_2"] * (
        STEPS - SWITCH
    )
    assert result.profile[SWITCH]["residual_change"] is None  # nothing of its own to compare with
    assert result.profile[SWITCH + 1]["residual_change"] is not None
    # the schedule: the run's first and last steps and the switch step full, 1/2 of the steps
    full = result.schedule.full_steps
    assert {0, SWITCH, STEPS - 1} <= set(full) and len(full) == STEPS // 2
    assert result.profile[SWITCH]["planned_skip_error"] is None
    # closed loop: several plans were replayed on both runs, the least-error one kept
    errors = [c["closed_loop_error"] for c in result.candidates]
    assert len(result.candidates) >= 2 and all(e is not None for e in errors)
    assert tuple(result.candidates[errors.index(min(errors))]["full_steps"]) == full
    assert "transformer_2 steps 4-7" in result.table()
    # saved and loaded: the same result, applied to both experts by enable_xslim
    path = tmp_path / "wan22.json"
    result.save(path)
    loaded = CalibrationResult.load(path)
    assert loaded == result
    calls, handles = _block_counters(pipe)
    enable_xslim(pipe, loaded)
    engines = get_engines(pipe)
    assert [e.config.schedule for e in engines.values()] == [result.schedule] * 2
    out = run(pipe)
    kinds = [[r.kind for r in e.statistics.run_records() if r.branch == 0] for e in engines.values()]
    computed = [[r.blocks_computed for r in e.statistics.run_records()] for e in engines.values()]
    disable_xslim(pipe)
    for h in handles:
        h.remove()
    planned = [result.schedule.kind_of(s) for s in range(STEPS)]
    assert kinds == [planned[:SWITCH], planned[SWITCH:]]  # every step ran as planned
    assert computed == calls  # and the blocks the statistics report really ran
    nb = len(pipe.transformer.blocks)
    assert sum(c == nb for c in calls[0] + calls[1]) == 2 * len(full)  # two branches per full step
    assert sum(c == 0 for c in calls[0] + calls[1]) == 2 * (STEPS - len(full))
    err = float((out - ref).norm() / ref.norm())
    assert 0.0 < err < 0.5


def test_threshold_calibration_keeps_the_switch_step_full():
    pipe = tiny_wan_pipeline(experts=2)
    result = calibrate(pipe, lambda: run(pipe), target_speedup=2.0, strategy="threshold", polish="none")
    assert result.experts == EXPERTS and SWITCH in result.schedule.full_steps
    assert result.schedule.full_steps[0] == 0


def test_a_two_expert_calibration_is_refused_on_other_transformers():
    schedule = Schedule(STEPS, full_steps=(0, SWITCH, STEPS - 1))
    result = CalibrationResult(
        schedule=schedule, warn=None, crit=None, polish="none", token_ratio=0.5, block_thresh=2.0,
        indicator="gram", estimated_fraction=3 / 8, strategy="optimal", experts=EXPERTS,
    )  # fmt: skip
    one = tiny_wan_pipeline()
    with pytest.raises(ConfigError, match="transformer_2"):
        enable_xslim(one, result)
    assert get_engines(one) == {}
    with pytest.raises(ConfigError, match="full"):  # an expert's first step must be full
        CalibrationResult(**{**vars(result), "schedule": Schedule(STEPS, full_steps=(0, STEPS - 1))})
    with pytest.raises(ConfigError, match="experts"):
        CalibrationResult(**{**vars(result), "experts": [EXPERTS[1], EXPERTS[0]]})


@pytest.mark.parametrize("polish", ["schedule", "online"])
def test_the_first_expert_frees_its_caches_at_the_switch(polish):
    """Memory held, measured with the engines' own byte counts after every call: the first
    expert's caches are freed when the second is first called, so the two never hold caches at
    once; the run's output is the same as without the freeing (nothing freed was read again)."""
    pipe = tiny_wan_pipeline(experts=2)
    if polish == "schedule":
        config = XSlimConfig(
            mode="schedule",
            schedule=Schedule(STEPS, full_steps=(0, 1, 7), token_steps=(2, 5)),
            token_ratio=0.5,
        )
    else:
        config = XSlimConfig(warn=0.5, crit=1.0, polish="auto", warmup_steps=1)
    enable_xslim(pipe, config)
    engines = list(get_engines(pipe).values())
    held: list[tuple[int, int, int]] = []  # (expert, bytes of expert 1, bytes of expert 2) per call

    def measure(i):
        def hook(*_):
            held.append((i, *(sum(e.cache_bytes().values()) for e in engines)))

        return hook

    handles = [
        m.register_forward_hook(measure(i)) for i, m in enumerate((pipe.transformer, pipe.transformer_2))
    ]
    handles.append(
        pipe.transformer_2.register_forward_pre_hook(
            lambda *_: held.append((-1, *(sum(e.cache_bytes().values()) for e in engines)))
        )
    )
    out = run(pipe)
    for h in handles:
        h.remove()
    first = [h for h in held if h[0] == 0]
    switch = held.index(next(h for h in held if h[0] == -1))
    assert first[-1][1] > 0 and first[-1][2] == 0  # before the switch: only the first expert holds
    assert held[switch][1:] == (0, 0)  # at the second expert's first call: nothing held
    assert all(h[1] == 0 for h in held[switch:])
    assert held[-1][2] > 0
    peak = max(h[1] + h[2] for h in held)
    assert peak == max(max(h[1] for h in held), max(h[2] for h in held))  # never both at once
    disable_xslim(pipe)
    # freeing changes nothing the run computes: the same run with the freeing switched off
    enable_xslim(pipe, config)
    get_engines(pipe)["transformer_2"].before_call = None
    kept = run(pipe)
    still = sum(get_engine_bytes(pipe)["transformer"])
    disable_xslim(pipe)
    assert still > 0 and torch.equal(out, kept)


def get_engine_bytes(pipe):
    return {k: list(e.cache_bytes().values()) for k, e in get_engines(pipe).items()}


def test_release_caches_keeps_the_run():
    pipe = tiny_wan_pipeline(experts=2)
    enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=Schedule(STEPS, full_steps=(0, 7))))
    run(pipe)
    eng = get_engines(pipe)["transformer_2"]
    steps = eng.num_steps
    assert release_caches(eng) > 0 and release_caches(eng) == 0
    assert eng.num_steps == steps and eng.controller is not None and eng.branches == {}
    disable_xslim(pipe)
