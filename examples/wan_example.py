"""Wan (2.1, and 2.2 A14B with its two experts) with xDiT sequence parallelism and X-Slim.

xfuser runs Wan through its runner, which puts ``xFuserWanTransformer3DWrapper`` (Ulysses/Ring
attention over the video tokens) into a diffusers ``WanPipeline``. This script does the same by
hand, so that X-Slim can be attached to the pipeline. A Wan 2.2 A14B checkpoint has a second
transformer (``transformer_2``, the low-noise expert, taking over below the checkpoint's
``boundary_ratio``): both get xDiT's wrapper and each gets an X-Slim engine of its own; the
statistics printed are both experts' steps in one table.

GPUs, a real checkpoint (diffusers layout, e.g. a local copy of Wan-AI/Wan2.2-T2V-A14B-Diffusers)::

    torchrun --nproc_per_node 4 examples/wan_example.py --model /ckpt/Wan2.2-T2V-A14B-Diffusers \\
        --ulysses_degree 4 --height 720 --width 1280 --num_frames 81 \\
        --num_inference_steps 40 --guidance_scale 4.0 --prompt "a cat walks on the grass" \\
        --xslim --xslim-warn 0.05 --xslim-crit 0.15 --save_dir results

CPU, ``--tiny``: a ``WanPipeline`` of tiny random components (UMT5 encoder, Wan VAE, two tiny
experts in xDiT's wrapper, :func:`xslim_xdit.testing.pipelines.tiny_wan_pipeline`)::

    python examples/wan_example.py --tiny --xslim
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/wan_example.py --tiny --ulysses_degree 2 --xslim

The pipeline calls the transformer once per guidance branch (``cache_context("cond")`` /
``("uncond")``); X-Slim keeps caches per branch. Only Ulysses/Ring (and data) parallelism: xDiT
has no PipeFusion for Wan, and CFG parallelism only in its image-to-video pipeline
(``xFuserWanImageToVideoPipeline``, tested in ``tests/test_parallel_xdit_wan.py``), not in the
``WanPipeline`` this script runs. Default steps of ``WanPipeline``: 50.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import _xslim_example_utils as ex
import numpy as np
import torch

from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper, timeout_from_args

TINY_DEFAULTS = {"num_inference_steps": 10, "prompt": ["a cat walks on the grass"], "guidance_scale": 2.0}


def _xfuser_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """xDiT's Wan wrapper with ``model``'s config and weights."""
    from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper

    wrapped = xFuserWanTransformer3DWrapper.from_config(model.config)
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval()


def _statistics(wrapped: XSlimXFuserWrapper) -> SimpleNamespace | None:
    """What the report prints: one table of the run (both experts' steps on Wan 2.2 A14B)."""
    if wrapped.engine is None:
        return None
    return SimpleNamespace(statistics=wrapped.get_cache_statistics())


def _init_runtime(args: object, transformer_config: dict) -> tuple[object, object]:
    """xDiT's config, parallel groups and runtime state, as its Wan runner makes them (no input
    size: the wrapper shards the video tokens itself; the runtime state reads the transformer's
    config only, so the checkpoint's weights are loaded once, into the wrappers, afterwards)."""
    from xfuser import xFuserArgs
    from xfuser.core.distributed import initialize_runtime_state

    engine_args = xFuserArgs.from_cli_args(args)
    if args.tiny:
        engine_args.model = ""  # nothing to load: the tiny components are built in memory
    engine_config, input_config = engine_args.create_config()
    engine_config.runtime_config.dtype = ex.pick_dtype(args)
    config = SimpleNamespace(**transformer_config)
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=config)), engine_config)
    return engine_config, input_config


def run(args: object) -> None:
    from xfuser.core.distributed import get_runtime_state

    dtype = ex.pick_dtype(args)
    if args.tiny:
        from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS, tiny_wan_pipeline

        pipe = tiny_wan_pipeline(experts=2)
        _init_runtime(args, dict(pipe.transformer.config))
        device = ex.local_device()  # once xDiT's groups exist
        pipe.transformer = _xfuser_wrapper(pipe.transformer)
        pipe.transformer_2 = _xfuser_wrapper(pipe.transformer_2)
        pipe = pipe.to(device=device, dtype=dtype)
        call = dict(TINY_WAN_CALL_KWARGS, guidance_scale=args.guidance_scale)
        info_tail, steps = "_tiny", args.num_inference_steps
    else:
        from diffusers import WanPipeline, WanTransformer3DModel
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper

        path = args.model
        _, input_config = _init_runtime(
            args, WanTransformer3DModel.load_config(path, subfolder="transformer")
        )
        device = ex.local_device()
        experts = {
            "transformer": xFuserWanTransformer3DWrapper.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            )
        }
        if os.path.isdir(os.path.join(path, "transformer_2")):  # Wan 2.2 A14B: the low-noise expert
            experts["transformer_2"] = xFuserWanTransformer3DWrapper.from_pretrained(
                path, subfolder="transformer_2", torch_dtype=dtype
            )
        pipe = WanPipeline.from_pretrained(path, torch_dtype=dtype, **experts).to(device)
        call = {
            "height": input_config.height,
            "width": input_config.width,
            "num_frames": input_config.num_frames,
            "guidance_scale": input_config.guidance_scale,
        }
        info_tail, steps = "", input_config.num_inference_steps
    pipe.set_progress_bar_config(disable=True)
    wrapped = XSlimXFuserWrapper(pipe)

    def generate() -> object:
        return wrapped(
            prompt=args.prompt,
            num_inference_steps=steps,
            output_type="latent" if args.tiny else ("np" if args.save_dir is None else "pil"),
            generator=ex.generator(args.seed),
            **call,
        )

    def frames(out: object) -> torch.Tensor | None:
        if out is None or (args.save_dir is not None and not args.tiny):
            return None
        return torch.as_tensor(np.asarray(out.frames, dtype=np.float32))

    baseline = t_baseline = None
    if not args.skip_baseline:
        if not args.no_warmup:
            generate()
        baseline, t_baseline = ex.timed(generate, device)
    out, t_xslim = baseline, None
    config = ex.xslim_config(args)
    if config is not None:
        wrapped.enable_xslim(config, timeout_s=timeout_from_args(args))
        if not args.no_warmup:
            generate()
        out, t_xslim = ex.timed(generate, device)
    experts = "2experts" if getattr(pipe, "transformer_2", None) is not None else "1expert"
    info = f"dp{args.data_parallel_degree}_ulysses{args.ulysses_degree}_ring{args.ring_degree}_{experts}{info_tail}"
    ex.report("wan", info, _statistics(wrapped), t_baseline, t_xslim, frames(baseline), frames(out))
    if wrapped.engine is not None:
        wrapped.disable_xslim()
    if args.save_dir and out is not None and not args.tiny:
        from diffusers.utils import export_to_video
        from xfuser.core.distributed import is_dp_last_group

        if is_dp_last_group():
            os.makedirs(args.save_dir, exist_ok=True)
            tag = "xslim" if config is not None else "plain"
            export_to_video(out.frames[0], os.path.join(args.save_dir, f"wan_{info}_{tag}.mp4"), fps=16)
    get_runtime_state().destroy_distributed_env()


def main() -> None:
    ex.ensure_single_process_env()
    parser = ex.build_parser("Wan (2.1, 2.2 A14B two experts) on xDiT with X-Slim caching", TINY_DEFAULTS)
    args = ex.parse_args(parser)
    if args.use_cfg_parallel or args.pipefusion_parallel_degree > 1:
        parser.error(
            "Wan on xDiT supports Ulysses/Ring (and data) parallelism only: its wrapper has no PipeFusion"
        )
    run(args)


if __name__ == "__main__":
    main()
