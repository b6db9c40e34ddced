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

from typing import Any

import _xslim_example_utils as ex

from xslim_xdit.testing_pipelines import TINY_CALL_KWARGS

TINY_DEFAULTS = ex.tiny_defaults(
    "pixart",
    guidance_scale=TINY_CALL_KWARGS["pixart"]["guidance_scale"],
    no_use_resolution_binning=True,  # the aspect-ratio bins need a 256..2048 px model
)


def extra_call_kwargs(args: Any, input_config: Any) -> dict[str, Any]:
    """``xFuserPixArtSigmaPipeline``'s own call arguments (beyond :func:`ex.image_call_kwargs`)."""
    # caption cleaning needs bs4 and ftfy; the tiny tokenizer has no use for it
    extra = {"clean_caption": False} if args.tiny else {}
    return dict(
        negative_prompt=input_config.negative_prompt,
        use_resolution_binning=input_config.use_resolution_binning,
        **extra,
    )


def main() -> None:
    ex.run_pipeline_example(
        "pixart", "PixArt-Sigma on xDiT with X-Slim caching", TINY_DEFAULTS, extra_call_kwargs
    )


if __name__ == "__main__":
    main()
