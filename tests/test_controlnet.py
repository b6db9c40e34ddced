"""ControlNet (issue 10, point 1): what a model adds between blocks is not the blocks' work.

``FluxTransformer2DModel.forward`` adds ``controlnet_block_samples`` /
``controlnet_single_block_samples`` to the image stream after each block, outside the block. The
cached stack residual must mean the same on the steps that reuse it as on the step that measured
it: the blocks' own work, without those additions, which the model adds again, fresh, around a
reused residual. Otherwise a skipped step counts every ControlNet sample twice.
"""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim, get_engine
from xslim_xdit.testing import make_inputs, tiny_model
from xslim_xdit.testing import pipelines as tiny_pipelines


def _control_samples(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "controlnet_block_samples": [torch.randn(1, 64, 32, generator=g)],
        "controlnet_single_block_samples": [torch.randn(1, 64, 32, generator=g)],
    }


def _same_call_twice(config: XSlimConfig, control: dict, polish_steps: int = 2) -> list[torch.Tensor]:
    """Steps 0 and 1 of a run with identical inputs (the pipeline's ``cache_context`` names the
    step, so equal timesteps are not read as guidance branches)."""
    m = tiny_model("flux")
    x, cond = make_inputs("flux", seed=3)
    enable_xslim(m, config, num_inference_steps=3)
    outs = []
    with torch.no_grad():
        for step in range(polish_steps):
            with m.cache_context("cond", step_index=step):
                outs.append(m(x, timestep=torch.tensor([0.5]), **cond, **control).sample)
    kinds = get_engine(m).statistics.summary()["kinds"]
    disable_xslim(m)
    assert kinds[0] == "full" and kinds[1] != "full", kinds
    return outs


REUSE = {
    # a skipped step with the last residual reused as it is
    "skip": XSlimConfig(mode="schedule", schedule=Schedule(3, full_steps=(0, 2)), extrapolate="none"),
    # a block step that reuses every block but the first
    "block": XSlimConfig(
        mode="schedule", schedule=Schedule(3, full_steps=(0, 2), block_steps=(1,)), block_thresh=100.0
    ),
    # a token step that refreshes no more than one token
    "token": XSlimConfig(
        mode="schedule", schedule=Schedule(3, full_steps=(0, 2), token_steps=(1,)), token_ratio=0.01
    ),
}


@pytest.mark.parametrize("level", sorted(REUSE))
def test_reuse_with_the_same_inputs_reproduces_the_full_step(level):
    """With the same inputs twice, a step that reuses the full step's residuals must give the
    full step's output: the reused residuals mean what they meant, and the model adds this
    step's ControlNet samples once. (Before the fix the skip case failed by the whole ControlNet
    contribution; block and token steps happened to be right here because the samples do not
    change between the two steps, and are kept as guards.)"""
    full, reused = _same_call_twice(REUSE[level], _control_samples())
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)


def test_without_controlnet_the_same_check_holds():
    """Control: the check itself is exact without ControlNet, so a failure above is the double count."""
    full, reused = _same_call_twice(REUSE["skip"], {})
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)


def _controlnet_pipeline():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = tiny_pipelines.tiny_pipeline("flux")
    torch.manual_seed(11)
    controlnet = FluxControlNetModel.from_transformer(
        base.transformer, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
    )
    pipe = FluxControlNetPipeline(controlnet=controlnet, **base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_controlnet(pipe, steps=4):
    height = width = 16
    control = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pipe(
            "a cat",
            control_image=control,
            controlnet_conditioning_scale=1.0,
            num_inference_steps=steps,
            height=height,
            width=width,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=8,
        ).images


def test_flux_controlnet_pipeline_forced_full_is_bit_identical_and_skips_run():
    pipe = _controlnet_pipeline()
    plain = _run_controlnet(pipe)
    engine = enable_xslim(pipe, XSlimConfig(warmup_steps=4))
    assert torch.equal(_run_controlnet(pipe), plain)
    assert engine.statistics.summary()["kinds"] == ["full"] * 4
    disable_xslim(pipe)
    engine = enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=Schedule(4, full_steps=(0, 3))))
    cached = _run_controlnet(pipe)
    disable_xslim(pipe)
    assert engine.statistics.summary()["kinds"] == ["full", "skip", "skip", "full"]
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert torch.equal(_run_controlnet(pipe), plain)  # disabled: the plain pipeline again
