"""What X-Slim supports, per model family: one table that ``xslim-xdit info``, the README's
table and its test all read.

The reuse levels a family supports are read from its adapter (every family has the step and
block levels; the token level needs the adapter's ``token_processor``); what has been *tested*
(xDiT layouts, diffusers pipelines) is declared in :data:`TESTED`, one entry per family, each
naming the tests that back it. A family registered from outside the package appears with its
levels and with nothing tested.

Example:
    >>> rows = {r.family: r for r in support_table()}
    >>> rows["flux"].model_classes, rows["flux"].levels
    (('FluxTransformer2DModel',), ('step', 'block', 'token'))
    >>> rows["pixart"].xdit_layouts
    ('CFG parallel 2', 'Ulysses 2 x CFG parallel 2', 'PipeFusion 2')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .adapters import ModelAdapter, registered_adapters

__all__ = ["LEVELS", "TESTED", "FamilySupport", "Evidence", "support_table"]

#: The reuse levels, coarsest first.
LEVELS = ("step", "block", "token")


@dataclass(frozen=True)
class Evidence:
    """What has been run with a family on CPU (tiny models, gloo ranks), and which tests run it."""

    #: xDiT (xfuser) parallel layouts run with X-Slim on, each checked against one device
    xdit_layouts: tuple[str, ...]
    #: diffusers pipeline classes run with X-Slim on
    pipelines: tuple[str, ...]
    #: the test files behind the two lists
    tests: tuple[str, ...]
    #: one line on what is not covered
    note: str = ""


#: Declared per family name; the tests named here are the evidence (``docs/parallel.md``,
#: ``docs/parallel_pipelines.md``, ``docs/works_with.md``).
TESTED: dict[str, Evidence] = {
    "flux": Evidence(
        xdit_layouts=(
            "Ulysses 2",
            "Ring 2",
            "Ulysses 2 x Ring 2",
            "PipeFusion 2",
            "Ulysses 2 x PipeFusion 2",
        ),
        pipelines=(
            "FluxPipeline",
            "FluxControlNetPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxKontextPipeline",
        ),
        tests=(
            "tests/test_parallel_xdit.py",
            "tests/test_parallel_pipefusion.py",
            "tests/test_xdit_async_four_ranks.py",
            "tests/test_xdit_pipelines.py",
            "tests/test_controlnet.py",
            "tests/test_img2img.py",
            "tests/test_kontext.py",
        ),
        note=(
            "token refresh under PipeFusion through xfuser's patch K/V buffer (synchronous and "
            "asynchronous patches); not with Ulysses/Ring inside the stages"
        ),
    ),
    "ltx2": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2"),
        pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_ltx2.py",
            "tests/test_ltx2_pipeline.py",
            "tests/test_parallel_xdit_more.py",
            "tests/test_parallel_xdit_sp_token.py",
        ),
        note="audio is the blocks' second stream (own stack residual on skip steps, computed in full "
        "on token steps); token refresh recomputes the selected video tokens, their fresh K/V spliced "
        "into per-block caches of every video token for the video self-attention and the "
        "video-to-audio attention (masked attention refused on token steps); pipelines: batched CFG, "
        "and CFG with STG and modality guidance (three branches), prompt embeddings through its "
        "connectors; xDiT: xfuser's wrapper, bare, every level under Ulysses 2 and Ring 2 (token steps "
        "splice every rank's rows into the video-to-audio attention's whole-video K/V cache), with "
        'rope_type="split" (xfuser fails with the default "interleaved")',
    ),
    "pixart": Evidence(
        xdit_layouts=("CFG parallel 2", "Ulysses 2 x CFG parallel 2", "PipeFusion 2"),
        pipelines=("PixArtSigmaPipeline",),
        tests=(
            "tests/test_xdit_pipelines.py",
            "tests/test_xdit_four_ranks.py",
            "tests/test_parallel_pipefusion_pixart.py",
        ),
        note=(
            "token refresh under PipeFusion (xFuserPixArtSigmaPipeline) through xfuser's patch K/V "
            "buffer of the self-attention (synchronous, asynchronous with 2 and 4 patches)"
        ),
    ),
    "wan": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "CFG parallel 2"),
        pipelines=("WanPipeline", "WanImageToVideoPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_family_variants.py",
            "tests/test_wan_pipelines.py",
            "tests/test_wan_calibration.py",
            "tests/test_parallel_xdit_wan.py",
        ),
        note="pipelines: Wan 2.1 T2V, Wan 2.2 A14B T2V and I2V (two experts, an engine each; "
        "calibration covers the whole run, the switch step full; the first expert's caches freed "
        "at the switch); Wan 2.1 I2V and Wan 2.2 TI2V at transformer level; xDiT: xfuser's "
        "Wan wrapper, bare, Wan 2.2's two experts in WanPipeline under Ulysses 2, and in xfuser's "
        "Wan I2V pipeline under CFG parallel 2",
    ),
    "sd3": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "CFG parallel 2", "PipeFusion 2"),
        pipelines=("StableDiffusion3Pipeline",),
        tests=(
            "tests/test_families.py",
            "tests/test_family_variants.py",
            "tests/test_sd3_pipeline.py",
            "tests/test_parallel_xdit_more.py",
        ),
        note="SD3, SD3.5 Large and Medium (batched CFG; skip-layer guidance a branch of its own); token "
        "refresh refused on SD3.5 dual-attention blocks; pipelines run with prompt embeddings; xDiT: "
        "xFuserStableDiffusion3Pipeline (every level under Ulysses 2; PipeFusion synchronous, token "
        "refresh refused there)",
    ),
    "cogvideox": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "CFG parallel 2"),
        pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_cogvideox.py",
            "tests/test_cogvideox_i2v_pipeline.py",
            "tests/test_parallel_xdit_more.py",
            "tests/test_parallel_xdit_sp_token.py",
        ),
        note="CogVideoX 1.0 with RoPE (5B) and without (2B), CogVideoX 1.5 (temporal patches); xDiT: "
        "xFuserCogVideoXPipeline, every level under Ulysses 2 and Ring 2 (token refresh tested with "
        "one latent frame), step and block levels under CFG parallel 2",
    ),
    "hunyuan_video": Evidence(
        xdit_layouts=("Ulysses 2",),
        pipelines=("HunyuanVideoPipeline",),
        tests=("tests/test_xdit_pipelines.py", "tests/test_hunyuan_pipelines.py"),
        note="pipeline: embedded guidance, and true CFG (two branches), prompt embeddings given; xDiT has "
        "no HunyuanVideo pipeline class: its transformer wrapper, bare, with an Euler loop",
    ),
    "qwen_image": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "CFG parallel 2"),
        pipelines=("QwenImagePipeline", "QwenImageEditPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_image_families.py",
            "tests/test_image_pipelines.py",
            "tests/test_qwen_edit_pipeline.py",
            "tests/test_parallel_xdit_image.py",
            "tests/test_parallel_xdit_sp_token.py",
            "tests/test_parallel_xdit_qwen_edit.py",
        ),
        note="Qwen-Image-Edit's reference tokens always fresh; pipelines run with prompt embeddings (true "
        "CFG, two branches); xDiT: the transformer wrapper, bare, every level under Ulysses 2 and Ring 2 "
        "(token refresh refused with padded text there: xfuser attends it); Qwen-Image-Edit in xfuser's "
        "edit pipeline under CFG parallel 2, every level (its calls named by CFG rank for the lead-branch "
        "rule); Qwen-Image-Edit under SP refused",
    ),
    "flux2": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "PipeFusion 2"),
        pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_image_families.py",
            "tests/test_image_pipelines.py",
            "tests/test_parallel_xdit_image.py",
        ),
        note="reference-image tokens always fresh (refused with a sharded sequence); kv_cache_mode "
        "refused; pipelines run with prompt embeddings; xDiT: the transformer wrapper, bare (Ulysses, "
        "Ring), xFuserFlux2Pipeline (PipeFusion, synchronous; token refresh refused there)",
    ),
    "z_image": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2", "CFG parallel 2"),
        pipelines=("ZImagePipeline",),
        tests=(
            "tests/test_families.py",
            "tests/test_image_pipelines.py",
            "tests/test_parallel_xdit_zimage.py",
        ),
        note="omni mode refused; pipelines run with prompt embeddings; xDiT: xfuser's Z-Image wrapper, "
        "bare and in ZImagePipeline, step and block levels (token refresh refused under sequence "
        "parallelism)",
    ),
    "hunyuan_video15": Evidence(
        xdit_layouts=("Ulysses 2", "Ring 2"),
        pipelines=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
        tests=(
            "tests/test_families.py",
            "tests/test_hunyuan_video15.py",
            "tests/test_hunyuan_pipelines.py",
            "tests/test_parallel_xdit_more.py",
        ),
        note="pipelines run with prompt embeddings (Qwen2.5-VL and ByT5 not built), CFG by the guider "
        "(two branches), I2V with a tiny SigLIP image encoder; xDiT: xfuser's wrapper, bare, every level",
    ),
    "dit": Evidence(
        xdit_layouts=(),
        pipelines=(),
        tests=("tests/test_parallel_cfg_dp.py", "tests/test_digits_testbed.py"),
        note="xDiT has no DiT wrapper (CFG and data parallel tested with plain torch.distributed); "
        "DiTPipeline not run, the digits testbed's pipeline mirrors its calls",
    ),
}


@dataclass(frozen=True)
class FamilySupport:
    """One row of :func:`support_table`."""

    family: str
    model_classes: tuple[str, ...]
    levels: tuple[str, ...]
    xdit_layouts: tuple[str, ...]
    pipelines: tuple[str, ...]
    note: str

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready lists and strings.

        Example:
            >>> support_table()[0].to_dict()["levels"][0]
            'step'
        """
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _levels(cls: type[ModelAdapter]) -> tuple[str, ...]:
    has_token = cls.token_processor is not ModelAdapter.token_processor
    return LEVELS if has_token else LEVELS[:2]


def support_table() -> list[FamilySupport]:
    """One row per registered model family (in registration order): its transformer classes, the
    reuse levels its adapter supports, and the xDiT layouts and diffusers pipelines tested with it.

    Example:
        >>> families = [r.family for r in support_table()]  # the adapter modules' order
        >>> families.index("cogvideox") < families.index("dit") < families.index("flux")
        True
    """
    rows = []
    for cls in registered_adapters():
        tested = TESTED.get(
            cls.name, Evidence(xdit_layouts=(), pipelines=(), tests=(), note="not tested here")
        )
        rows.append(
            FamilySupport(
                family=cls.name,
                model_classes=tuple(cls.model_class_names),
                levels=_levels(cls),
                xdit_layouts=tested.xdit_layouts,
                pipelines=tested.pipelines,
                note=tested.note,
            )
        )
    return rows
