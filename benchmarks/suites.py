"""Testbeds the benchmark runs on: a model, how to sample it, and how to judge its samples.

A testbed is the unit the runner loops over. Adding the FLUX-architecture or the
HunyuanVideo-architecture model means writing one more :class:`Testbed` subclass (load the
pipeline, sample a batch from a seed, score a set of samples against real data) and adding it to
:data:`TESTBEDS`; methods, timing, metrics, plots and the report need no change.

Example:
    >>> tb = TESTBEDS["digits"]()
    >>> tb.conditions(12)[:3]
    [0, 1, 2]
"""

from __future__ import annotations

import importlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class Testbed(ABC):
    """One model to benchmark.

    Attributes:
        name: key in :data:`TESTBEDS` and in ``results.json``.
        guidance_scale: classifier-free guidance used for every sample.
        checkpoint_note: set by :meth:`load`: which weights were used (trained or random).
    """

    name: str = ""
    guidance_scale: float = 1.0
    checkpoint_note: str = ""

    @abstractmethod
    def load(self, checkpoint: str | None) -> Any:
        """Return the pipeline (``.transformer`` and ``.scheduler``), in eval mode."""

    @abstractmethod
    def conditions(self, n: int) -> list[Any]:
        """The condition (class, prompt ...) of each of ``n`` samples, in order."""

    @abstractmethod
    def generate(self, pipe: Any, conditions: list[Any], steps: int, seed: int) -> torch.Tensor:
        """Sample one batch; images in ``[0, 1]``, shape ``(B, C, H, W)`` (videos: ``(B, C, T, H, W)``)."""

    @abstractmethod
    def sample_quality(self, images: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
        """Distribution metrics of a sample set, e.g. ``accuracy`` and ``frechet_distance``."""

    @abstractmethod
    def floors(self, n: int, seed: int = 0) -> dict[str, float]:
        """The same metrics on real data (the best a generator can score), for ``n`` samples."""

    def as_images(self, samples: torch.Tensor) -> torch.Tensor:
        """The images PSNR and SSIM are computed on: the samples themselves (videos: their frames,
        so that PSNR is per frame, as the video papers report it)."""
        return samples

    def calibration_runs(self, pipe: Any, steps: int, n: int = 4) -> list[Callable[[], Any]]:
        """Callables that each run one generation for X-Slim's offline calibration: ``n`` single
        samples whose seeds (987654, 987655, ...) differ from the evaluated ones and whose
        conditions are spread over the testbed's conditions (every third)."""
        pool = self.conditions(max(10, 3 * n))
        picks = [(pool[(3 * i) % len(pool)], 987_654 + i) for i in range(n)]
        return [lambda c=c, s=s: self.generate(pipe, [c], steps, seed=s) for c, s in picks]

    def describe(self) -> dict[str, Any]:
        """Facts about the model for the report."""
        return {"name": self.name, "guidance_scale": self.guidance_scale, "checkpoint": self.checkpoint_note}


class _DigitsClassesTestbed(Testbed):
    """Shared parts of the testbeds: the 10 digits classes as conditions, samples scored (frame by
    frame for video) with the committed digits classifier, real digits as the floors.

    ``checkpoint=None`` loads the committed checkpoint; ``"random"`` builds an untrained model of
    the same shape (for CI when no checkpoint exists; its quality numbers mean nothing).
    """

    module_name = ""  # the testbed module (benchmarks.testbeds.digits / flux_testbed / video_testbed)
    pipeline_attr = ""
    missing_checkpoint = "no {name} checkpoint at {path} (or pass --checkpoint random)"

    def __init__(self) -> None:
        # imported here, not at module import: `python -m benchmarks.run --help` stays light
        self.module: Any = importlib.import_module(self.module_name)
        self.guidance_scale = self.module.DEFAULT_GUIDANCE_SCALE
        self._classifier: Any = None

    def _random_pipeline(self) -> Any:
        """An untrained pipeline of the testbed's shape (the class-token recipe of the FLUX and
        video testbeds; the DiT overrides it)."""
        m = self.module
        pipeline_cls = getattr(m, self.pipeline_attr)
        return pipeline_cls(m.make_transformer().eval(), m.make_scheduler(), m.make_text_encoder().eval())

    def load(self, checkpoint: str | None) -> Any:
        pipeline_cls = getattr(self.module, self.pipeline_attr)
        if checkpoint == "random":
            torch.manual_seed(0)
            self.checkpoint_note = "random weights (untrained): quality numbers are meaningless"
            return self._random_pipeline()
        path = Path(checkpoint) if checkpoint else self.module.DEFAULT_CHECKPOINT
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(self.missing_checkpoint.format(name=self.name, path=path))
        self.checkpoint_note = str(path)
        return pipeline_cls.from_checkpoint(path)

    def conditions(self, n: int) -> list[Any]:
        return [i % 10 for i in range(n)]

    def generate(self, pipe: Any, conditions: list[Any], steps: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return pipe(
            torch.tensor(conditions),
            num_inference_steps=steps,
            guidance_scale=self.guidance_scale,
            generator=gen,
            progress=False,
        )

    def _clf(self) -> Any:
        if self._classifier is None:
            from benchmarks.testbeds.digits_classifier import load_classifier

            self._classifier = load_classifier()
        return self._classifier

    def _labels(self, images: torch.Tensor, conditions: list[Any]) -> torch.Tensor:
        frames = self.as_images(images)
        return torch.tensor(conditions).repeat_interleave(frames.shape[0] // len(conditions))

    def sample_quality(self, images: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
        from benchmarks.metrics import sample_quality

        q = sample_quality(self.as_images(images), self._labels(images, conditions), self._clf())
        return {"accuracy": q["accuracy"], "frechet_distance": q["frechet_distance"]}

    def _real(self, split: str, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real data as the testbed's samples look (``[0, 1]``), and their labels."""
        from benchmarks.testbeds.digits import load_digits_images

        x, y = load_digits_images(split)
        if n is not None:
            rng = random.Random(seed)
            by_class: dict[int, list[int]] = {}
            for i, c in enumerate(y.tolist()):
                by_class.setdefault(c, []).append(i)
            for v in by_class.values():
                rng.shuffle(v)
            conds = self.conditions(n)
            counters: dict[int, int] = {}
            idx = []
            for c in conds:
                k = counters.get(c, 0)
                idx.append(by_class[c][k % len(by_class[c])])
                counters[c] = k + 1
            x, y = x[idx], y[idx]
        return (self._as_samples(x, seed) + 1) / 2, y

    def _as_samples(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return x

    def floors(self, n: int, seed: int = 0) -> dict[str, float]:
        """Real-vs-real: ``n`` real training items (balanced as the samples) scored like samples,
        and the whole train split against the test split (as frames, for video)."""
        from benchmarks.metrics import frechet_distance, sample_quality
        from benchmarks.testbeds.digits_classifier import classify

        real, y = self._real("train", n, seed)
        q = sample_quality(self.as_images(real), self._labels(real, y.tolist()), self._clf())
        tr, _ = self._real("train", None, seed)
        te, y_te = self._real("test", None, seed)
        logits_t, feats_t = classify(self.as_images(te), self._clf())
        _, feats_tr = classify(self.as_images(tr), self._clf())
        labels_te = self._labels(te, y_te.tolist())
        return {
            "accuracy_real_n": q["accuracy"],
            "frechet_distance_real_n": q["frechet_distance"],
            "accuracy_real_test": float((logits_t.argmax(1) == labels_te).float().mean()),
            "frechet_distance_train_vs_test": frechet_distance(feats_tr, feats_t),
            "n": float(n),
        }


class DigitsTestbed(_DigitsClassesTestbed):
    """The class-conditional DiT on scikit-learn's digits (16x16, DDIM, batched CFG)."""

    name = "digits"
    module_name = "benchmarks.testbeds.digits"
    pipeline_attr = "DigitsDiTPipeline"
    missing_checkpoint = (
        "no digits DiT checkpoint at {path} (train one with "
        "`python -m benchmarks.testbeds.train_digits_dit`, or pass --checkpoint random)"
    )

    def _random_pipeline(self) -> Any:
        from benchmarks.testbeds.train_digits_dit import make_sampling_scheduler, make_train_scheduler

        tr = self.module.make_transformer().eval()
        return self.module.DigitsDiTPipeline(tr, make_sampling_scheduler(make_train_scheduler()))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            model="DiTTransformer2DModel (6 blocks, width 128, 64 tokens), epsilon-prediction",
            sampler="DDIM eta=0, classifier-free guidance batched [cond; uncond] in one forward",
            data="scikit-learn digits, 16x16, 10 classes",
        )
        return d


class FluxTestbed(_DigitsClassesTestbed):
    """The FLUX-architecture testbed: ``FluxTransformer2DModel`` (2 double-stream + 4 single-stream
    blocks, width 128, 64 image + 4 class tokens), flow matching with FLUX's time shift, class as
    the prompt, true CFG batched in one forward (:mod:`benchmarks.testbeds.flux_testbed`)."""

    name = "flux"
    module_name = "benchmarks.testbeds.flux_testbed"
    pipeline_attr = "DigitsFluxPipeline"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            model="FluxTransformer2DModel (2 double-stream + 4 single-stream blocks, width 128, "
            "64 image tokens + 4 class tokens through the text path), velocity prediction",
            sampler="FlowMatchEulerDiscreteScheduler with FLUX's dynamic time shift (max_shift "
            f"{self.module.DEFAULT_MAX_SHIFT}), true CFG batched [cond; uncond] in one forward",
            data="scikit-learn digits, 16x16, packed 2x2 as FLUX packs latents, 10 classes",
        )
        return d


class FluxSteepTestbed(FluxTestbed):
    """The FLUX testbed's checkpoint sampled with a steeper time shift, as a harder ruler.

    The committed sampler (``max_shift`` 2.2, shift factor 9) leaves 25 steps 28.7 dB from 50 steps
    where FLUX.1-dev is at 17.9 dB. The shift puts more of the steps at high noise and so leaves the
    few low-noise steps, where a sample's detail forms, to change the most per step: with
    ``max_shift`` 4.0 (shift factor ``e^4``, about 55, at 64 tokens) and guidance 7, 25 and 15 steps
    land at 19.3 and 15.1 dB (n = 30) with every sample still read as its digit
    (``python -m benchmarks.testbeds.eval_testbeds flux --shift 4.0``). Only the sampler differs;
    the weights are the FLUX testbed's. It is realistic for step counts and NOT for caching: about
    half of the steps now sit at nearly pure noise, where features barely change, so reuse is
    far cheaper than on FLUX.1-dev (``docs/testbeds.md``); do not headline a margin from it.
    """

    name = "flux_steep"
    max_shift = 4.0

    def load(self, checkpoint: str | None) -> Any:
        pipe = super().load(checkpoint)
        pipe.scheduler = self.module.make_scheduler(max_shift=self.max_shift)
        return pipe

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["sampler"] = d["sampler"].replace(
            f"max_shift {self.module.DEFAULT_MAX_SHIFT}", f"max_shift {self.max_shift}"
        )
        return d


class VideoTestbed(_DigitsClassesTestbed):
    """The HunyuanVideo-architecture testbed: ``HunyuanVideoTransformer3DModel`` on 4-frame clips of
    moving digits (256 image tokens, 4 class tokens with an attention mask), flow matching with a
    static shift, true CFG batched in one forward (:mod:`benchmarks.testbeds.video_testbed`).
    PSNR/SSIM/accuracy/FD are per frame."""

    name = "video"
    module_name = "benchmarks.testbeds.video_testbed"
    pipeline_attr = "MovingDigitsVideoPipeline"

    def as_images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.module.frames_of(samples) if samples.ndim == 5 else samples

    def _as_samples(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return self.module.make_clips(x, self.module.random_velocities(len(x), gen))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            model="HunyuanVideoTransformer3DModel (token refiner, 2 double-stream + 2 single-stream "
            "blocks, width 128, 4 frames x 64 tokens, 4 masked class tokens), velocity prediction",
            sampler="FlowMatchEulerDiscreteScheduler, static shift "
            f"{self.module.DEFAULT_FLOW_SHIFT}, true CFG batched [cond; uncond] in one forward",
            data="moving scikit-learn digits, 4 frames of 16x16, 8 directions, 10 classes",
        )
        return d


class WanVideoTestbed(VideoTestbed):
    """The Wan-architecture testbed: ``WanTransformer3DModel`` (4 blocks, width 128, patch
    ``(1, 2, 2)``) on the video testbed's moving-digit clips, the class as 4 text tokens it
    cross-attends to, UniPC with a static flow shift, true CFG as two calls per step in
    ``cache_context("cond")`` / ``("uncond")`` (:mod:`benchmarks.testbeds.wan_testbed`)."""

    name = "wan_video"
    module_name = "benchmarks.testbeds.wan_testbed"
    pipeline_attr = "MovingDigitsWanPipeline"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            model="WanTransformer3DModel (4 blocks, width 128, patch (1, 2, 2), 4 frames x 64 tokens, "
            "4 class tokens cross-attended), velocity prediction",
            sampler=f"UniPCMultistepScheduler (flow sigmas, flow_shift {self.module.DEFAULT_FLOW_SHIFT}), "
            "true CFG as two transformer calls per step (cache_context cond / uncond), as WanPipeline",
        )
        return d


class Flux2Testbed(FluxTestbed):
    """The FLUX.2-architecture testbed: ``Flux2Transformer2DModel`` (2 double-stream + 4
    single-stream blocks, width 128, 64 image + 4 class tokens, 4-axis RoPE), FLUX.2's
    step-dependent shift, true CFG as two calls per step in ``cache_context("cond")`` /
    ``("uncond")`` (:mod:`benchmarks.testbeds.flux2_testbed`)."""

    name = "flux2"
    module_name = "benchmarks.testbeds.flux2_testbed"
    pipeline_attr = "DigitsFlux2Pipeline"

    def describe(self) -> dict[str, Any]:
        d = _DigitsClassesTestbed.describe(self)
        d.update(
            model="Flux2Transformer2DModel (2 double-stream + 4 single-stream blocks, width 128, "
            "64 image tokens + 4 class tokens through the text path, no guidance embedding), velocity prediction",
            sampler="FlowMatchEulerDiscreteScheduler with FLUX.2's empirical mu (by step count), "
            "true CFG as two transformer calls per step (cache_context cond / uncond), as Flux2KleinPipeline",
            data="scikit-learn digits, 16x16, patchified 2x2 and packed as Flux2Pipeline, 10 classes",
        )
        return d


class EmojiFluxTestbed(Testbed):
    """The emoji FLUX testbed (issue 13): ``FluxTransformer2DModel`` (2 double-stream + 4
    single-stream blocks, width 192) on 32x32 RGB colour emoji packed to 256 tokens x 12 channels,
    8 coarse classes (faces, people, animals/nature, food, travel/places, objects, symbols, flags)
    as the prompt through the text path, FLUX's sampler with FLUX.1's ``max_shift`` 1.15, true CFG
    batched in one forward (:mod:`benchmarks.testbeds.emoji_flux`). Samples are scored with the
    emoji classifier (:mod:`benchmarks.testbeds.emoji_classifier`) against the real emoji.

    ``checkpoint=None`` loads the committed checkpoint; ``"random"`` an untrained model (CI).
    """

    name = "emoji_flux"

    def __init__(self) -> None:
        self.module: Any = importlib.import_module("benchmarks.testbeds.emoji_flux")
        self.guidance_scale = self.module.DEFAULT_GUIDANCE_SCALE
        self._classifier: Any = None

    def load(self, checkpoint: str | None) -> Any:
        m = self.module
        if checkpoint == "random":
            torch.manual_seed(0)
            self.checkpoint_note = "random weights (untrained): quality numbers are meaningless"
            return m.EmojiFluxPipeline(
                m.make_transformer().eval(), m.make_scheduler(), m.make_text_encoder().eval()
            )
        path = Path(checkpoint) if checkpoint else m.DEFAULT_CHECKPOINT
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"no emoji_flux checkpoint at {path} (or pass --checkpoint random)")
        self.checkpoint_note = str(path)
        return m.EmojiFluxPipeline.from_checkpoint(path)

    def conditions(self, n: int) -> list[Any]:
        from benchmarks.testbeds.emoji import NUM_CLASSES

        return [i % NUM_CLASSES for i in range(n)]

    def generate(self, pipe: Any, conditions: list[Any], steps: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return pipe(
            torch.tensor(conditions),
            num_inference_steps=steps,
            guidance_scale=self.guidance_scale,
            generator=gen,
            progress=False,
        )

    def _clf(self) -> Any:
        if self._classifier is None:
            from benchmarks.testbeds.emoji_classifier import load_classifier

            self._classifier = load_classifier()
        return self._classifier

    def _real(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from benchmarks.testbeds.emoji import load_emoji_images

        x, y = load_emoji_images(split)
        return (x + 1) / 2, y

    def sample_quality(self, images: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
        from benchmarks.metrics import frechet_distance
        from benchmarks.testbeds.emoji_classifier import classify

        logits, feats = classify(images, self._clf())
        _, real_feats = classify(self._real("test")[0], self._clf())
        acc = float((logits.argmax(1) == torch.tensor(conditions)).float().mean())
        return {"accuracy": acc, "frechet_distance": frechet_distance(feats, real_feats)}

    def floors(self, n: int, seed: int = 0) -> dict[str, float]:
        """``n`` real train emoji (class-balanced as the samples, drawn with ``seed``) scored like
        samples, and the train split against the test split."""
        from benchmarks.metrics import frechet_distance
        from benchmarks.testbeds.emoji_classifier import classify

        tr, y_tr = self._real("train")
        te, y_te = self._real("test")
        gen = torch.Generator().manual_seed(seed)
        conds = torch.tensor(self.conditions(n))
        idx = torch.stack(
            [
                torch.nonzero(y_tr == c)[torch.randint(0, int((y_tr == c).sum()), (1,), generator=gen)][0, 0]
                for c in conds.tolist()
            ]
        )
        q = self.sample_quality(tr[idx], conds.tolist())
        logits_t, feats_t = classify(te, self._clf())
        _, feats_tr = classify(tr, self._clf())
        return {
            "accuracy_real_n": q["accuracy"],
            "frechet_distance_real_n": q["frechet_distance"],
            "accuracy_real_test": float((logits_t.argmax(1) == y_te).float().mean()),
            "frechet_distance_train_vs_test": frechet_distance(feats_tr, feats_t),
            "n": float(n),
        }

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            model="FluxTransformer2DModel (2 double-stream + 4 single-stream blocks, width 192, "
            "256 image tokens + 4 class tokens through the text path), velocity prediction",
            sampler="FlowMatchEulerDiscreteScheduler with FLUX's dynamic time shift (max_shift "
            f"{self.module.DEFAULT_MAX_SHIFT}), true CFG batched [cond; uncond] in one forward",
            data="Noto Color Emoji, 32x32 RGB, packed 2x2 as FLUX packs latents, 8 coarse classes",
        )
        return d


#: Registered testbeds: name -> class.
TESTBEDS: dict[str, type[Testbed]] = {
    "digits": DigitsTestbed,
    "flux": FluxTestbed,
    "flux_steep": FluxSteepTestbed,
    "video": VideoTestbed,
    "wan_video": WanVideoTestbed,
    "flux2": Flux2Testbed,
    "emoji_flux": EmojiFluxTestbed,
}
