"""HunyuanVideo with xDiT sequence parallelism and X-Slim, with and without caching.

xfuser 0.7.0 has no ``xFuserHunyuanVideoPipeline``: it runs HunyuanVideo through its runner
(``xfuser/model_executor/models/runner_models/hunyuan.py``), which puts
``xFuserHunyuanVideoTransformer3DWrapper`` (Ulysses/Ring attention over the video tokens) into a
diffusers ``HunyuanVideoPipeline``. This script does the same by hand, so that X-Slim can be
attached to the pipeline:

GPUs, a real checkpoint (diffusers layout, e.g. a local copy of hunyuanvideo-community/HunyuanVideo)::

    torchrun --nproc_per_node 4 examples/hunyuan_video_example.py --model /ckpt/HunyuanVideo \\
        --ulysses_degree 4 --height 720 --width 1280 --num_frames 129 \\
        --num_inference_steps 50 --prompt "a cat walks on the grass" \\
        --xslim --xslim-preset hunyuan_video-fast --save_dir results

CPU, ``--tiny``: a tiny random HunyuanVideo transformer in xDiT's wrapper, sampled by a plain
Euler loop (no text encoders or VAE: building a tiny Llama text encoder with HunyuanVideo's
prompt template is out of scope here)::

    python examples/hunyuan_video_example.py --tiny --xslim
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/hunyuan_video_example.py --tiny \\
        --ulysses_degree 2 --xslim

HunyuanVideo embeds the guidance scale in the transformer (one forward per step), so there is no
CFG parallelism, and xDiT's wrapper has no PipeFusion. The device comes from the environment and
the backend from the device, as xDiT decides them.
"""

from __future__ import annotations

import _xslim_example_utils as ex
import numpy as np
import torch

from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper, enable_xslim_xdit, timeout_from_args

TINY_FRAMES, TINY_HW, TINY_TEXT = 2, 4, 5  # latent frames and side; text tokens (one padded)
TINY_DEFAULTS = {"num_inference_steps": 10, "prompt": ["a cat walks on the grass"]}


def run_tiny(args: object) -> None:
    """The bare-transformer loop: xDiT's HunyuanVideo wrapper on the tiny model."""
    from xfuser.core.distributed import get_runtime_state
    from xfuser.model_executor.models.transformers.transformer_hunyuan_video import (
        xFuserHunyuanVideoTransformer3DWrapper,
    )

    from xslim_xdit import disable_xslim
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime
    from xslim_xdit.testing import sample, tiny_model

    model = tiny_model("hunyuan_video")
    steps = args.num_inference_steps
    init_xfuser_runtime(
        model,
        height=TINY_HW * 8,
        width=TINY_HW * 8,
        max_condition_sequence_length=TINY_TEXT,
        num_inference_steps=steps,
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        data_parallel_degree=args.data_parallel_degree,
        seed=args.seed,
    )
    device = ex.local_device()
    xmodel = xFuserHunyuanVideoTransformer3DWrapper.from_config(model.config)
    xmodel.load_state_dict(model.state_dict())
    dtype = ex.pick_dtype(args)
    xmodel = xmodel.to(device).eval()
    if dtype != torch.float32:
        xmodel = xmodel.to(dtype)

    def generate() -> torch.Tensor:
        return sample(
            xmodel,
            "hunyuan_video",
            steps=steps,
            seed=args.seed,
            frames=TINY_FRAMES,
            height=TINY_HW,
            width=TINY_HW,
        )

    baseline = t_baseline = None
    if not args.skip_baseline:
        if not args.no_warmup:
            generate()
        baseline, t_baseline = ex.timed(generate, device)
    out, engine, t_xslim = baseline, None, None
    config = ex.xslim_config(args)
    if config is not None:
        engine = enable_xslim_xdit(xmodel, config, timeout_s=timeout_from_args(args))
        engine.default_steps = steps  # a bare transformer has no scheduler to announce the step count
        if not args.no_warmup:
            generate()
        out, t_xslim = ex.timed(generate, device)
    info = f"dp{args.data_parallel_degree}_ulysses{args.ulysses_degree}_ring{args.ring_degree}_tiny"
    ex.report("hunyuan_video", info, engine, t_baseline, t_xslim, baseline, out)
    if engine is not None:
        disable_xslim(xmodel)
    get_runtime_state().destroy_distributed_env()


def run_checkpoint(args: object) -> None:
    """The GPU path: ``HunyuanVideoPipeline`` from ``--model`` with xDiT's transformer wrapper."""
    from diffusers import HunyuanVideoPipeline
    from xfuser import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, initialize_runtime_state, is_dp_last_group
    from xfuser.model_executor.models.transformers.transformer_hunyuan_video import (
        xFuserHunyuanVideoTransformer3DWrapper,
    )

    engine_args = xFuserArgs.from_cli_args(args)
    engine_config, input_config = engine_args.create_config()
    dtype = ex.pick_dtype(args)
    engine_config.runtime_config.dtype = dtype
    device = ex.local_device()
    transformer = xFuserHunyuanVideoTransformer3DWrapper.from_pretrained(
        engine_config.model_config.model, subfolder="transformer", dtype=dtype
    )
    pipe = HunyuanVideoPipeline.from_pretrained(
        engine_config.model_config.model, transformer=transformer, dtype=dtype
    ).to(device)
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    initialize_runtime_state(pipe, engine_config)
    get_runtime_state().set_video_input_parameters(
        height=input_config.height,
        width=input_config.width,
        num_frames=input_config.num_frames,
        batch_size=1,
        num_inference_steps=input_config.num_inference_steps,
        split_text_embed_in_sp=True,  # the wrapper re-decides it per call from the text length
    )
    wrapped = XSlimXFuserWrapper(pipe)

    def generate() -> object:
        return wrapped(
            prompt=input_config.prompt,
            height=input_config.height,
            width=input_config.width,
            num_frames=input_config.num_frames,
            num_inference_steps=input_config.num_inference_steps,
            guidance_scale=input_config.guidance_scale,
            output_type="np" if args.save_dir is None else "pil",
            generator=ex.generator(input_config.seed),
        )

    def frames(out: object) -> torch.Tensor | None:
        if out is None or args.save_dir is not None:
            return None
        return torch.from_numpy(np.asarray(out.frames, dtype=np.float32))

    baseline = t_baseline = None
    if not args.skip_baseline:
        if not args.no_warmup:
            generate()
        baseline, t_baseline = ex.timed(generate, device)
    out, engine, t_xslim = baseline, None, None
    config = ex.xslim_config(args)
    if config is not None:
        engine = wrapped.enable_xslim(config, timeout_s=timeout_from_args(args))
        if not args.no_warmup:
            generate()
        out, t_xslim = ex.timed(generate, device)
    info = f"dp{engine_args.data_parallel_degree}_ulysses{engine_args.ulysses_degree}_ring{engine_args.ring_degree}"
    ex.report("hunyuan_video", info, engine, t_baseline, t_xslim, frames(baseline), frames(out))
    if args.save_dir and out is not None and is_dp_last_group():
        import os

        from diffusers.utils import export_to_video

        os.makedirs(args.save_dir, exist_ok=True)
        tag = "xslim" if engine is not None else "plain"
        export_to_video(out.frames[0], os.path.join(args.save_dir, f"hunyuan_video_{info}_{tag}.mp4"), fps=15)
    get_runtime_state().destroy_distributed_env()


def main() -> None:
    ex.ensure_single_process_env()
    parser = ex.build_parser("HunyuanVideo on xDiT (sequence parallelism) with X-Slim caching", TINY_DEFAULTS)
    args = ex.parse_args(parser)
    if args.use_cfg_parallel or args.pipefusion_parallel_degree > 1:
        parser.error(
            "HunyuanVideo on xDiT supports Ulysses/Ring (and data) parallelism only: its guidance is "
            "embedded (no CFG branches) and xDiT's wrapper has no PipeFusion"
        )
    if args.tiny:
        run_tiny(args)
    else:
        run_checkpoint(args)


if __name__ == "__main__":
    main()
