"""The pure controller: thresholds, warm-up, resets, block walk and token counts."""

import pytest

from xslim_xdit.config import ConfigError, XSlimConfig
from xslim_xdit.controller import (
    OnlineController,
    ScheduleController,
    StepKind,
    polyval,
    select_blocks,
    tokens_per_group,
)

S, T, B, F = StepKind.SKIP, StepKind.TOKEN, StepKind.BLOCK, StepKind.FULL


def run(cfg, values):
    ctl = OnlineController(cfg, len(values))
    return [ctl.decide(i, v) for i, v in enumerate(values)]


def test_dual_threshold_bands():
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=2, polish="token", partial_reset=1.0)
    kinds = [d.kind for d in run(cfg, [None, 0.5, 0.04, 0.04, 0.04, 0.02, 0.5, 0.01, 0.01])]
    # warm-up, warm-up, skip (.04), skip (.08), token (.12 in band, resets), skip, full (>= crit), skip, last
    assert kinds == [F, F, S, S, T, S, F, S, F]


def test_error_resets_after_full_and_partial():
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, partial_reset=0.5, polish="token")
    ds = run(cfg, [None, 0.15, 0.0, 0.35, 0.0, 0.0])
    assert ds[1].kind == T and ds[1].error == pytest.approx(0.075)  # half the error removed
    assert ds[2].kind == S and ds[2].error == pytest.approx(0.075)
    assert ds[3].kind == F and ds[3].error == 0.0
    no_reset = run(
        XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, partial_reset=0.0, polish="token"),
        [None, 0.15, 0.1, 0.1, 0.0],
    )
    assert [d.kind for d in no_reset] == [F, T, T, F, F]


def test_auto_polish_splits_the_band():
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, polish="auto", partial_reset=1.0)
    assert [d.kind for d in run(cfg, [None, 0.12, 0.25, 0.0])] == [F, B, T, F]


def test_no_polish_level_is_teacache_like():
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, polish="none")
    assert [d.kind for d in run(cfg, [None, 0.05, 0.06, 0.0])] == [F, S, F, F]


def test_max_skips_caps_consecutive_skips():
    cfg = XSlimConfig(warn=0.5, crit=0.9, warmup_steps=1, max_skips=2, polish="token")
    assert [d.kind for d in run(cfg, [None, 0.01, 0.01, 0.01, 0.01, 0.01])] == [F, S, S, T, S, F]


def test_rescale_polynomial_applied():
    assert polyval((2.0, 1.0), 3.0) == 7.0
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, rescale=(10.0, 0.0), polish="token")
    ds = run(cfg, [None, 0.005, 0.02, 0.0])
    assert ds[1].indicator == pytest.approx(0.05) and ds[1].kind == S
    assert ds[2].kind == T and ds[2].indicator == pytest.approx(0.2)  # 0.05 + 0.2 = 0.25: in the band
    assert run(cfg, [None, 0.005, 0.03, 0.0])[2].kind == F  # 0.05 + 0.3 >= crit


def test_rescale_polynomial_band():
    cfg = XSlimConfig(warn=0.1, crit=0.3, warmup_steps=1, rescale=(10.0, 0.0), polish="token")
    ds = run(cfg, [None, 0.005, 0.01, 0.0])
    assert [d.kind for d in ds] == [F, S, T, F]


def test_schedule_controller_follows_lists_and_rescales():
    cfg = XSlimConfig.from_preset("flux-fast")
    ctl = ScheduleController(cfg.schedule, 50)
    kinds = [ctl.decide(i).kind for i in range(50)]
    assert [i for i, k in enumerate(kinds) if k == F] == [0, 1, 2, 3, 6, 27, 44, 49]
    assert [i for i, k in enumerate(kinds) if k == T] == [11, 18, 36]
    assert kinds.count(S) == 50 - 8 - 3
    assert ctl.decide(60).kind == F  # beyond the schedule: compute


def test_select_blocks_walk():
    assert select_blocks([1, 1, 1, 1, 1, 1], 2.0, first_n=2) == [True, True, False, True, False, True]
    # absolute scale: small residuals accumulate until the threshold
    assert select_blocks([0.2, 0.2, 0.2, 0.9, 0.2], 1.0, first_n=0, scale="absolute") == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert all(select_blocks([1.0] * 5, 1e-9, first_n=0))
    assert select_blocks([1.0] * 4, 100.0, first_n=1) == [True, False, False, False]


def test_tokens_per_group():
    assert tokens_per_group(100, 0.3) == [30]
    assert tokens_per_group(100, 0.3, groups=4) == [8, 8, 8, 8]
    assert tokens_per_group(7, 0.01) == [1]
    assert tokens_per_group(16, 1.0, groups=2) == [8, 8]
    with pytest.raises(ValueError, match="token_groups"):
        tokens_per_group(3, 0.5, groups=4)


def test_default_polish_cannot_starve_full_steps():
    """With polish steps keeping the error (the default), small indicators still reach crit:
    a regression test for runs that polished for 46 steps without a single full step."""
    for polish in ("token", "block", "auto"):
        ctl = OnlineController(XSlimConfig(polish=polish), 50)
        kinds = [ctl.decide(i, 0.05).kind for i in range(50)]
        fulls = [i for i, k in enumerate(kinds) if k == F]
        gaps = [b - a for a, b in zip(fulls[:-1], fulls[1:], strict=True)]
        assert max(gaps) <= 7, kinds


def test_lagged_indicator_is_the_previous_steps_indicator():
    """``lagged_indicator=True`` decides step s on the indicator the standard rule computes at
    step s - 1 (every step full, so both rules see the same latents and keep their raw values)."""
    from xslim_xdit import disable_xslim, enable_xslim
    from xslim_xdit.testing import sample, tiny_model

    indicators = {}
    for lagged in (False, True):
        m = tiny_model("dit")
        eng = enable_xslim(m, XSlimConfig(warmup_steps=6, lagged_indicator=lagged), num_inference_steps=6)
        sample(m, "dit", steps=6)
        indicators[lagged] = [r.indicator for r in eng.statistics.run_records()]
        disable_xslim(m)
    standard, lagged = indicators[False], indicators[True]
    assert standard[0] is None and all(v is not None and v > 0 for v in standard[1:])
    assert lagged[:2] == [None, None]
    assert lagged[2:] == standard[1:-1]


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_lagged_indicator_is_validated(bad):
    with pytest.raises(ConfigError, match="lagged_indicator"):
        XSlimConfig(lagged_indicator=bad)
    with pytest.raises(ConfigError, match="lagged_indicator.*per_sample"):
        XSlimConfig(lagged_indicator=True, per_sample=True)
