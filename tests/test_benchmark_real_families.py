"""``python -m benchmarks.run --pipeline FAMILY`` end to end for the families added after FLUX and
Wan: a tiny random pipeline of each saved to disk and loaded back as a checkpoint, 2 prompts,
6 steps, the reference and X-Slim with token refresh (0.12/0.35), images decoded by the checkpoint's VAE.

CogVideoX runs with its own (tiny T5) text encoder. The other families' text encoders
(Qwen2.5-VL, Mistral 3, Qwen3, Gemma 3) cannot be built tiny and offline with their chat templates here:
their checkpoints are saved without one, and their ``encode_prompt`` is given the tiny builders'
prompt embeddings, so everything from the embeddings on (latents, scheduler, guidance, the
transformer under X-Slim, the VAE decode, the metrics) runs as with a real checkpoint.

LTX-2 runs with CFG alone (batched: one call per step; its spatio-temporal and modality guidance
would triple the test's time), a decoder that doubles its width per level
(the tiny LTX-2 VAE of :mod:`xslim_xdit.testing`, 8 channels at every level, does not decode) and
a tiny vocoder (decoded output needs one); its audio is not compared.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import real, run

#: family -> tiny call flags (size, frames, text length) of ``benchmarks.run``
TINY_FLAGS: dict[str, list[str]] = {
    "cogvideox": [
        "--height",
        "64",
        "--width",
        "64",
        "--num-frames",
        "5",
        "--call-kwargs",
        '{"max_sequence_length": 6}',
    ],
    "qwen_image": ["--height", "64", "--width", "64"],
    "flux2": ["--height", "64", "--width", "64"],
    "z_image": ["--height", "128", "--width", "128"],
    "hunyuan_video15": ["--height", "64", "--width", "64", "--num-frames", "5"],
    "ltx2": [
        "--height",
        "128",
        "--width",
        "128",
        "--num-frames",
        "9",
        "--call-kwargs",
        '{"stg_scale": 0.0, "audio_stg_scale": 0.0, "modality_scale": 1.0, "audio_modality_scale": 1.0}',
    ],  # fmt: skip
}


def _tiny_pipeline(family: str) -> tuple[Any, dict[str, Any]]:
    """The family's tiny pipeline with a VAE that decodes, and its tiny call's prompt embeddings."""
    import diffusers

    from xslim_xdit.testing.cogvideox_pipelines import tiny_cogvideox_pipeline
    from xslim_xdit.testing.encoders import tiny_vae
    from xslim_xdit.testing.hunyuan_pipelines import tiny_hunyuan_video15_pipeline
    from xslim_xdit.testing.image_pipelines import tiny_image_pipeline
    from xslim_xdit.testing.ltx2_pipelines import tiny_ltx2_pipeline

    if family == "cogvideox":
        return tiny_cogvideox_pipeline(), {}
    if family == "ltx2":
        pipe, kwargs = tiny_ltx2_pipeline()
        torch.manual_seed(8)
        vae = diffusers.AutoencoderKLLTX2Video(
            latent_channels=4, spatial_compression_ratio=32, temporal_compression_ratio=8,
            block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 16, 32),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        )  # fmt: skip
        # the vocoder reads the audio VAE's mel output: 2 channels x 4 mel bins
        vocoder = diffusers.pipelines.ltx2.vocoder.LTX2Vocoder(
            in_channels=8, hidden_channels=8, upsample_kernel_sizes=[4], upsample_factors=[2],
            resnet_kernel_sizes=[3], resnet_dilations=[[1]],
        )  # fmt: skip
        pipe.register_modules(vae=vae.eval(), vocoder=vocoder.eval())
    elif family == "hunyuan_video15":
        pipe, kwargs = tiny_hunyuan_video15_pipeline()
        # the tiny transformer's narrowed ByT5 projection does not survive save_pretrained (diffusers
        # builds it 2048 wide): the same config built as diffusers builds it
        torch.manual_seed(9)
        transformer = diffusers.HunyuanVideo15Transformer3DModel.from_config(pipe.transformer.config)
        pipe.register_modules(transformer=transformer.eval())
    else:
        pipe, kwargs = tiny_image_pipeline(family)
        torch.manual_seed(7)  # a VAE (the tiny image pipelines have none: they return latents)
        if family == "qwen_image":
            vae = diffusers.AutoencoderKLQwenImage(
                base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
            )  # fmt: skip
        elif family == "flux2":
            vae = diffusers.AutoencoderKLFlux2(
                block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=2, norm_num_groups=2
            )
        else:
            vae = tiny_vae(4, seed=7, scaling_factor=0.3611, shift_factor=0.1159)
        pipe.register_modules(vae=vae.eval())
    embeds = {k: v for k, v in kwargs.items() if "embeds" in k or "mask" in k}
    return pipe, embeds


@pytest.mark.parametrize("family", sorted(TINY_FLAGS))
def test_family_checkpoint_end_to_end(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe, embeds = _tiny_pipeline(family)
    ckpt = tmp_path / f"tiny-{family}"
    pipe.save_pretrained(ckpt)
    encoded: list[Any] = []
    if embeds:  # no text encoder: encode_prompt gets the tiny embeddings instead of the prompt's
        cls = type(pipe)
        encode = cls.encode_prompt
        params = set(inspect.signature(encode).parameters)

        def given_embeds(self: Any, *args: Any, **kwargs: Any) -> Any:
            encoded.append(kwargs.get("prompt"))
            for name, value in embeds.items():
                if name in params and kwargs.get(name) is None:
                    kwargs[name] = value
            return encode(self, *args, **kwargs)

        monkeypatch.setattr(cls, "encode_prompt", given_embeds)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na blue car on a bridge\n")
    out = tmp_path / "out"
    argv = ["--pipeline", family, "--model", str(ckpt), "--prompts", str(prompts), "--steps", "6"]
    argv += ["--methods", "=X-Slim +token 0.12/0.35", "--repeats", "1", "--out", str(out), "--no-progress"]
    assert run.main(argv + TINY_FLAGS[family]) == 0
    tb = json.loads((out / "results.json").read_text())["testbeds"][family]
    assert list(tb["methods"]) == ["full", "X-Slim +token 0.12/0.35"]
    assert tb["methods"]["full"]["psnr"] == "inf"  # the reference against itself
    xs = tb["methods"]["X-Slim +token 0.12/0.35"]
    assert isinstance(xs["psnr"], float) and 0 < xs["ssim"] <= 1
    assert len(xs["run_stats"][0]["kinds"]) == 6  # X-Slim attached: one decision per step
    assert 0 < xs["xslim_flops_fraction"] < 1  # and it saved work
    assert tb["restored_bit_identical"] is True
    fam = real.FAMILIES[family]
    call = tb["testbed"]["call"]
    assert all(call[k] == v for k, v in fam.call.items() if k not in ("height", "width", "num_frames"))
    if fam.negative_prompt:  # Qwen-Image: its true CFG ran, on an empty negative prompt
        assert [""] in encoded
    assert "lpips skipped" in capsys.readouterr().out


def test_every_supported_pipeline_family_has_a_real_mode() -> None:
    """Every family of the support table with a text-to-image/video diffusers pipeline runs here
    (DiT has none: the digits testbed mirrors its calls)."""
    from xslim_xdit.support import support_table

    supported = {row.family for row in support_table() if row.pipelines}
    assert supported <= set(real.FAMILIES), supported - set(real.FAMILIES)
    for name, fam in real.FAMILIES.items():
        assert fam.adapter == name
    assert real.FAMILIES["ltx2"].steps == 30 and real.FAMILIES["ltx2"].call["num_frames"] == 121
    assert real.FAMILIES["qwen_image"].guidance_key == "true_cfg_scale"


def test_guidance_flag_of_a_guider_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--guidance-scale: the hunyuan_video15 pipeline takes no guidance"):
        run.main(["--pipeline", "hunyuan_video15", "--model", str(tmp_path), "--guidance-scale", "5"])
