"""LTX-2's audio stream (the blocks' second stream, an output of the model): skip steps move it
along its own cached stack residual. Without that, a skip would hand the audio tokens to the
output layers as they entered the blocks, and the audio prediction of every skipped step would
be lost."""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters.ltx2 import _AUDIO_TOKENS, LTX2Adapter
from xslim_xdit.testing import sample, tiny_model

STEPS = 8


def _errors(model, ref: torch.Tensor) -> tuple[float, float]:
    """Relative L1 error of the video and of the audio tokens after a run skipping steps 2, 4, 6."""
    schedule = Schedule(STEPS, full_steps=(0, 1, 3, 5, 7))
    eng = enable_xslim(model, XSlimConfig(mode="schedule", schedule=schedule), num_inference_steps=STEPS)
    out = sample(model, "ltx2", steps=STEPS, batch=2)
    disable_xslim(model)
    assert eng.statistics.summary()["skip"] == 3

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().mean() / b.abs().mean())

    n = ref.shape[1] - _AUDIO_TOKENS
    return err(out[:, :n], ref[:, :n]), err(out[:, n:], ref[:, n:])


def test_skip_steps_estimate_the_audio_stream(monkeypatch):
    model = tiny_model("ltx2")
    ref = sample(model, "ltx2", steps=STEPS, batch=2)
    video, audio = _errors(model, ref)
    monkeypatch.setattr(LTX2Adapter, "text_output_used", False)  # audio passes skips unchanged
    video_without, audio_without = _errors(model, ref)
    # measured: audio 0.004 against 0.26; the video, which attends to the audio, 0.010 against 0.085
    assert audio < 0.1 * audio_without, (audio, audio_without)
    assert video < 0.5 * video_without, (video, video_without)


def test_per_sample_is_refused_before_anything_is_attached():
    """Per-sample skips estimate the image stream only; on LTX-2 they would drop the audio's
    change silently, so the config is refused up front and the model is left as it was."""
    import pytest

    from xslim_xdit import ConfigError

    model = tiny_model("ltx2")
    ref = sample(model, "ltx2", steps=STEPS, batch=2)
    hooks = [len(blk._forward_pre_hooks) + len(blk._forward_hooks) for blk in model.transformer_blocks]
    with pytest.raises(ConfigError, match="family 'ltx2': per_sample=True is not supported"):
        enable_xslim(model, XSlimConfig(per_sample=True), num_inference_steps=STEPS)
    assert [
        len(blk._forward_pre_hooks) + len(blk._forward_hooks) for blk in model.transformer_blocks
    ] == hooks
    torch.testing.assert_close(sample(model, "ltx2", steps=STEPS, batch=2), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Token refresh: the selected video tokens recompute, wherever attention reads video tokens as
# keys and values (video self-attention, video-to-audio cross-attention) the selected rows are
# spliced into a per-block K/V cache of every video token, and the audio stream stays fresh.

FORCED_FULL = XSlimConfig(warn=1e-12, crit=2e-12, polish="auto")
TOKEN_SCHEDULE = Schedule(STEPS, full_steps=(0, 1, 4, 7), token_steps=(2, 3, 5, 6))


class RowCounter:
    """Per transformer call, the rows each attention of every block was called with (queries, and
    key/value rows where they differ), counted with forward pre-hooks on the attention modules:
    independent of the engine and of its processors."""

    NAMES = ("attn1", "attn2", "audio_attn1", "audio_to_video_attn", "video_to_audio_attn")

    def __init__(self, model) -> None:
        self.calls: list[dict[str, int]] = []
        self.handles = [model.register_forward_pre_hook(lambda *_: self.calls.append({}))]
        for blk in model.transformer_blocks:
            for name in self.NAMES:
                self.handles.append(
                    getattr(blk, name).register_forward_pre_hook(self._hook(name), with_kwargs=True)
                )

    def _hook(self, name):
        def hook(_mod, args, kwargs):
            q = args[0] if args else kwargs["hidden_states"]
            kv = kwargs.get("encoder_hidden_states")
            row = self.calls[-1]
            row[name] = row.get(name, 0) + q.shape[0] * q.shape[1]
            if kv is not None:
                row[name + ".kv"] = row.get(name + ".kv", 0) + kv.shape[0] * kv.shape[1]

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _video_tokens(model) -> int:
    x, cond = LTX2Adapter().tiny_inputs(batch=1)
    return x.shape[1] - cond["audio_num_frames"]


def test_token_level_forced_full_is_bit_identical_and_disable_restores():
    model = tiny_model("ltx2")
    ref = sample(model, "ltx2", steps=STEPS, batch=2)
    processors = [
        (b.attn1.processor, b.video_to_audio_attn.processor, b.audio_to_video_attn.processor)
        for b in model.transformer_blocks
    ]
    eng = enable_xslim(model, FORCED_FULL, num_inference_steps=STEPS)
    assert eng.use_token
    installed = [type(b.video_to_audio_attn.processor).__name__ for b in model.transformer_blocks]
    out = sample(model, "ltx2", steps=STEPS, batch=2)
    disable_xslim(model)
    assert installed == ["LTX2TokenProcessor"] * len(model.transformer_blocks)
    assert eng.statistics.summary()["full"] == STEPS
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert [
        (b.attn1.processor, b.video_to_audio_attn.processor, b.audio_to_video_attn.processor)
        for b in model.transformer_blocks
    ] == processors
    torch.testing.assert_close(sample(model, "ltx2", steps=STEPS, batch=2), ref, rtol=0, atol=0)


def _run(model, config, steps=STEPS):
    counter = RowCounter(model)
    eng = enable_xslim(model, config, num_inference_steps=steps)
    out = sample(model, "ltx2", steps=steps, batch=2)
    disable_xslim(model)
    counter.remove()
    return out, eng.statistics.run_records(), counter.calls


def test_token_steps_compute_the_selected_video_rows_and_every_audio_row():
    model = tiny_model("ltx2")
    ref = sample(model, "ltx2", steps=STEPS, batch=2)
    nb, nv, na, batch = len(model.transformer_blocks), _video_tokens(model), _AUDIO_TOKENS, 2
    cfg = XSlimConfig(mode="schedule", schedule=TOKEN_SCHEDULE, token_ratio=0.25)
    out, records, calls = _run(model, cfg)
    kinds = [r.kind for r in records]
    assert kinds == [TOKEN_SCHEDULE.kind_of(i) for i in range(STEPS)]
    sel = batch * nv // 4
    for rec, rows in zip(records, calls, strict=True):
        video = batch * nv if rec.kind == "full" else sel
        # video queries: the selected rows only (self-attention, text and audio cross-attention)
        assert rows["attn1"] == rows["attn2"] == rows["audio_to_video_attn"] == nb * video, (rec.kind, rows)
        # video-to-audio: audio queries for every audio token, the selected video rows' fresh K/V
        assert rows["video_to_audio_attn"] == nb * batch * na
        assert rows["video_to_audio_attn.kv"] == nb * video
        assert rows["audio_attn1"] == nb * batch * na  # the audio stream is fully fresh
        assert rec.tokens_computed == nb * video and rec.token_count == (
            nv // 4 if rec.kind == "token" else 0
        )
    # the decisions are logged: token steps with their token count
    assert [r.token_count for r in records if r.kind == "token"] == [nv // 4] * 4
    # close to the full computation, and closer than skipping those steps
    skips = XSlimConfig(mode="schedule", schedule=Schedule(STEPS, full_steps=TOKEN_SCHEDULE.full_steps))
    skipped, _, _ = _run(model, skips)

    def err(a, part):
        return float((a[:, part] - ref[:, part]).norm() / ref[:, part].norm())

    video, audio = slice(0, nv), slice(nv, None)
    # measured: video 0.019 against 0.021 for skips, audio 0.007 against 0.031 (the audio is
    # computed in full on token steps, reading the spliced video K/V)
    assert 0 < err(out, video) < err(skipped, video) and err(out, video) < 0.05
    assert 0 < err(out, audio) < 0.5 * err(skipped, audio)


def test_token_refresh_reads_every_video_token_through_the_kv_cache():
    """The spliced caches carry the unselected tokens: with them replaced by zeros, a token step's
    audio changes (the audio's video-to-audio attention reads every video token's K/V)."""
    model = tiny_model("ltx2")
    cfg = XSlimConfig(
        mode="schedule", schedule=Schedule(4, full_steps=(0, 1, 3), token_steps=(2,)), token_ratio=0.25
    )
    out, _, _ = _run(model, cfg, steps=4)
    eng = enable_xslim(model, cfg, num_inference_steps=4)
    blk = model.transformer_blocks[0]

    def zero_cache(i, _x):
        if i == 1:  # after step 1's full call: blank every video token's cached keys in block 0
            for (_branch, key), pair in eng.token_ctx.kv.items():
                if key == id(blk.video_to_audio_attn):
                    pair[0] = torch.zeros_like(pair[0])

    zeroed = sample_with_callback(model, 4, zero_cache)
    disable_xslim(model)
    n = out.shape[1] - _AUDIO_TOKENS
    assert not torch.equal(zeroed[:, n:], out[:, n:])


def sample_with_callback(model, steps, callback):
    from xslim_xdit.testing import denoise

    x, cond = LTX2Adapter().tiny_inputs(batch=2)
    return denoise(model, "ltx2", x, cond, steps, callback)


def test_online_token_decisions_on_ltx2():
    model = tiny_model("ltx2")
    ref = sample(model, "ltx2", steps=STEPS, batch=2)
    out, records, calls = _run(
        model, XSlimConfig(warn=0.3, crit=10.0, polish="token", warmup_steps=2, token_ratio=0.5)
    )
    kinds = [r.kind for r in records]
    assert "token" in kinds and kinds[-1] == "full"
    for rec, rows in zip(records, calls, strict=True):
        if rec.kind == "token":
            assert rows["attn1"] < rows["audio_attn1"] * 0 + len(
                model.transformer_blocks
            ) * 2 * _video_tokens(model)
            assert rec.reason
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_per_token_timesteps_follow_the_selected_tokens():
    """A timestep per video token (LTX-2's conditioning pipelines: conditioning frames at 0): the
    per-token modulation is gathered for the selected rows; at ratio 1 a token step is the full
    computation."""
    model = tiny_model("ltx2")
    adapter = LTX2Adapter()
    x, cond = adapter.tiny_inputs(batch=2)
    n = x.shape[1] - cond["audio_num_frames"]
    steps = 4

    def loop():
        y = x.clone()
        for t in adapter.timesteps(steps):
            tt = torch.full((2, n), float(t))
            tt[:, : n // 2] = 0.0  # the first frame's tokens: a conditioning frame
            video, audio = model(
                hidden_states=y[:, :n], audio_hidden_states=y[:, n:], timestep=tt,
                audio_timestep=torch.full((2,), float(t)), return_dict=False, **cond,
            )  # fmt: skip
            y = y - (1.0 / steps) * torch.cat([video, audio], 1)
        return y

    with torch.no_grad():
        ref = loop()
        schedule = Schedule(steps, full_steps=(0, 1, 3), token_steps=(2,))
        eng = enable_xslim(
            model, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=1.0), num_inference_steps=steps
        )
        same = loop()
        kinds = [r.kind for r in eng.statistics.run_records()]
        disable_xslim(model)
        enable_xslim(
            model, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5), num_inference_steps=steps
        )
        half = loop()
        disable_xslim(model)
    assert kinds == ["full", "full", "token", "full"]
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-5)
    assert 0 < float((half - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize(
    "overrides, extra",
    [
        ({"rope_type": "split"}, {}),
        ({"gated_attn": True, "audio_gated_attn": True}, {}),
        # spatio-temporal guidance in block 1: the first sample perturbed (value projection), the
        # second not (lerp by the mask); then every sample perturbed
        ({"perturbed_attn": True}, {"spatio_temporal_guidance_blocks": [1], "perturbation_mask": [0.0, 1.0]}),
        ({"perturbed_attn": True}, {"spatio_temporal_guidance_blocks": [1, 2]}),
    ],
    ids=["split_rope", "gated", "stg_mask", "stg_all"],
)
def test_token_refresh_at_ratio_one_equals_full_on_ltx2_variants(overrides, extra):
    from xslim_xdit.testing import denoise

    model = tiny_model("ltx2", **overrides)
    x, cond = LTX2Adapter().tiny_inputs(batch=2)
    cond = dict(cond, **extra)
    if "perturbation_mask" in cond:
        cond["perturbation_mask"] = torch.tensor(cond["perturbation_mask"])
    steps = 5
    ref = denoise(model, "ltx2", x, cond, steps)
    schedule = Schedule(steps, full_steps=(0, 1, 4), token_steps=(2, 3))
    outs = {}
    for ratio in (1.0, 0.5):
        eng = enable_xslim(
            model,
            XSlimConfig(mode="schedule", schedule=schedule, token_ratio=ratio),
            num_inference_steps=steps,
        )
        outs[ratio] = denoise(model, "ltx2", x, cond, steps)
        disable_xslim(model)
        assert [r.kind for r in eng.statistics.run_records()] == ["full", "full", "token", "token", "full"]
    torch.testing.assert_close(outs[1.0], ref, rtol=0, atol=1e-5)
    assert 0 < float((outs[0.5] - ref).norm() / ref.norm()) < 0.05
