"""``QwenImageEditPipeline`` with X-Slim enabled on the pipeline: true CFG as two transformer
calls per step (``cache_context("cond")`` / ``("uncond")``: two branches), the reference image's
tokens after the noisy ones in ``hidden_states``, always computed fresh: the token level selects
among the noisy image tokens only (:mod:`xslim_xdit.testing.edit_pipelines`)."""

from __future__ import annotations

import torch
from pipeline_suite import PipelineTesterMixin, outputs

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing.edit_pipelines import reference_area, tiny_qwen_edit_pipeline

NOISY, REFERENCE = 16, 16  # image tokens of the tiny call (64 x 64 px each)


class TestQwenImageEditPipeline(PipelineTesterMixin):
    branches = 2

    def build(self):
        return tiny_qwen_edit_pipeline()

    def call(self, pipe, kwargs):
        with reference_area(64 * 64):
            return super().call(pipe, kwargs)


def test_reference_tokens_are_always_fresh_and_never_selected():
    """Per self-attention call, the rows it receives as image queries and as text: a full step
    passes the noisy then the reference tokens as image rows; a token step the selected half of
    the noisy tokens, then every reference token (recomputed; the token level selects among the
    noisy ones only), with the whole text (6 tokens for the prompt, 5 for the negative prompt)."""
    pipe, kwargs = tiny_qwen_edit_pipeline()
    rows: list[tuple[int, int]] = []
    handles = [
        blk.attn.register_forward_pre_hook(
            lambda _m, _a, kw: rows.append(
                (kw["hidden_states"].shape[1], kw["encoder_hidden_states"].shape[1])
            ),
            with_kwargs=True,
        )
        for blk in pipe.transformer.transformer_blocks
    ]
    schedule = Schedule(4, full_steps=(0, 1, 3), token_steps=(2,))
    engine = enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5))
    with reference_area(64 * 64), torch.no_grad():
        outputs(pipe(num_inference_steps=4, **kwargs))
    disable_xslim(pipe)
    for h in handles:
        h.remove()
    recs = engine.statistics.run_records()
    assert [(r.step, r.branch, r.kind) for r in recs if r.step == 2] == [(2, 0, "token"), (2, 1, "token")]
    assert all(r.token_count == NOISY // 2 for r in recs if r.kind == "token")
    nb = len(pipe.transformer.transformer_blocks)
    per_call = [rows[i : i + nb] for i in range(0, len(rows), nb)]
    assert len(per_call) == 4 * 2
    for call, r in zip(per_call, recs, strict=True):
        if r.kind == "full":
            assert set(call) == {(NOISY + REFERENCE, 6 if r.branch == 0 else 5)}
        else:
            assert set(call) == {(NOISY // 2 + REFERENCE, 6 if r.branch == 0 else 5)}
