"""FLUX Kontext (``FluxKontextPipeline``, issue 10 point 3): the reference image enters the
transformer as extra image tokens after the latent tokens (position id 1 on their first axis), and
the pipeline keeps the output for the latent tokens only. X-Slim caches the whole image stream (a
skipped step reuses the reference tokens' residual too, whose output is discarded); token refresh
selects among the output tokens only and leaves the reference tokens with the K/V of the last
full step."""

from __future__ import annotations

import math

import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters.flux import FluxAdapter
from xslim_xdit.observers import EngineObserver
from xslim_xdit.testing import pipelines as tiny_pipelines

STEPS = 10
PX = 64  # 64 px: 16 latent tokens and 16 reference tokens


def _pipeline():
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**tiny_pipelines.tiny_pipeline("flux").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, seed: int = 0) -> torch.Tensor:
    image = torch.rand(1, 3, PX, PX, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return pipe(
            image=image,
            prompt="a cat",
            num_inference_steps=STEPS,
            height=PX,
            width=PX,
            max_area=PX * PX,
            _auto_resize=False,
            guidance_scale=2.5,
            max_sequence_length=8,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images


class _TokenIndex(EngineObserver):
    """The image-token positions each token step refreshed, and the image tokens of each call."""

    def __init__(self) -> None:
        self.index: list[torch.Tensor] = []
        self.tokens: list[int] = []

    def on_call_end(self, engine, record) -> None:
        self.tokens.append(engine.tally.rows_full)
        if engine.plan.token_index is not None:
            self.index.append(engine.plan.token_index)


def test_forced_full_is_the_plain_pipeline():
    pipe = _pipeline()
    plain = _run(pipe)
    seen = _TokenIndex()
    enable_xslim(pipe, XSlimConfig(warmup_steps=STEPS), observers=[seen])
    forced = _run(pipe)
    disable_xslim(pipe)
    assert torch.equal(forced, plain)
    assert plain.shape[1] == 16 and set(seen.tokens) == {32}  # 16 latent + 16 reference tokens


def test_token_refresh_selects_output_tokens_only(monkeypatch):
    pipe = _pipeline()
    plain = _run(pipe)
    sched = Schedule(STEPS, (0, 1, 5, 9), token_steps=(2, 3, 4, 6, 7, 8))

    def cached(ratio: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen = _TokenIndex()
        engine = enable_xslim(
            pipe, XSlimConfig(mode="schedule", schedule=sched, token_ratio=ratio), observers=[seen]
        )
        out = _run(pipe)
        assert engine.statistics.summary()["token"] == len(sched.token_steps)
        disable_xslim(pipe)
        return out, seen.index

    out, index = cached(0.65)
    assert index and all(int(i.max()) < 16 and i.shape[1] == math.ceil(0.65 * 16) for i in index)
    # the control: the reference tokens treated as output tokens, as many tokens refreshed
    monkeypatch.setattr(FluxAdapter, "reference_tokens", lambda self, model, args, kwargs: None)
    out_all, index_all = cached(0.33)
    assert all(i.shape[1] == math.ceil(0.33 * 32) == 11 for i in index_all)
    assert any(int(i.max()) >= 16 for i in index_all)  # it did spend refreshes on reference tokens
    err, err_all = (out - plain).abs().mean().item(), (out_all - plain).abs().mean().item()
    assert err < 0.75 * err_all, (err, err_all)  # measured 0.0033 against 0.0059
