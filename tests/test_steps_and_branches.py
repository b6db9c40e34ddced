"""Which step and guidance branch each transformer call is, and what a run asks of the ranks.

Checks (issue 9, items 1 and 4 and the preset defect; issue 10's aborted run):

* Heun-type schedulers (``HeunDiscreteScheduler`` on a batched-CFG PixArt pipeline,
  ``FlowMatchHeunDiscreteScheduler`` on a FLUX pipeline with true CFG, i.e. one transformer call
  per guidance branch) call the transformer twice per step at repeated timesteps: every call is a
  step of its own in the statistics, and the last one runs in full.
* A schedule makes no collective at all (a counting :class:`DecisionSync` that claims to be
  distributed sees no call); the online controller does make some. ``XSlimConfig(preset=...)``
  is the preset's schedule, not an online config.
* A run stopped part-way on a bare transformer does not leak into the next run.
"""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import ConfigError, Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit import testing as tiny_models  # tiny random transformers and a sampling loop
from xslim_xdit.parallel.sync import DecisionSync
from xslim_xdit.testing import pipelines as tiny_pipelines  # tiny complete diffusers pipelines

HEUN_STEPS = 3  # a Heun scheduler runs 2 * 3 - 1 = 5 transformer calls per branch

#: forces every call full: the step accounting is checked without the caches in the way
ALL_FULL = XSlimConfig(warmup_steps=100)
#: reuses whenever the caches allow: only the forced-full calls compute
AGGRESSIVE = XSlimConfig(warmup_steps=1, warn=10.0, crit=20.0)


def _flow_match_heun_for_flux():
    """``FlowMatchHeunDiscreteScheduler`` as ``FluxPipeline`` can call it.

    ``FluxPipeline`` always passes ``sigmas=`` (and ``mu=``) to ``set_timesteps``, which
    ``FlowMatchHeunDiscreteScheduler.set_timesteps`` (diffusers 0.42.1) does not accept, so the
    pipeline refuses the stock class; this subclass takes the step count from the sigmas and
    otherwise leaves the scheduler as it is (timesteps ``[t0, t1, t1, t2, t2]`` for 3 steps).
    """
    from diffusers import FlowMatchHeunDiscreteScheduler

    class FlowMatchHeunForFlux(FlowMatchHeunDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            n = num_inference_steps if num_inference_steps is not None else len(sigmas)
            return super().set_timesteps(n, device=device)

    return FlowMatchHeunForFlux


def _heun_pixart():
    """The tiny PixArt-Sigma pipeline (batched CFG: one call per step) with a Heun scheduler."""
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_pipelines.tiny_pipeline("pixart")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(tiny_pipelines.TINY_CALL_KWARGS["pixart"])


def _heun_flux_true_cfg():
    """The tiny FLUX pipeline with a flow-match Heun scheduler and true CFG: the pipeline calls
    the transformer once per guidance branch (``cache_context("cond")`` then ``("uncond")``)."""
    pipe = tiny_pipelines.tiny_pipeline("flux")
    pipe.scheduler = _flow_match_heun_for_flux().from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(tiny_pipelines.TINY_CALL_KWARGS["flux"], true_cfg_scale=2.0, negative_prompt="a dog")
    return pipe, kwargs


def _run(pipe, kwargs, config):
    engine = enable_xslim(pipe, config)
    try:
        with torch.no_grad():
            pipe("a cat", num_inference_steps=HEUN_STEPS, output_type="latent", **kwargs)
    finally:
        disable_xslim(pipe)
    return engine, len(pipe.scheduler.timesteps)


def test_heun_scheduler_repeated_timesteps_make_steps_not_branches():
    pipe, kwargs = _heun_pixart()
    engine, calls = _run(pipe, kwargs, ALL_FULL)
    assert calls == 2 * HEUN_STEPS - 1
    recs = engine.statistics.run_records()
    assert [(r.step, r.branch) for r in recs] == [(s, 0) for s in range(calls)]
    assert engine.statistics.summary()["steps"] == calls


def test_heun_scheduler_last_call_runs_in_full():
    pipe, kwargs = _heun_pixart()
    engine, calls = _run(pipe, kwargs, AGGRESSIVE)
    recs = engine.statistics.run_records()
    assert [r.step for r in recs] == list(range(calls))
    assert recs[-1].kind == "full", [(r.step, r.branch, r.kind) for r in recs]
    assert any(r.kind != "full" for r in recs)  # the config does reuse: the last call is forced


def test_flow_match_heun_with_true_cfg_one_step_per_call_pair():
    pipe, kwargs = _heun_flux_true_cfg()
    engine, calls = _run(pipe, kwargs, ALL_FULL)
    assert calls == 2 * HEUN_STEPS - 1
    recs = engine.statistics.run_records()
    assert [(r.step, r.branch) for r in recs] == [(s, b) for s in range(calls) for b in (0, 1)]
    assert engine.statistics.summary()["steps"] == calls


def test_flow_match_heun_with_true_cfg_last_calls_run_in_full():
    pipe, kwargs = _heun_flux_true_cfg()
    engine, calls = _run(pipe, kwargs, AGGRESSIVE)
    recs = engine.statistics.run_records()
    last = [(r.branch, r.kind) for r in recs if r.step == calls - 1]
    assert last == [(0, "full"), (1, "full")], [(r.step, r.branch, r.kind) for r in recs]


def test_true_cfg_with_euler_two_branches_per_step():
    """Sanity (passes today): one call per guidance branch at distinct timesteps per step."""
    pipe, kwargs = _heun_flux_true_cfg()
    pipe.scheduler = _flux_default_scheduler()
    engine, calls = _run(pipe, kwargs, ALL_FULL)
    assert calls == HEUN_STEPS
    recs = engine.statistics.run_records()
    assert [(r.step, r.branch) for r in recs] == [(s, b) for s in range(calls) for b in (0, 1)]


def _flux_default_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


# ---------------------------------------------------------------------- collectives


class CountingSync(DecisionSync):
    """Claims to be distributed, answers as one rank would, and counts every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"sum_partials": 0, "sum_block_partials": 0, "agree": 0}

    @property
    def is_distributed(self) -> bool:
        return True

    def sum_partials(self, partials):
        self.calls["sum_partials"] += 1
        return partials

    def sum_block_partials(self, partials):
        self.calls["sum_block_partials"] += 1
        return partials

    def agree(self, values, device=None):
        self.calls["agree"] += 1
        return [int(v) for v in values]


SYNC_STEPS = 8
#: skip, block and token steps between full ones (full 0, 1, 4, 7; block 2; token 3, 5; skip 6)
SCHEDULE = Schedule(SYNC_STEPS, full_steps=(0, 1, 4, 7), block_steps=(2,), token_steps=(3, 5))


def _sample_with_sync(config, sync, family="dit", steps=SYNC_STEPS):
    model = tiny_models.tiny_model(family)
    engine = enable_xslim(model, config, num_inference_steps=steps, sync=sync)
    tiny_models.sample(model, family, steps=steps, batch=2)
    disable_xslim(model)
    return engine


def test_schedule_mode_makes_no_collective():
    """A schedule reads no indicator and broadcasts no step kind: every rank follows the same
    schedule by construction. Only a block step reduces its block statistics (the mask over the
    whole depth needs every shard's magnitudes): one reduction and one agreement per block step."""
    sync = CountingSync()
    cfg = XSlimConfig(mode="schedule", schedule=SCHEDULE, token_ratio=0.5, block_thresh=2.0, block_first_n=1)
    engine = _sample_with_sync(cfg, sync)
    kinds = engine.statistics.summary()["kinds"]
    assert kinds == ["full", "full", "block", "token", "full", "token", "skip", "full"]
    block_steps = kinds.count("block")
    assert sync.calls == {"sum_partials": 0, "sum_block_partials": block_steps, "agree": block_steps}
    no_block = Schedule(SYNC_STEPS, full_steps=(0, 1, 4, 7), token_steps=(2, 3, 5))
    sync = CountingSync()
    _sample_with_sync(cfg.replace(schedule=no_block), sync)
    assert sync.calls == {"sum_partials": 0, "sum_block_partials": 0, "agree": 0}


def test_preset_schedule_makes_no_collective():
    sync = CountingSync()
    engine = _sample_with_sync(XSlimConfig.from_preset("flux-slow"), sync, family="flux", steps=25)
    kinds = engine.statistics.summary()["kinds"]
    assert {"skip", "block", "token", "full"} <= set(kinds)
    block_steps = kinds.count("block")
    assert sync.calls == {"sum_partials": 0, "sum_block_partials": block_steps, "agree": block_steps}


def test_preset_named_in_the_constructor_is_the_preset_schedule():
    """``XSlimConfig(preset=...)`` must not silently build an online config (which would run the
    controller, and its collectives): it is the preset's schedule config, or a ConfigError."""
    try:
        config = XSlimConfig(preset="flux-fast")
    except ConfigError:
        return
    assert config == XSlimConfig.from_preset("flux-fast")
    assert config.mode == "schedule"


def test_online_controller_does_reduce_and_agree():
    sync = CountingSync()
    engine = _sample_with_sync(XSlimConfig(warn=0.5, crit=1.0, polish="auto"), sync)
    assert engine.statistics.summary()["steps"] == SYNC_STEPS
    assert sync.calls["sum_partials"] > 0
    assert sync.calls["agree"] > 0


# ---------------------------------------------------------------------- aborted runs

ABORT_STEPS = 10
ABORT_CONFIG = XSlimConfig(warn=0.5, crit=1.0, polish="auto")


@torch.no_grad()
def _denoise(model, steps_run, steps_total=ABORT_STEPS):
    """The first ``steps_run`` steps of :func:`xslim_xdit.testing.sample` for ``steps_total`` steps."""
    x, cond = tiny_models.make_inputs("dit", batch=1, seed=0)
    for t in tiny_models.timesteps_for("dit", steps_total)[:steps_run]:
        out = model(x, timestep=torch.full((1,), t).long(), return_dict=False, **cond)[0]
        x = x - (1.0 / steps_total) * out
    return x


def test_run_stopped_after_four_calls_does_not_leak_into_the_next():
    fresh_model = tiny_models.tiny_model("dit")
    fresh = enable_xslim(fresh_model, ABORT_CONFIG, num_inference_steps=ABORT_STEPS)
    expected = _denoise(fresh_model, ABORT_STEPS)
    expected_log = fresh.statistics.decision_log()
    disable_xslim(fresh_model)
    assert {k for k, _, _ in expected_log} != {"full"}  # the config does reuse on this run

    model = tiny_models.tiny_model("dit")
    engine = enable_xslim(model, ABORT_CONFIG, num_inference_steps=ABORT_STEPS)
    _denoise(model, 4)  # stopped (an exception, an interrupt) after 4 of 10 steps
    try:
        out = _denoise(model, ABORT_STEPS)  # a new run from the first timestep
    except RuntimeError as e:  # acceptable: the engine refuses, and says why
        assert "run" in str(e), e
        return
    finally:
        disable_xslim(model)
    assert engine.statistics.decision_log() == expected_log
    assert [r.step for r in engine.statistics.run_records()] == list(range(ABORT_STEPS))
    assert torch.equal(out, expected)


def test_a_pipefusion_patch_miscounted_as_another_branch_is_refused():
    """Under PipeFusion's patch phase the clock's branch must be xfuser's patch index (each patch
    has the branch's caches); a miscount raises instead of mixing two patches' caches."""
    from xslim_xdit.engine import XSlimRuntimeError
    from xslim_xdit.testing import sample, tiny_model

    m = tiny_model("dit")
    eng = enable_xslim(m, XSlimConfig(warmup_steps=1), num_inference_steps=2)
    eng.patch_info = lambda: (1, 2)  # xfuser says patch 1 of 2; the step's first call is branch 0
    with pytest.raises(XSlimRuntimeError, match="branch 0, but xfuser runs patch 1 of 2"):
        sample(m, "dit", steps=2)
    eng.patch_info = lambda: (0, 1)  # outside the patch phase nothing is checked
    sample(m, "dit", steps=2)
    assert [r.kind for r in eng.statistics.run_records()] == ["full", "full"]
    disable_xslim(m)
