"""The committed FLUX and HunyuanVideo testbeds draw the requested digits with FLUX/HunyuanVideo call patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.testbeds import flux_testbed, video_testbed
from benchmarks.testbeds.digits_classifier import classify
from benchmarks.testbeds.flux_testbed import DigitsFluxPipeline
from benchmarks.testbeds.video_testbed import MovingDigitsVideoPipeline, frames_of

# Bounds measured with the committed checkpoints at 20 steps and the default guidance (7), seeds 0..9:
# FLUX, 20 images (labels 0..9 twice): accuracy 1.00 for every seed; video, 10 clips x 4 frames
# (labels 0..9): min 0.975 (one misread frame, seed 2), mean 0.9975. Each bound allows 3 more
# misread images (frames) than the worst seed, so the tests fail only if a checkpoint or a pipeline
# is broken, not on sampling noise.
FLUX_MIN_ACCURACY = 0.85
VIDEO_MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def flux_pipe() -> DigitsFluxPipeline:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return DigitsFluxPipeline.from_checkpoint()


@pytest.fixture(scope="module")
def video_pipe() -> MovingDigitsVideoPipeline:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return MovingDigitsVideoPipeline.from_checkpoint()


@pytest.mark.parametrize("module", [flux_testbed, video_testbed])
def test_committed_checkpoints_are_small(module: object) -> None:
    folder = module.DEFAULT_CHECKPOINT  # type: ignore[attr-defined]
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 6 * 2**20


def test_flux_digits_are_recognised(flux_pipe: DigitsFluxPipeline) -> None:
    labels = torch.arange(20) % 10
    images = flux_pipe(
        labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert images.shape == (20, 1, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    logits, _ = classify(images)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= FLUX_MIN_ACCURACY, f"accuracy {accuracy:.2f} < {FLUX_MIN_ACCURACY}"


def test_video_frames_are_recognised(video_pipe: MovingDigitsVideoPipeline) -> None:
    labels = torch.arange(10)
    clips = video_pipe(
        labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert clips.shape == (10, 1, video_testbed.NUM_FRAMES, 16, 16)
    assert clips.min() >= 0 and clips.max() <= 1
    logits, _ = classify(frames_of(clips))
    accuracy = (logits.argmax(1) == labels.repeat_interleave(video_testbed.NUM_FRAMES)).float().mean().item()
    assert accuracy >= VIDEO_MIN_ACCURACY, f"accuracy {accuracy:.2f} < {VIDEO_MIN_ACCURACY}"


def _record_calls(pipe: DigitsFluxPipeline | MovingDigitsVideoPipeline, calls: list[dict]) -> object:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(
            {
                "batch": kwargs["hidden_states"].shape[0],
                "text": kwargs["encoder_hidden_states"].shape[:2],
                "timestep": kwargs["timestep"].tolist(),
                "mask": kwargs.get("encoder_attention_mask"),
            }
        )

    return pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", ["flux", "video"])
def test_one_batched_cfg_forward_per_step(name: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(f"{name}_pipe")
    calls: list[dict] = []
    handle = _record_calls(pipe, calls)
    try:
        pipe([3, 7], num_inference_steps=4, guidance_scale=4.0, progress=False)
        assert [c["batch"] for c in calls] == [4] * 4
        assert all(tuple(c["text"]) == (4, 4) for c in calls)
        # One timestep per step, shared by the cond and uncond halves, decreasing over the run.
        firsts = [c["timestep"][0] for c in calls]
        assert all(len(set(c["timestep"])) == 1 for c in calls)
        assert firsts == sorted(firsts, reverse=True) and len(set(firsts)) == 4
        if name == "video":
            # The empty prompt (null class) has 1 valid token, the class prompts all 4.
            assert calls[0]["mask"].tolist() == [[1, 1, 1, 1]] * 2 + [[1, 0, 0, 0]] * 2
        calls.clear()
        pipe([3, 7], num_inference_steps=3, guidance_scale=1.0, progress=False)
        assert [c["batch"] for c in calls] == [2] * 3
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["flux", "video"])
def test_set_timesteps_once_per_run(name: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(f"{name}_pipe")
    original = pipe.scheduler.set_timesteps
    count = []

    def counting(*args: object, **kwargs: object) -> None:
        count.append(1)
        original(*args, **kwargs)

    pipe.scheduler.set_timesteps = counting
    try:
        pipe([1], num_inference_steps=5, progress=False)
    finally:
        del pipe.scheduler.set_timesteps
    assert len(count) == 1


@pytest.mark.parametrize("name", ["flux", "video"])
def test_same_seed_same_initial_noise(name: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(f"{name}_pipe")
    a = pipe([1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(3), progress=False)
    b = pipe([1, 2], num_inference_steps=5, generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    shape = (2, 1, 16, 16) if name == "flux" else (2, 1, video_testbed.NUM_FRAMES, 16, 16)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    c = pipe([1, 2], num_inference_steps=5, latents=noise, progress=False)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_flux_packing_round_trip() -> None:
    x = torch.randn(3, 1, 16, 16)
    tokens = flux_testbed.pack(x)
    assert tokens.shape == (3, 64, 4)
    torch.testing.assert_close(flux_testbed.unpack(tokens), x, rtol=0, atol=0)
    # Token (row r, col c) holds the 2x2 patch at pixels (2r.., 2c..), matching img_ids (0, r, c).
    ids = flux_testbed.image_ids()
    k = 8 * 3 + 5
    assert ids[k].tolist() == [0.0, 3.0, 5.0]
    torch.testing.assert_close(tokens[0, k], x[0, 0, 6:8, 10:12].reshape(-1), rtol=0, atol=0)


def test_video_clips_translate() -> None:
    img = torch.full((1, 1, 16, 16), -1.0)
    img[0, 0, 8, 8] = 1.0
    clips = video_testbed.make_clips(img, torch.tensor([[1, -1]]))
    assert clips.shape == (1, 1, video_testbed.NUM_FRAMES, 16, 16)
    for f in range(video_testbed.NUM_FRAMES):
        o = f - 1
        assert clips[0, 0, f, 8 - o, 8 + o] == 1.0
        assert (clips[0, 0, f] == 1.0).sum() == 1


def test_flux_steep_testbed_is_the_flux_checkpoint_under_a_steeper_shift() -> None:
    """Same weights, another sampler: the steep variant's sigmas sit higher at every step (more of
    the steps at high noise), and its report names the shift it used."""
    from benchmarks.suites import TESTBEDS

    plain, steep = TESTBEDS["flux"](), TESTBEDS["flux_steep"]()
    p_plain, p_steep = plain.load(None), steep.load(None)
    for a, b in zip(
        p_plain.transformer.state_dict().values(), p_steep.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert p_steep.scheduler.config.max_shift == steep.max_shift > p_plain.scheduler.config.max_shift
    sigmas = {}
    for name, pipe in (("plain", p_plain), ("steep", p_steep)):
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=pipe.scheduler.config.max_shift)
        sigmas[name] = pipe.scheduler.sigmas[1:-1]
    assert bool((sigmas["steep"] > sigmas["plain"]).all())
    assert f"max_shift {steep.max_shift}" in steep.describe()["sampler"]
