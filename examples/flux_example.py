"""FLUX with xDiT and X-Slim: ``xFuserFluxPipeline`` on any xDiT layout, with and without caching.

GPUs, a real checkpoint (diffusers layout, e.g. a local copy of FLUX.1-dev)::

    torchrun --nproc_per_node 4 examples/flux_example.py --model /ckpt/FLUX.1-dev \\
        --ulysses_degree 2 --ring_degree 2 --height 1024 --width 1024 \\
        --num_inference_steps 28 --prompt "a photo of a cat" \\
        --xslim --xslim-preset flux-fast --save_dir results

CPU, tiny random components (no download), one process, two Ulysses ranks or two Ring ranks::

    python examples/flux_example.py --tiny --xslim --xslim-polish auto
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/flux_example.py --tiny \\
        --ulysses_degree 2 --xslim
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/flux_example.py --tiny \\
        --ring_degree 2 --xslim

Calibrate a schedule first (on every rank, on N seeded runs), save it, then generate with it::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/flux_example.py --tiny \\
        --ulysses_degree 2 --xslim --xslim-calibrate 2 --xslim-target-speedup 2 --xslim-save flux.json

Ring needs an attention backend that returns the log-sum-exp; xDiT's default (SDPA) refuses it.
Without an accelerator and without ``--attention_backend`` the examples pick ``SDPA_FLASH``
(which X-Slim's CPU compatibility layer makes run on CPU) and print a note saying so.

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
    "height": TINY_CALL_KWARGS["flux"]["height"],
    "width": TINY_CALL_KWARGS["flux"]["width"],
    "max_sequence_length": TINY_CALL_KWARGS["flux"]["max_sequence_length"],
    "num_inference_steps": 10,
    "prompt": ["a photo of a cat"],
}


def main() -> None:
    ex.ensure_single_process_env()
    parser = ex.build_parser("FLUX on xDiT with X-Slim caching", TINY_DEFAULTS)
    args = ex.parse_args(parser)
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        args.model = str(save_tiny_pipeline("flux", tmp.name))

    from xfuser import xFuserArgs, xFuserFluxPipeline
    from xfuser.core.distributed import get_runtime_state

    engine_args = xFuserArgs.from_cli_args(args)
    engine_config, input_config = engine_args.create_config()
    dtype = ex.pick_dtype(args)
    engine_config.runtime_config.dtype = dtype
    device = ex.local_device()

    pipe = xFuserFluxPipeline.from_pretrained(
        engine_config.model_config.model, engine_config=engine_config, dtype=dtype
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe = XSlimXFuserWrapper(pipe)  # X-Slim off until enable_xslim

    def generate(seed: int | None = None) -> object:
        return pipe(
            height=input_config.height,
            width=input_config.width,
            prompt=input_config.prompt,
            num_inference_steps=input_config.num_inference_steps,
            output_type=input_config.output_type,
            max_sequence_length=input_config.max_sequence_length,
            guidance_scale=input_config.guidance_scale,
            generator=ex.generator(input_config.seed if seed is None else seed),
        )

    ex.compare_and_report(
        "flux", pipe, generate, args, engine_args, engine_config, input_config, device, seeded=generate
    )
    get_runtime_state().destroy_distributed_env()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
