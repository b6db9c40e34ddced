"""Real checkpoints in the benchmark: ``python -m benchmarks.run --pipeline FAMILY --model PATH``.

A checkpoint folder (what ``save_pretrained`` writes, e.g. a local copy of FLUX.1-dev) is loaded
with ``DiffusionPipeline.from_pretrained(PATH)`` and run through the same runner as the testbeds
(:func:`benchmarks.run.run_testbed`): every method of :mod:`benchmarks.methods` side by side, same
seeds, the full computation first. Reported per method:

* PSNR and SSIM against the full computation's output (always; per frame for video);
* LPIPS against the full computation, only with ``--lpips-weights`` (a state dict of the whole
  ``lpips.LPIPS`` module, backbone included, so nothing is downloaded; needs the ``lpips`` package);
* CLIP score against the prompt, only with ``--clip-model`` (a local ``CLIPModel`` folder);
* ImageReward, only with ``--imagereward-weights`` (a local checkpoint file; needs the
  ``image-reward`` package).

A metric without its weights is skipped with one printed line saying so, and listed under
``skipped_metrics`` in ``results.json``. Nothing is ever downloaded.

Families (:data:`FAMILIES`): flux, flux2, qwen_image, z_image, pixart, sd3 (images);
hunyuan_video, hunyuan_video15, wan, cogvideox, ltx2 (video; LTX-2's audio is not compared).
Each runs at its published defaults (size, frames, guidance, steps; the source is cited beside
each), or the pipeline's own where none is published.

Supported: one process on one device (a GPU, or the CPU for tiny checkpoints). Multi-GPU xDiT
layouts (torchrun with Ulysses/Ring/PipeFusion/CFG parallel) are not run by this command; X-Slim
itself runs under them (``xslim_xdit.integrations.xfuser``), this benchmark does not yet.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.methods import (
    DBCache,
    FewerSteps,
    FirstBlockCache,
    Method,
    TaylorSeer,
    TeaCache,
    XSlim,
    full_methods,
)
from benchmarks.suites import Testbed


@dataclass(frozen=True)
class PipelineFamily:
    """How to call one family's pipeline at its published (or the pipeline's own) defaults.

    A size, frame count or guidance left out of ``call`` is the pipeline's own default, which it
    derives from the checkpoint's config (CogVideoX's ``sample_height``, HunyuanVideo 1.5's
    ``target_size``, the image pipelines' ``default_sample_size``)."""

    pipeline_classes: tuple[str, ...]  # the diffusers pipeline classes expected from the checkpoint
    call: dict[str, Any]  # default call kwargs (size, guidance, text length)
    video: bool = False
    adapter: str = ""  # X-Slim family name (presets, rescale polynomial)
    notes: str = ""
    negative_prompt: bool = False  # pass an empty negative prompt: the pipeline's CFG needs one
    extra: dict[str, Any] = field(default_factory=dict)
    steps: int = 50  # sampling steps when --steps is not given
    # the call argument --guidance-scale sets; None: the pipeline takes no guidance argument
    guidance_key: str | None = "guidance_scale"


#: The families X-Slim supports that have a diffusers text-to-image/video pipeline
#: (``xslim_xdit.support.support_table()``; Z-Image's and FLUX.2's families run their base
#: pipelines). Defaults of the families added later cite their source; "signature" is the
#: default of the pipeline's ``__call__`` in diffusers 0.42.
FAMILIES: dict[str, PipelineFamily] = {
    "flux": PipelineFamily(
        ("FluxPipeline",),
        {"height": 1024, "width": 1024, "guidance_scale": 3.5, "max_sequence_length": 512},
        adapter="flux",
    ),
    "hunyuan_video": PipelineFamily(
        ("HunyuanVideoPipeline",),
        {"height": 720, "width": 1280, "num_frames": 129, "guidance_scale": 6.0},
        video=True,
        adapter="hunyuan_video",
    ),
    "wan": PipelineFamily(
        ("WanPipeline",),
        {"height": 720, "width": 1280, "num_frames": 81, "guidance_scale": 5.0},
        video=True,
        adapter="wan",
    ),
    "pixart": PipelineFamily(
        ("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
        {"height": 1024, "width": 1024, "guidance_scale": 4.5},
        adapter="pixart",
    ),
    "sd3": PipelineFamily(
        ("StableDiffusion3Pipeline",),
        {"height": 1024, "width": 1024, "guidance_scale": 7.0},
        adapter="sd3",
    ),
    # pipeline_flux2.py EXAMPLE_DOC_STRING (FLUX.2-dev): `pipe(prompt, num_inference_steps=50,
    # guidance_scale=2.5)`; size: the pipeline's default (default_sample_size 128 x 8 = 1024 px)
    "flux2": PipelineFamily(("Flux2Pipeline",), {"guidance_scale": 2.5}, adapter="flux2", steps=50),
    # pipeline_qwenimage.py EXAMPLE_DOC_STRING (Qwen/Qwen-Image): `num_inference_steps=50`;
    # true_cfg_scale 4.0 (signature); its docstring: "Classifier-free guidance is enabled by
    # setting `true_cfg_scale > 1` and a provided `negative_prompt`" (an empty one here);
    # size: the pipeline's default (128 x 8 = 1024 px)
    "qwen_image": PipelineFamily(
        ("QwenImagePipeline",),
        {"true_cfg_scale": 4.0},
        adapter="qwen_image",
        negative_prompt=True,
        guidance_key="true_cfg_scale",
    ),
    # pipeline_hunyuan_video1_5.py EXAMPLE_DOC_STRING (HunyuanVideo-1.5-480p_t2v):
    # `num_inference_steps=50`; num_frames 121 (signature); size from the transformer's
    # target_size; guidance is the checkpoint's guider (no call argument)
    "hunyuan_video15": PipelineFamily(
        ("HunyuanVideo15Pipeline",),
        {"num_frames": 121},
        video=True,
        adapter="hunyuan_video15",
        guidance_key=None,
    ),
    # pipeline_z_image.py: 50 steps and guidance_scale 5.0 (signature; the base model; its
    # docstring's Z-Image-Turbo call is `num_inference_steps=8, guidance_scale=0.0`, 1024 x 1024:
    # pass --steps 8 --guidance-scale 0 for Turbo); size: the pipeline's default (1024 px)
    "z_image": PipelineFamily(("ZImagePipeline",), {"guidance_scale": 5.0}, adapter="z_image"),
    # pipeline_cogvideox.py EXAMPLE_DOC_STRING (CogVideoX-2b/5b): `guidance_scale=6,
    # num_inference_steps=50`; size and frames from the transformer's config (sample_height,
    # sample_width, sample_frames), as the pipeline does
    "cogvideox": PipelineFamily(
        ("CogVideoXPipeline",), {"guidance_scale": 6.0}, video=True, adapter="cogvideox"
    ),
    # pipeline_ltx2.py EXAMPLE_DOC_STRING (Lightricks/LTX-2): `width=768, height=512,
    # num_frames=121, frame_rate=24.0, num_inference_steps=30, guidance_scale=3.0`
    "ltx2": PipelineFamily(
        ("LTX2Pipeline",),
        {"height": 512, "width": 768, "num_frames": 121, "frame_rate": 24.0, "guidance_scale": 3.0},
        video=True,
        adapter="ltx2",
        steps=30,
    ),
}


def read_prompts(path: Path) -> list[str]:
    """The prompts of a file: one per line, blank lines and ``#`` comments ignored.

    Example:
        >>> import tempfile, os
        >>> p = Path(tempfile.mkdtemp()) / "p.txt"
        >>> _ = p.write_text("# a comment\\na red fox\\n\\na blue car\\n")
        >>> read_prompts(p)
        ['a red fox', 'a blue car']
    """
    if not path.is_file():
        raise SystemExit(f"--prompts: no such file {path}")
    prompts = [ln.strip() for ln in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SystemExit(f"--prompts: {path} holds no prompt (one per line; '#' starts a comment)")
    return prompts


class RealPipelineTestbed(Testbed):
    """A checkpoint on disk as a :class:`~benchmarks.suites.Testbed`: prompts as conditions,
    images (or video frames) in ``[0, 1]`` as samples, optional prompt metrics as the sample
    quality, no real-data floors."""

    def __init__(
        self,
        family: str,
        prompts: list[str],
        *,
        device: torch.device,
        dtype: torch.dtype,
        call_kwargs: dict[str, Any],
        clip_model: Path | None = None,
        imagereward_weights: Path | None = None,
    ) -> None:
        self.family = FAMILIES[family]
        self.name = family
        self.prompts = prompts
        self.device, self.dtype = device, dtype
        self.call_kwargs = {**self.family.call, **call_kwargs}
        key = self.family.guidance_key
        self.guidance_scale = float(self.call_kwargs.get(key, 1.0)) if key else None
        self.clip_model, self.imagereward_weights = clip_model, imagereward_weights
        self.skipped: dict[str, str] = {}
        self._clip: Any = None
        self._reward: Any = None
        self._accepted: set[str] | None = None

    # ------------------------------------------------------------------ the pipeline
    def load(self, checkpoint: str | None) -> Any:
        from diffusers import DiffusionPipeline

        if not checkpoint or not (Path(checkpoint) / "model_index.json").is_file():
            raise SystemExit(
                f"--model must be a checkpoint folder (model_index.json inside); got {checkpoint!r}"
            )
        # components saved as None (model_index.json: [null, null]) are passed as None: diffusers
        # writes them so but does not load them back by itself
        index = json.loads((Path(checkpoint) / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
        pipe = DiffusionPipeline.from_pretrained(
            checkpoint, dtype=self.dtype, local_files_only=True, **absent
        )
        cls = type(pipe).__name__
        if cls not in self.family.pipeline_classes:
            raise SystemExit(
                f"--pipeline {self.name} expects {' or '.join(self.family.pipeline_classes)}; "
                f"{checkpoint} holds a {cls}"
            )
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.checkpoint_note = str(checkpoint)
        self._accepted = set(inspect.signature(pipe.__call__).parameters)
        return pipe

    def conditions(self, n: int) -> list[Any]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def generate(self, pipe: Any, conditions: list[Any], steps: int, seed: int) -> torch.Tensor:
        kwargs = {k: v for k, v in self.call_kwargs.items() if self._accepted is None or k in self._accepted}
        if self.family.negative_prompt and "negative_prompt" not in kwargs:
            kwargs["negative_prompt"] = [""] * len(conditions)
        out = pipe(
            prompt=list(conditions),
            num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed),  # CPU: the same noise on any device
            output_type="pt",
            **kwargs,
        )
        if self.family.video:
            frames = out.frames
            x = (
                frames
                if isinstance(frames, torch.Tensor)
                else torch.stack([torch.as_tensor(f) for f in frames])
            )
            x = x.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W), the runner's video layout
        else:
            x = out.images
        return x.float().clamp(0, 1).cpu()

    def as_images(self, samples: torch.Tensor) -> torch.Tensor:
        if samples.ndim == 5:  # per frame, as the video papers report PSNR
            return samples.permute(0, 2, 1, 3, 4).reshape(-1, *samples.shape[1:2], *samples.shape[3:])
        return samples

    # ------------------------------------------------------------------ metrics
    def sample_quality(self, images: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        score = self._clip_score(images, conditions)
        if score is not None:
            out["clip_score"] = score
        reward = self._image_reward(images, conditions)
        if reward is not None:
            out["image_reward"] = reward
        return out

    def _frames_per_sample(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        frames = self.as_images(images)
        return frames, frames.shape[0] // images.shape[0]

    def _clip_score(self, images: torch.Tensor, prompts: list[Any]) -> float | None:
        """torchmetrics' CLIP score (100 x max(cos, 0), averaged) with a local CLIP model."""
        if self.clip_model is None:
            self.skipped["clip_score"] = "--clip-model not given (CLIP weights are never downloaded)"
            return None
        if self._clip is None:
            from transformers import CLIPModel, CLIPProcessor

            if not self.clip_model.is_dir():
                raise SystemExit(f"--clip-model must be a local CLIP folder; got {self.clip_model}")
            model = CLIPModel.from_pretrained(self.clip_model, local_files_only=True).eval()
            self._clip = (model, CLIPProcessor.from_pretrained(self.clip_model, local_files_only=True))
        model, proc = self._clip
        frames, per = self._frames_per_sample(images)
        texts = [p for p in prompts for _ in range(per)]
        scores = []
        with torch.no_grad():
            for i in range(0, len(frames), 16):
                batch = [
                    (f * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for f in frames[i : i + 16]
                ]
                inp = proc(
                    text=texts[i : i + 16], images=batch, return_tensors="pt", padding=True, truncation=True
                )
                img = model.get_image_features(pixel_values=inp["pixel_values"])
                txt = model.get_text_features(
                    input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]
                )
                img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
                txt = getattr(txt, "pooler_output", txt)
                cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
                scores.append(100 * cos.clamp_min(0))
        return float(torch.cat(scores).mean())

    def _image_reward(self, images: torch.Tensor, prompts: list[Any]) -> float | None:
        if self.imagereward_weights is None:
            self.skipped["image_reward"] = "--imagereward-weights not given (weights are never downloaded)"
            return None
        if self._reward is None:
            try:
                import ImageReward as reward_lib  # the image-reward package
            except ImportError:
                self.skipped["image_reward"] = (
                    "the image-reward package is not installed (pip install image-reward)"
                )
                return None
            self._reward = reward_lib.load(str(self.imagereward_weights), device=str(self.device))
        from PIL import Image

        frames, per = self._frames_per_sample(images)
        vals = []
        for i, f in enumerate(frames):
            pil = Image.fromarray((f * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            vals.append(float(self._reward.score(prompts[i // per], pil)))
        return sum(vals) / len(vals)

    def floors(self, n: int, seed: int = 0) -> dict[str, float]:
        return {}  # no real data: the reference is the full computation

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint_note,
            "guidance_scale": self.guidance_scale,
            "call": {k: v for k, v in self.call_kwargs.items()},
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "prompts": len(self.prompts),
        }


def lpips_vs_reference(
    images: dict[str, torch.Tensor], ref_name: str, weights: Path | None, as_images: Any
) -> tuple[dict[str, float], str | None]:
    """LPIPS of every method's samples against the reference's, or ``({}, why skipped)``."""
    if weights is None:
        return {}, "--lpips-weights not given (LPIPS weights are never downloaded)"
    try:
        import lpips
    except ImportError:
        return {}, "the lpips package is not installed (pip install lpips)"
    if not weights.is_file():
        raise SystemExit(
            f"--lpips-weights must be a state-dict file of lpips.LPIPS(net='alex'); got {weights}"
        )
    # pnet_rand: build the backbone without torchvision's download; the file holds every weight
    net = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    net.eval()
    ref = as_images(images[ref_name])
    out = {}
    with torch.no_grad():
        for name, imgs in images.items():
            x = as_images(imgs)
            out[name] = float(net(x * 2 - 1, ref * 2 - 1).mean())
    return out, None


def real_methods(steps: int, family: str) -> list[Method]:
    """The default set on a real checkpoint: the reference, half the steps, X-Slim's published
    presets of the family (with their published block thresholds: the real model is what they
    were tuned on), two online settings, and the peers at their published settings."""
    from xslim_xdit import PRESETS, XSlimConfig

    ms: list[Method] = [Method(), FewerSteps(2)]
    for name in sorted(PRESETS):
        if name.startswith(family + "-"):
            m = XSlim(f"X-Slim preset {name}", "xslim-preset", XSlimConfig.from_preset(name), preset=name)
            m.note = f"published 50-step schedule (rescaled to {steps} steps), published block thresholds"
            ms.append(m)
    ms.append(XSlim("X-Slim default config", "xslim-default", XSlimConfig()))
    ms.append(
        XSlim("X-Slim +token 0.12/0.35", "xslim-token", XSlimConfig(warn=0.12, crit=0.35, polish="token"))
    )
    ms += [FirstBlockCache(0.1), TaylorSeer(3, 1), TeaCache(0.6), DBCache()]
    return ms


def candidate_methods(steps: int, family: str) -> list[Method]:
    """What ``--methods`` chooses from on a real checkpoint: the default set, then every method
    of the testbed benchmark not already named there."""
    ms = real_methods(steps, family)
    names = {m.name for m in ms}
    return ms + [m for m in full_methods(steps) if m.name not in names]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The real-checkpoint flags of ``benchmarks.run``."""
    g = p.add_argument_group("real checkpoints (--pipeline)")
    g.add_argument(
        "--pipeline", choices=sorted(FAMILIES), default=None, help="run a checkpoint of this family"
    )
    g.add_argument("--model", default=None, help="checkpoint folder (DiffusionPipeline.from_pretrained)")
    g.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="prompt file, one per line (default: benchmarks/prompts/real_prompts.txt)",
    )
    g.add_argument("--height", type=int, default=None, help="output height in pixels (default: the family's)")
    g.add_argument("--width", type=int, default=None, help="output width in pixels (default: the family's)")
    g.add_argument("--num-frames", type=int, default=None, help="video frames (default: the family's)")
    g.add_argument("--guidance-scale", type=float, default=None, help="guidance (default: the family's)")
    g.add_argument("--call-kwargs", default=None, help="more pipeline call kwargs, as JSON")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda[:N]'")
    g.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    g.add_argument(
        "--lpips-weights", type=Path, default=None, help="state dict of lpips.LPIPS(net='alex') (optional)"
    )
    g.add_argument(
        "--clip-model", type=Path, default=None, help="local CLIPModel folder for CLIP score (optional)"
    )
    g.add_argument(
        "--imagereward-weights", type=Path, default=None, help="local ImageReward checkpoint (optional)"
    )


DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "real_prompts.txt"


def main_real(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``benchmarks.run --pipeline``: the runner on a checkpoint; writes ``results.json`` and
    ``report.md`` into ``--out`` and prints the table."""
    import sys

    from benchmarks.run import _machine, _matches, dump_json, format_table, load_line, run_testbed

    if args.model is None:
        raise SystemExit("--pipeline needs --model PATH (a checkpoint folder)")
    family = args.pipeline
    for flag, v, lo in (
        ("--height", args.height, 16),
        ("--width", args.width, 16),
        ("--num-frames", args.num_frames, 1),
    ):
        if v is not None and v < lo:
            raise SystemExit(f"{flag} must be an integer >= {lo}; got {v}")
    call: dict[str, Any] = {}
    if args.call_kwargs:
        try:
            call = json.loads(args.call_kwargs)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--call-kwargs must be a JSON object; {e}") from None
        if not isinstance(call, dict):
            raise SystemExit(f"--call-kwargs must be a JSON object; got {args.call_kwargs!r}")
    guidance_key = FAMILIES[family].guidance_key
    if args.guidance_scale is not None and guidance_key is None:
        raise SystemExit(
            f"--guidance-scale: the {family} pipeline takes no guidance argument (its checkpoint's "
            "guider sets it: guider/config.json)"
        )
    for key, v in (
        ("height", args.height),
        ("width", args.width),
        ("num_frames", args.num_frames),
        (guidance_key or "guidance_scale", args.guidance_scale),
    ):
        if v is not None:
            call[key] = v
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise SystemExit(f"--device must be 'auto', 'cpu' or 'cuda[:N]'; got {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    prompts = read_prompts(args.prompts or DEFAULT_PROMPTS)
    steps = args.steps or (20 if args.quick else FAMILIES[family].steps)
    samples = args.samples or len(prompts)
    repeats = args.repeats or (2 if args.quick else 3)
    batch = args.batch_size or 1  # one prompt per call: real models fill a GPU with one sample
    timing = min(samples, args.timing_samples or 1)
    testbed = RealPipelineTestbed(
        family,
        prompts,
        device=device,
        dtype=dtype,
        call_kwargs=call,
        clip_model=args.clip_model,
        imagereward_weights=args.imagereward_weights,
    )
    if args.no_progress:  # the loaders' own bars too (diffusers' components, transformers' weights)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = testbed.load(args.model)
    methods = candidate_methods(steps, family)
    if args.methods:
        keys = [k.strip() for k in args.methods.split(",") if k.strip()]
        methods = [m for i, m in enumerate(methods) if i == 0 or any(_matches(k, m.name) for k in keys)]
    else:
        methods = real_methods(steps, family)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tb = run_testbed(
        testbed,
        pipe,
        methods,
        steps=steps,
        samples=samples,
        batch_size=batch,
        timing_samples=timing,
        repeats=repeats,
        seed=args.seed,
        progress=not args.no_progress,
    )
    images = tb.pop("_images")
    ref = next(iter(tb["methods"]))
    lp, why = lpips_vs_reference(images, ref, args.lpips_weights, testbed.as_images)
    for name, v in lp.items():
        tb["methods"][name]["lpips"] = v
    skipped = dict(testbed.skipped)
    if why:
        skipped["lpips"] = why
    tb["skipped_metrics"] = skipped
    results = {
        "meta": {
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mode": "real checkpoint",
            "pipeline": family,
            "model": str(args.model),
            "steps": steps,
            "samples": samples,
            "batch_size": batch,
            "timing_samples": timing,
            "repeats": repeats,
            "seed": args.seed,
            "machine": _machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": time.perf_counter() - t0,
            "parallel": "one process, one device (xDiT multi-GPU layouts are not run by this command)",
        },
        "testbeds": {family: tb},
    }
    dump_json(results, out_dir / "results.json")
    rows = real_rows(tb)
    table = format_table(rows, REAL_HEADER)
    lines = [
        f"== {family}: {args.model}, {steps} steps, {samples} prompts, {repeats} timing repeats ==",
        table,
    ]
    lines += [f"{m} skipped: {why}" for m, why in skipped.items()]
    lines.append(load_line(tb))
    lines += [f"refused: {m}: {r['reason']}" for m, r in tb["refused"].items()]
    lines.append(f"plain pipeline restored bit-identically after all methods: {tb['restored_bit_identical']}")
    text = "\n".join(lines)
    (out_dir / "report.md").write_text(f"# Real checkpoint benchmark\n\n```\n{text}\n```\n")
    print(text)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'report.md'}")
    return 0


REAL_HEADER = ["method", "steps", "speedup", "FLOPs", "X-Slim FLOPs", "PSNR", "SSIM", "LPIPS", "CLIP", "IR"]


def real_rows(tb: dict[str, Any]) -> list[list[str]]:
    """Rows of the printed table of a real checkpoint."""

    def f(v: Any, fmt: str) -> str:
        if v is None:
            return "-"
        if v == "inf" or (isinstance(v, float) and v == float("inf")):
            return "inf"
        return format(v, fmt)

    return [
        [
            name,
            str(e["steps"]),
            f(e.get("speedup"), ".2f") + "x",
            f(e.get("flops_fraction"), ".3f"),
            f(e.get("xslim_flops_fraction"), ".3f"),
            f(e.get("psnr"), ".2f"),
            f(e.get("ssim"), ".3f"),
            f(e.get("lpips"), ".3f"),
            f(e.get("clip_score"), ".2f"),
            f(e.get("image_reward"), ".3f"),
        ]
        for name, e in tb["methods"].items()
    ]
