"""PixArt-Sigma with xDiT and X-Slim: ``xFuserPixArtSigmaPipeline`` on any xDiT layout, with and
without caching.

GPUs, a real checkpoint (diffusers layout, e.g. a local copy of PixArt-Sigma-XL-2-1024-MS)::

    torchrun --nproc_per_node 4 examples/pixart_example.py --model /ckpt/PixArt-Sigma-XL-2-1024-MS \\
        --use_cfg_parallel --ulysses_degree 2 --height 1024 --width 1024 \\
        --num_inference_steps 20 --guidance_scale 4.5 --prompt "a photo of a cat" \\
        --xslim --xslim-polish auto --save_dir results

CPU, tiny random components (no download), one process or CFG parallelism on two ranks::

    python examples/pixart_example.py --tiny --xslim
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/pixart_example.py --tiny \\
        --use_cfg_parallel --xslim

The device comes from the environment (``cuda:<LOCAL_RANK>`` where CUDA exists, else CPU) and
the distributed backend from the device (NCCL on GPUs, gloo on CPU), as xDiT decides them.
Each run prints the plain xDiT time, X-Slim's per-step table, the speedup and a ``RESULT``
JSON line. ``--help`` lists xDiT's flags, the ``--xslim-*`` flags and this script's own.
"""

from __future__ import annotations

import tempfile

import _xslim_example_utils as ex

from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper
from xslim_xdit.testing.pipelines import TINY_CALL_KWARGS, save_tiny_pipeline

TINY_DEFAULTS = {
    "height": TINY_CALL_KWARGS["pixart"]["height"],
    "width": TINY_CALL_KWARGS["pixart"]["width"],
    "max_sequence_length": TINY_CALL_KWARGS["pixart"]["max_sequence_length"],
    "guidance_scale": TINY_CALL_KWARGS["pixart"]["guidance_scale"],
    "no_use_resolution_binning": True,  # the aspect-ratio bins need a 256..2048 px model
    "num_inference_steps": 10,
    "prompt": ["a photo of a cat"],
}


def main() -> None:
    ex.ensure_single_process_env()
    parser = ex.build_parser("PixArt-Sigma on xDiT with X-Slim caching", TINY_DEFAULTS)
    args = ex.parse_args(parser)
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        args.model = str(save_tiny_pipeline("pixart", tmp.name))

    from xfuser import xFuserArgs, xFuserPixArtSigmaPipeline
    from xfuser.core.distributed import get_runtime_state

    engine_args = xFuserArgs.from_cli_args(args)
    engine_config, input_config = engine_args.create_config()
    dtype = ex.pick_dtype(args)
    engine_config.runtime_config.dtype = dtype
    device = ex.local_device()

    pipe = xFuserPixArtSigmaPipeline.from_pretrained(
        engine_config.model_config.model, engine_config=engine_config, dtype=dtype
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe = XSlimXFuserWrapper(pipe)  # X-Slim off until enable_xslim

    # caption cleaning needs bs4 and ftfy; the tiny tokenizer has no use for it
    extra = {"clean_caption": False} if args.tiny else {}

    def generate() -> object:
        return pipe(
            height=input_config.height,
            width=input_config.width,
            prompt=input_config.prompt,
            negative_prompt=input_config.negative_prompt,
            use_resolution_binning=input_config.use_resolution_binning,
            num_inference_steps=input_config.num_inference_steps,
            output_type=input_config.output_type,
            max_sequence_length=input_config.max_sequence_length,
            guidance_scale=input_config.guidance_scale,
            generator=ex.generator(input_config.seed),
            **extra,
        )

    ex.compare_and_report("pixart", pipe, generate, args, engine_args, engine_config, input_config, device)
    get_runtime_state().destroy_distributed_env()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
