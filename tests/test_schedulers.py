"""Every scheduler a PixArt/DiT user picks (issue 10, point 4): step indices, branches and
"last step full" are right, a forced-full run is the plain pipeline bit for bit, and a
stochastic sampler with a seeded generator stays deterministic with X-Slim on.

The step count X-Slim reports is the number of transformer evaluations (``scheduler.step()``
calls): for first-order and multistep solvers one per step, for Heun and KDPM2 two per step but
the last, for DPM-Solver++ single-step its own schedule of evaluations.
"""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import pipelines as tiny_pipelines

STEPS = 4
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm_multistep": ("DPMSolverMultistepScheduler", {}),
    "dpm_singlestep": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
}
ALL_FULL = XSlimConfig(warmup_steps=100)
AGGRESSIVE = XSlimConfig(warmup_steps=1, warn=10.0, crit=20.0)  # reuses wherever the caches allow


def _pipeline(name: str):
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    pipe = tiny_pipelines.tiny_pipeline("pixart")
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, seed: int = 0) -> torch.Tensor:
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = pipe(
                "a cat",
                num_inference_steps=STEPS,
                output_type="latent",
                generator=torch.Generator().manual_seed(seed),
                **tiny_pipelines.TINY_CALL_KWARGS["pixart"],
            ).images
    finally:
        handle.remove()
    return out, len(calls)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_evaluation_is_a_step_and_the_last_is_full(name):
    pipe = _pipeline(name)
    plain, calls = _call(pipe)
    engine = enable_xslim(pipe, ALL_FULL)
    full, _ = _call(pipe)
    recs = engine.statistics.run_records()
    assert torch.equal(full, plain)  # forced full: the plain pipeline, bit for bit
    assert [(r.step, r.branch) for r in recs] == [(s, 0) for s in range(calls)]
    disable_xslim(pipe)

    engine = enable_xslim(pipe, AGGRESSIVE)
    cached, _ = _call(pipe)
    again, _ = _call(pipe)  # a seeded stochastic sampler stays deterministic with X-Slim on
    recs = engine.statistics.run_records()
    disable_xslim(pipe)
    assert [r.step for r in recs] == list(range(calls))
    assert recs[-1].kind == "full" and any(r.kind != "full" for r in recs)
    assert torch.equal(cached, again) and torch.isfinite(cached).all()
    assert torch.equal(_call(pipe)[0], plain)  # disabled: the plain pipeline again
