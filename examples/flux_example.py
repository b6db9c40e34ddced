"""FLUX with xDiT and X-Slim: ``xFuserFluxPipeline`` on any xDiT layout, with and without caching.

GPUs, a real checkpoint (diffusers layout, e.g. a local copy of FLUX.1-dev)::

    torchrun --nproc_per_node 4 examples/flux_example.py --model /ckpt/FLUX.1-dev \\
        --ulysses_degree 2 --ring_degree 2 --height 1024 --width 1024 \\
        --num_inference_steps 28 --prompt "a photo of a cat" \\
        --xslim --xslim-preset flux-fast --save_dir results

CPU, tiny random components (no download), one process or two Ulysses ranks::

    python examples/flux_example.py --tiny --xslim --xslim-polish auto
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/flux_example.py --tiny \\
        --ulysses_degree 2 --xslim

The device comes from the environment (``cuda:<LOCAL_RANK>`` where CUDA exists, else CPU) and
the distributed backend from the device (NCCL on GPUs, gloo on CPU), as xDiT decides them.
Each run prints the plain xDiT time, X-Slim's per-step table, the speedup and a ``RESULT``
JSON line. ``--help`` lists xDiT's flags, the ``--xslim-*`` flags and this script's own.
"""

from __future__ import annotations

import _xslim_example_utils as ex

TINY_DEFAULTS = ex.tiny_defaults("flux")


def main() -> None:
    ex.run_pipeline_example("flux", "FLUX on xDiT with X-Slim caching", TINY_DEFAULTS)


if __name__ == "__main__":
    main()
