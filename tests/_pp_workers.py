"""PipeFusion rank functions: tiny FLUX through xfuser's own xFuserFluxPipeline (CPU, gloo)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim

STEPS = 8
HEIGHT = WIDTH = 64
TXT = 8
CONFIGS = {
    "online": dict(warn=0.12, crit=0.3, polish="block", warmup_steps=2, partial_reset=0.5, block_thresh=2.0),
    "schedule": dict(
        mode="schedule", schedule=Schedule(STEPS, (0, 1, 4, 7), block_steps=(2, 5)), block_thresh=2.0
    ),
}


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _make_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=_tiny_flux(),
    )


def _call() -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    return {
        "height": HEIGHT,
        "width": WIDTH,
        "num_inference_steps": STEPS,
        "prompt_embeds": torch.randn(1, TXT, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "max_sequence_length": TXT,
        "output_type": "latent",
        "guidance_scale": 1.0,
    }


def single_device(which: str) -> dict:
    pipe = _make_pipe()
    with torch.no_grad():
        plain = pipe(generator=torch.Generator().manual_seed(3), **_call()).images
    eng = enable_xslim(pipe, XSlimConfig(**CONFIGS[which]))
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(3), **_call()).images
    log = eng.statistics.decision_log()
    disable_xslim(pipe)
    return {"log": log, "x": out, "plain": plain}


def pipefusion(rank: int, world: int, which: str, warmup_steps: int, patches: int, ulysses: int = 1) -> dict:
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported (an import sorter would reorder imports)
    from xfuser import xFuserArgs, xFuserFluxPipeline
    from xfuser.core.distributed import init_distributed_environment

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    dist.init_process_group("gloo")
    try:
        init_distributed_environment(rank=rank, world_size=world)
        args = xFuserArgs(
            model="",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            max_sequence_length=TXT,
            pipefusion_parallel_degree=2,
            ulysses_degree=ulysses,
            num_pipeline_patch=patches,
            warmup_steps=warmup_steps,
        )
        engine_config, _ = args.create_config()
        engine_config.runtime_config.dtype = torch.float32
        xpipe = xFuserFluxPipeline(_make_pipe(), engine_config)
        with torch.no_grad():
            plain = xpipe(generator=torch.Generator().manual_seed(3), **_call())
        eng = enable_xslim_xdit(xpipe, XSlimConfig(**CONFIGS[which]))
        with torch.no_grad():
            out = xpipe(generator=torch.Generator().manual_seed(3), **_call())
        res = {
            "log": eng.statistics.decision_log(),
            "x": None if out is None else out.images,
            "plain": None if plain is None else plain.images,
            "messages": eng.pipeline.messages,
            "stage": eng.pipeline.stage,
        }
        eng.pipeline.close()
        disable_xslim(xpipe)
        return res
    finally:
        dist.destroy_process_group()
