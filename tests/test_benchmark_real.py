"""``python -m benchmarks.run --pipeline`` end to end on a tiny random FLUX pipeline saved to disk
(the way a real checkpoint is loaded): 2 prompts, 4 steps, the reference and one X-Slim preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import real, run

TINY_CALL = ["--height", "128", "--width", "128", "--call-kwargs", '{"max_sequence_length": 8}']


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xslim_xdit.testing.pipelines import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("ckpt") / "tiny-flux")


def _tiny_clip(path: Path) -> Path:
    """A tiny random CLIP model with a processor, saved like a downloaded one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from xslim_xdit.testing.pipelines import _clip_tokenizer

    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=77, eos_token_id=1, bos_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path


def test_real_checkpoint_end_to_end(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red fox in the snow\na blue car on a bridge\n")
    out = tmp_path / "out"
    clip = _tiny_clip(tmp_path / "clip")
    argv = ["--pipeline", "flux", "--model", str(checkpoint), "--prompts", str(prompts), "--steps", "4"]
    argv += ["--methods", "=X-Slim preset flux-fast", "--repeats", "1", "--out", str(out), "--no-progress"]
    argv += ["--clip-model", str(clip), *TINY_CALL]
    assert run.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    tb = res["testbeds"]["flux"]
    assert list(tb["methods"]) == ["full", "X-Slim preset flux-fast"]
    assert tb["methods"]["full"]["psnr"] == "inf"  # the reference against itself
    xs = tb["methods"]["X-Slim preset flux-fast"]
    assert isinstance(xs["psnr"], float) and xs["psnr"] > 0 and 0 < xs["ssim"] <= 1
    assert 0 < xs["xslim_flops_fraction"] < 1  # the preset did skip work
    # flux-fast rescaled to 4 steps: full, token refresh, full, full
    assert xs["run_stats"][0]["kinds"] == ["full", "token", "full", "full"]
    for e in tb["methods"].values():  # CLIP score computed with the local model, per method
        assert 0 <= e["clip_score"] <= 100
    assert "lpips skipped: --lpips-weights not given" in printed
    assert "image_reward skipped: --imagereward-weights not given" in printed
    assert set(tb["skipped_metrics"]) == {"lpips", "image_reward"}
    assert tb["restored_bit_identical"] is True
    assert res["meta"]["mode"] == "real checkpoint" and res["meta"]["samples"] == 2
    assert (out / "report.md").read_text().count("X-Slim preset flux-fast") == 1


def test_wrong_family_and_missing_model_are_named(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--pipeline needs --model"):
        run.main(["--pipeline", "flux", "--out", str(tmp_path)])
    with pytest.raises(
        SystemExit, match="--pipeline pixart expects PixArtSigmaPipeline or PixArtAlphaPipeline"
    ):
        run.main(["--pipeline", "pixart", "--model", str(checkpoint), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--model needs --pipeline"):
        run.main(["--model", str(checkpoint), "--out", str(tmp_path)])


def test_shipped_prompt_file() -> None:
    prompts = real.read_prompts(real.DEFAULT_PROMPTS)
    assert 45 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)


def test_default_methods_use_the_published_presets() -> None:
    names = [m.name for m in real.real_methods(50, "hunyuan_video")]
    assert names[0] == "full" and "X-Slim preset hunyuan_video-fast" in names
    assert not any("flux-" in n for n in names)
    preset = next(m for m in real.real_methods(50, "flux") if m.name == "X-Slim preset flux-slow")
    assert preset.config.block_thresh == (1.5, 10.0)  # published thresholds on a real checkpoint


def _save_tiny_wan(path: Path) -> Path:
    """A tiny random ``WanPipeline`` (UMT5 encoder, Wan VAE, the tiny Wan transformer) on disk."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from xslim_xdit.testing import tiny_model
    from xslim_xdit.testing.pipelines import _t5_tokenizer

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    cfg = UMT5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    cfg.update(
        dict(relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    transformer = tiny_model("wan", in_channels=16, out_channels=16, text_dim=16)
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=UMT5EncoderModel(cfg).eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path


def test_video_checkpoint_psnr_per_frame(tmp_path: Path) -> None:
    ckpt = _save_tiny_wan(tmp_path / "tiny-wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a river at night\na dog running\n")
    out = tmp_path / "out"
    argv = ["--pipeline", "wan", "--model", str(ckpt), "--prompts", str(prompts), "--steps", "6"]
    argv += ["--methods", "=X-Slim default config", "--repeats", "1", "--out", str(out), "--no-progress"]
    argv += [
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        "5",
        "--call-kwargs",
        '{"max_sequence_length": 8}',
    ]
    assert run.main(argv) == 0
    tb = json.loads((out / "results.json").read_text())["testbeds"]["wan"]
    xs = tb["methods"]["X-Slim default config"]
    assert isinstance(xs["psnr"], float) and xs["psnr"] > 0
    assert "skip" in xs["run_stats"][0]["kinds"]  # the online controller skipped at least one step
    assert tb["restored_bit_identical"] is True


def test_video_frames_are_the_images_compared() -> None:
    import torch

    tb = real.RealPipelineTestbed(
        "wan", ["x"], device=torch.device("cpu"), dtype=torch.float32, call_kwargs={}
    )
    clip = torch.rand(2, 3, 5, 8, 8)  # (B, C, T, H, W)
    frames = tb.as_images(clip)
    assert frames.shape == (10, 3, 8, 8)
    assert torch.equal(frames[6], clip[1, :, 1])  # sample 1, frame 1


def test_lpips_from_local_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LPIPS plumbing, with a stand-in ``lpips`` module (the package is not installed here):
    the network is built without downloads, its weights come from the file, the reference scores 0."""
    import sys
    import types

    import torch

    built: list[dict] = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, **kw: object) -> None:
            super().__init__()
            built.append(kw)
            self.scale = torch.nn.Parameter(torch.zeros(()))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.scale * (a - b).abs().mean(dim=(1, 2, 3))

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    weights = tmp_path / "lpips.pth"
    torch.save({"scale": torch.tensor(2.0)}, weights)
    ref = torch.zeros(2, 3, 4, 4)
    images = {"full": ref, "other": torch.full((2, 3, 4, 4), 0.25)}
    scores, why = real.lpips_vs_reference(images, "full", weights, lambda x: x)
    assert why is None and built[0]["pnet_rand"] is True and built[0]["pretrained"] is False
    assert scores["full"] == 0.0 and scores["other"] == pytest.approx(2.0 * 0.5)  # [-1, 1] scale: 0.25 -> 0.5
    assert real.lpips_vs_reference(images, "full", None, lambda x: x) == (
        {},
        "--lpips-weights not given (LPIPS weights are never downloaded)",
    )
