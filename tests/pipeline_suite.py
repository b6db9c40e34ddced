"""The checks every diffusers pipeline of a family passes with X-Slim enabled on the pipeline
(``enable_xslim(pipe, config)``), on tiny random components, with the pipeline's own guidance:

- enabling, running with reuse, then disabling gives the plain pipeline's output bit for bit and
  leaves the transformers (block attributes, processors, hooks) and the scheduler as they were;
- a forced-full configuration is bit-identical to the plain pipeline, every call in full, the
  calls counted as the pipeline makes them (steps x guidance branches);
- a schedule with full, block, token and skip steps runs each level in every branch, as
  counted by attention hooks of the test's own (``AttentionCounter``, not the engine's
  statistics), computes fewer query rows and FLOPs, and stays close to the plain output.

A pipeline test subclasses :class:`PipelineTesterMixin` and says how to build the pipeline
(``build``: the pipeline and the keyword arguments of one call) and how its calls look.
"""

from __future__ import annotations

from typing import Any

import torch
from _helpers import AttentionCounter
from family_suite import _restorable_state

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim, get_engines

#: forced full where every level is offered (SD3.5 Medium refuses token refresh only when it runs)
FORCED_FULL = XSlimConfig(warn=1e-12, crit=2e-12, polish="auto")


def outputs(result: Any) -> tuple[torch.Tensor, ...]:
    """The tensors a pipeline returned (latent output): images, or frames (and audio)."""
    names = [n for n in ("images", "frames", "audio") if getattr(result, n, None) is not None]
    return tuple(getattr(result, n) for n in names)


def pipeline_state(pipe: Any) -> list[Any]:
    """What X-Slim may change on a pipeline and must give back: each transformer's restorable
    state, the scheduler's and the pipeline's instance attributes."""
    state: list[Any] = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            state.append(_restorable_state(model))
    state.append(sorted(vars(pipe.scheduler)))
    state.append(sorted(vars(pipe)))
    return state


class PipelineTesterMixin:
    """Subclasses set ``build`` and the class attributes below."""

    steps = 6
    #: transformer calls per step (guidance as separate calls)
    branches = 1
    #: the polish the family serves ("auto": block and token; "block" where token is refused)
    polish = "auto"
    #: bound on the relative error (L2) of the every-level schedule against the plain pipeline
    relative_error = 0.1

    def build(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def call(self, pipe: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """One call of the pipeline, its generator reseeded (each call draws the same noise)."""
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return outputs(pipe(num_inference_steps=self.steps, **kwargs))

    def run(
        self, config: XSlimConfig | None = None
    ) -> tuple[tuple[torch.Tensor, ...], Any, AttentionCounter]:
        pipe, kwargs = self.build()
        counter = AttentionCounter(pipe.transformer)
        engine = enable_xslim(pipe, config) if config is not None else None
        try:
            out = self.call(pipe, kwargs)
        finally:
            if engine is not None:
                disable_xslim(pipe)
            counter.remove()
        return out, engine, counter

    @property
    def level_kinds(self) -> list[str]:
        """The kinds of :meth:`test_every_level_runs_and_stays_close`'s schedule, per step."""
        token = "token" if self.polish == "auto" else "skip"
        return ["full", "full", "block", token, "skip", "full"]

    # ------------------------------------------------------------------ the suite
    def test_disabled_is_bit_identical_and_leaves_the_pipeline_as_it_was(self):
        pipe, kwargs = self.build()
        ref = self.call(pipe, kwargs)
        before = pipeline_state(pipe)  # after a call: the pipeline keeps attributes of its last call
        engine = enable_xslim(pipe, XSlimConfig(warn=0.5, crit=1.0, polish=self.polish, warmup_steps=1))
        assert pipeline_state(pipe) != before  # attached
        cached = self.call(pipe, kwargs)
        kinds = engine.statistics.summary()["kinds"]
        disable_xslim(pipe)
        assert set(kinds) - {"full"}, "something was reused"
        assert any(not torch.equal(c, r) for c, r in zip(cached, ref, strict=True))
        assert pipeline_state(pipe) == before and get_engines(pipe) == {}
        again = self.call(pipe, kwargs)
        assert all(torch.equal(a, r) for a, r in zip(again, ref, strict=True))

    def test_forced_full_is_bit_identical(self):
        ref, _, ref_counter = self.run()
        out, engine, counter = self.run(XSlimConfig(warn=1e-12, crit=2e-12, polish=self.polish))
        assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
        assert counter.calls == ref_counter.calls  # the same blocks and query rows ran
        recs = engine.statistics.run_records()
        assert [(r.step, r.branch) for r in recs] == [
            (s, b) for s in range(self.steps) for b in range(self.branches)
        ]
        assert {r.kind for r in recs} == {"full"}

    def test_every_level_runs_and_stays_close(self):
        ref, _, ref_counter = self.run()
        kinds = self.level_kinds
        schedule = Schedule(
            self.steps,
            full_steps=tuple(i for i, k in enumerate(kinds) if k == "full"),
            block_steps=tuple(i for i, k in enumerate(kinds) if k == "block"),
            token_steps=tuple(i for i, k in enumerate(kinds) if k == "token"),
        )
        config = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5, block_thresh=2.0)
        out, engine, counter = self.run(config)
        recs = engine.statistics.run_records()
        assert [r.kind for r in recs] == [k for k in kinds for _ in range(self.branches)]
        # what really ran, counted by the test's own hooks, is what the statistics say
        assert counter.blocks_per_call() == [r.blocks_computed for r in recs]
        nb = counter.num_blocks
        full_rows = ref_counter.rows_per_call()
        for i, r in enumerate(recs):
            ran, rows = counter.blocks_per_call()[i], counter.rows_per_call()[i]
            if r.kind == "full":
                assert ran == nb and rows == full_rows[i]
            elif r.kind == "skip":
                assert ran == 0
            elif r.kind == "block":
                assert 0 < ran < nb and sum(r.blocks_mask) == ran
            else:  # token: every block, fewer query rows
                assert ran == nb and 0 < rows < full_rows[i] and r.token_count > 0
            assert r.flops <= r.flops_full
        assert engine.statistics.summary()["flops_fraction"] < 0.9
        assert all(o.shape == r.shape and torch.isfinite(o).all() for o, r in zip(out, ref, strict=True))
        errors = [
            float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r))
            for o, r in zip(out, ref, strict=True)
        ]
        assert max(errors) < self.relative_error, errors
        assert any(not torch.equal(o, r) for o, r in zip(out, ref, strict=True))
