"""Requests that end early (issue 10, point 8): the next run starts clean.

Each check ends a run early (an exception or a ``KeyboardInterrupt`` from a callback, from a hook
on the transformer or inside its forward, ``pipe._interrupt``, a bare transformer's run abandoned
after k calls), then runs normally, and compares that run with the same run on a fresh engine (a
fresh pipeline or model with the same weights, X-Slim freshly enabled): the output bit for bit,
the decision log, and every statistics record (kinds, blocks, tokens, FLOPs). The abandoned run
gets other inputs than the reference, so caches it left behind would change the result; the
configs reuse, so caches are read. Also: two pipelines sharing a transformer are refused, and a
``pipe.scheduler`` replaced after ``enable_xslim`` is hooked again.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit import testing as tiny_models  # tiny random transformers and a sampling loop
from xslim_xdit.clock import StepClock
from xslim_xdit.engine import XSlimRuntimeError
from xslim_xdit.testing import pipelines as tiny_pipelines  # tiny complete diffusers pipelines

STEPS = 6
#: the online controller with every level: skips, polishes and full steps on the tiny models
CONFIG = XSlimConfig(warmup_steps=1, warn=0.5, crit=1.0, polish="auto")
OTHER = XSlimConfig(warmup_steps=2, warn=0.05, crit=0.2, polish="block")


class Stop(Exception):
    """What a callback or hook raises to end a run early."""


def records(engine):
    """The last run's statistics, without the run index (an aborted run used one)."""
    return [
        (r.step, r.branch, r.kind, r.blocks_computed, r.tokens_computed, r.flops, r.flops_full)
        + (tuple(r.blocks_mask or ()), r.token_count)
        for r in engine.statistics.run_records()
    ]


def no_dispatch_mode():
    return _get_current_dispatch_mode() is None


# ---------------------------------------------------------------------- pipelines


def _pipe(family):
    pipe = tiny_pipelines.tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _call(pipe, family, seed=0, prompt="a cat", **kw):
    out = pipe(
        prompt,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **tiny_pipelines.TINY_CALL_KWARGS[family],
        **kw,
    )
    return out.images


def _fresh_pipeline_run(family, config=CONFIG):
    pipe = _pipe(family)
    engine = enable_xslim(pipe, config)
    out = _call(pipe, family)
    disable_xslim(pipe)
    assert {k for k, _, _ in engine.statistics.decision_log()} != {"full"}  # the config reuses
    return out, engine.statistics.decision_log(), records(engine)


def _assert_clean_next_call(pipe, family, engine, config=CONFIG):
    """A normal call now equals the same call on a fresh pipeline with X-Slim freshly enabled."""
    expected, expected_log, expected_records = _fresh_pipeline_run(family, config)
    out = _call(pipe, family)
    assert engine.statistics.decision_log() == expected_log
    assert records(engine) == expected_records
    assert torch.equal(out, expected)
    assert no_dispatch_mode()


def _stopping_callback(family, exc, at_step=2):
    """Keyword arguments of a pipeline call whose step-end callback raises ``exc`` at ``at_step``
    (PixArt-Sigma only has the legacy ``callback``)."""
    if family == "flux":

        def on_step_end(pipe, i, t, kwargs):
            if i == at_step:
                raise exc
            return kwargs

        return {"callback_on_step_end": on_step_end}

    def legacy(i, t, latents):
        if i == at_step:
            raise exc

    return {"callback": legacy}


def _raising_forward_hook(transformer, exc, at_call=2):
    """A forward hook on the transformer (after X-Slim's) that raises at call ``at_call``."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == at_call + 1:
            raise exc

    return transformer.register_forward_hook(hook)


def _raising_block_hook(module, exc, at_call=2):
    """A pre-hook on block 1 of a transformer (inside its forward), or on ``module`` itself if
    it is not a transformer, that raises at call ``at_call``."""
    blocks = tiny_blocks(module)
    block = blocks[1] if blocks else module
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == at_call + 1:
            raise exc

    return block.register_forward_pre_hook(hook)


def tiny_blocks(model):
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(model, name, None) or ())
    return blocks


def _abort_then_call(family, exc, where, at=2):
    pipe = _pipe(family)
    engine = enable_xslim(pipe, CONFIG)
    kw = {}
    handle = None
    if where == "callback":
        kw = _stopping_callback(family, exc, at)
    elif where == "forward_hook":
        handle = _raising_forward_hook(pipe.transformer, exc, at)
    else:
        handle = _raising_block_hook(pipe.transformer, exc, at)
    with pytest.raises(type(exc)):
        _call(pipe, family, seed=1, prompt="a dog", **kw)  # other inputs than the reference
    if handle is not None:
        handle.remove()
    _assert_clean_next_call(pipe, family, engine)
    disable_xslim(pipe)


@pytest.mark.parametrize("family", ["flux", "pixart"])
@pytest.mark.parametrize("where", ["callback", "forward_hook", "block_hook"])
def test_exception_mid_run_then_a_clean_call(family, where):
    """Case 1 (clean on the code before this test: the pipeline's ``set_timesteps`` starts a new
    run; the block hook case also checks no partial FLOP count is kept)."""
    _abort_then_call(family, Stop("stop"), where)


@pytest.mark.parametrize("family", ["flux", "pixart"])
@pytest.mark.parametrize("where", ["callback", "forward_hook", "block_hook"])
def test_keyboard_interrupt_mid_run_then_a_clean_call(family, where):
    """Case 2: torch runs no ``always_call`` hook on a ``KeyboardInterrupt`` inside the forward."""
    _abort_then_call(family, KeyboardInterrupt(), where)


@pytest.mark.parametrize("family", ["flux", "pixart"])
@pytest.mark.parametrize("inside", [True, False])
def test_keyboard_interrupt_in_the_first_call_leaves_no_flop_counter(family, inside):
    """Interrupted in the run's first call, while the whole call's FLOPs are being counted (a
    ``FlopCounterMode`` on torch's dispatch stack), where torch calls no post-hook: inside block
    1's computation (where a Ctrl-C lands: blocks are nearly all the time), the count is dropped
    at once; between blocks (a pre-hook on block 1, outside X-Slim's code), at the next call."""
    pipe = _pipe(family)
    engine = enable_xslim(pipe, CONFIG)
    block = tiny_blocks(pipe.transformer)[1]
    handle = _raising_block_hook(block.ff if inside else pipe.transformer, KeyboardInterrupt(), 0)
    with pytest.raises(KeyboardInterrupt):
        _call(pipe, family, seed=1, prompt="a dog")
    handle.remove()
    if inside:
        assert no_dispatch_mode()
        assert not engine._in_call
    _assert_clean_next_call(pipe, family, engine)
    disable_xslim(pipe)


def test_pipe_interrupt_from_a_callback_then_a_clean_call():
    """Case 3, FLUX: ``pipe._interrupt = True`` skips the remaining steps (no transformer call)."""
    pipe = _pipe("flux")
    engine = enable_xslim(pipe, CONFIG)

    def interrupt(p, i, t, kwargs):
        if i == 2:
            p._interrupt = True
        return kwargs

    _call(pipe, "flux", seed=1, prompt="a dog", callback_on_step_end=interrupt)
    assert len(engine.statistics.run_records()) == 3
    _assert_clean_next_call(pipe, "flux", engine)
    disable_xslim(pipe)


def test_legacy_callback_that_stops_the_run_then_a_clean_call():
    """Case 3, PixArt-Sigma (no ``interrupt``): its ``callback`` stops the run by raising."""
    _abort_then_call("pixart", Stop("enough"), "callback", at=3)


# ---------------------------------------------------------------------- a bare transformer

BARE_STEPS = 10


@torch.no_grad()
def _denoise(model, calls, seed=0, cfg=False):
    """The first ``calls`` transformer calls of a DiT run of :data:`BARE_STEPS` steps; with
    ``cfg``, two calls per step (class 1, then the null class), as guidance by separate calls."""
    x, cond = tiny_models.make_inputs("dit", batch=1, seed=seed)
    labels = [cond["class_labels"]] + ([torch.full_like(cond["class_labels"], 10)] if cfg else [])
    n = 0
    for t in tiny_models.timesteps_for("dit", BARE_STEPS):
        outs = []
        for lab in labels:
            if n == calls:
                return x
            n += 1
            ts = torch.full((1,), t).long()
            outs.append(model(x, timestep=ts, class_labels=lab, return_dict=False)[0])
        out = outs[0] if not cfg else outs[1] + 2.0 * (outs[0] - outs[1])
        x = x - (1.0 / BARE_STEPS) * out
    return x


def _tiny_dit():
    return tiny_models.tiny_model("dit", num_embeds_ada_norm=11)  # class 10: the null class


def _fresh_bare_run(cfg=False):
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=BARE_STEPS)
    out = _denoise(model, 10**6, cfg=cfg)
    disable_xslim(model)
    assert {k for k, _, _ in engine.statistics.decision_log()} != {"full"}
    return out, records(engine)


def _assert_equals_fresh(model, engine, cfg=False):
    expected, expected_records = _fresh_bare_run(cfg)
    out = _denoise(model, 10**6, cfg=cfg)
    assert records(engine) == expected_records
    assert [r[0] for r in records(engine) if r[1] == 0] == list(range(BARE_STEPS))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("k", [2, 4])
def test_bare_transformer_run_abandoned_after_k_calls(k):
    """Case 4: the new run's first timestep is above the abandoned run's last: a new run."""
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=BARE_STEPS)
    _denoise(model, k, seed=1)
    _assert_equals_fresh(model, engine)
    disable_xslim(model)


def test_bare_transformer_run_abandoned_after_one_call_raises_then_runs_clean():
    """Case 4, the hard one: the new run's first call has the abandoned call's timestep, which the
    timestep fallback reads as a second guidance branch. When the second step has fewer calls
    than the first, that reading was wrong: the engine raises before reusing the abandoned
    call's caches (at the third step), resets, and the next run is clean."""
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=BARE_STEPS)
    _denoise(model, 1, seed=1)
    with pytest.raises(XSlimRuntimeError, match="start_run"):
        _denoise(model, 10**6)
    assert not engine._in_call
    _assert_equals_fresh(model, engine)
    disable_xslim(model)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_bare_transformer_with_start_run_before_each_run(k):
    """Case 4, the documented way: ``engine.start_run(n)`` before each run, nothing is guessed."""
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=BARE_STEPS)
    engine.start_run(BARE_STEPS)
    _denoise(model, k, seed=1)
    engine.start_run(BARE_STEPS)
    _assert_equals_fresh(model, engine)
    disable_xslim(model)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bare_transformer_guidance_by_separate_calls_abandoned(k):
    """Guidance as two calls per step still gives two branches; abandoned in the first step
    (k = 1, 2) the new run raises (k = 1: three calls then two) or is read as four branches
    (k = 2) until the second step shows two: raises; abandoned later (k = 3) a new run."""
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=BARE_STEPS)
    _denoise(model, k, seed=1, cfg=True)
    if k < 3:
        with pytest.raises(XSlimRuntimeError, match="start_run"):
            _denoise(model, 10**6, cfg=True)
    _assert_equals_fresh(model, engine, cfg=True)
    assert {r[1] for r in records(engine)} == {0, 1}
    disable_xslim(model)


GUIDED_LATE = [1, 2, 2, 2, 2, 2]  # guidance from the second step on (a guidance interval)
GUIDED_EARLY = [2, 2, 2, 1, 1, 1]  # guidance truncated after three steps


@pytest.mark.parametrize("calls_per_step", [GUIDED_LATE, GUIDED_EARLY])
def test_clock_guidance_on_some_steps_is_not_an_abandoned_run(calls_per_step):
    clock = StepClock()
    ticks = [
        clock.tick(t)
        for t, n in zip((900.0, 700.0, 500.0, 300.0, 200.0, 100.0), calls_per_step, strict=True)
        for _ in range(n)
    ]
    assert [(s, b) for _, s, b in ticks] == [(s, b) for s, n in enumerate(calls_per_step) for b in range(n)]


@pytest.mark.parametrize(
    "calls_per_step",
    [GUIDED_LATE, GUIDED_EARLY],
)
def test_bare_transformer_guidance_on_some_steps_is_not_refused(calls_per_step):
    """Guidance by separate calls on some steps only (an interval starting after the first step,
    or truncated before the end) is not mistaken for an abandoned run."""
    model = _tiny_dit()
    engine = enable_xslim(model, CONFIG, num_inference_steps=STEPS)
    x, cond = tiny_models.make_inputs("dit", batch=1, seed=0)
    with torch.no_grad():
        for t, n in zip(tiny_models.timesteps_for("dit", STEPS), calls_per_step, strict=True):
            for lab in [cond["class_labels"], torch.full_like(cond["class_labels"], 10)][:n]:
                model(x, timestep=torch.full((1,), t).long(), class_labels=lab, return_dict=False)
    expected = [(s, b) for s, n in enumerate(calls_per_step) for b in range(n)]
    assert [r[:2] for r in records(engine)] == expected
    disable_xslim(model)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_exception_inside_the_forward_closes_the_call(family):
    """Case 5: a hook on block 1 raises in the run's first call (while its FLOPs are counted):
    X-Slim's post-hook runs, no dispatch mode stays active, no partial FLOP count is kept, and
    the next run equals a fresh engine's."""
    model = tiny_models.tiny_model(family)
    engine = enable_xslim(model, CONFIG, num_inference_steps=STEPS)
    handle = _raising_block_hook(model, Stop("block 1"), at_call=0)
    with pytest.raises(Stop):
        tiny_models.sample(model, family, steps=STEPS, seed=1)
    handle.remove()
    assert no_dispatch_mode()
    assert not engine._in_call and engine.flop_meter._whole is None

    fresh_model = tiny_models.tiny_model(family)
    fresh = enable_xslim(fresh_model, CONFIG, num_inference_steps=STEPS)
    expected = tiny_models.sample(fresh_model, family, steps=STEPS)
    disable_xslim(fresh_model)
    out = tiny_models.sample(model, family, steps=STEPS)
    assert records(engine) == records(fresh)  # FLOPs too: no partial count was kept
    assert torch.equal(out, expected)
    assert no_dispatch_mode()
    assert len(engine.statistics.records) == len(fresh.statistics.records)  # none for the failed call
    disable_xslim(model)


# ---------------------------------------------------------------------- sharing and replacing


def _second_pipeline(pipe_a):
    components = dict(pipe_a.components)
    components["scheduler"] = type(pipe_a.scheduler).from_config(pipe_a.scheduler.config)
    pipe_b = type(pipe_a)(**components)
    pipe_b.set_progress_bar_config(disable=True)
    return pipe_b


def test_two_pipelines_sharing_a_transformer_are_refused():
    """Case 6: the second ``enable_xslim`` would have replaced the first engine, running pipeline
    A with B's config (and with no hook on A's scheduler). It is refused, naming both; A keeps
    its engine; after ``disable_xslim`` on A, B can enable."""
    pipe_a = _pipe("flux")
    pipe_b = _second_pipeline(pipe_a)
    engine_a = enable_xslim(pipe_a, CONFIG)
    with pytest.raises(XSlimRuntimeError, match="disable_xslim") as err:
        enable_xslim(pipe_b, OTHER)
    assert hex(id(pipe_a)) in str(err.value) and hex(id(pipe_b)) in str(err.value)
    with pytest.raises(XSlimRuntimeError):
        enable_xslim(pipe_a.transformer, OTHER, num_inference_steps=STEPS)
    _assert_clean_next_call(pipe_a, "flux", engine_a)  # A still runs with its own config
    disable_xslim(pipe_a)

    engine_b = enable_xslim(pipe_b, OTHER)
    expected, expected_log, expected_records = _fresh_pipeline_run("flux", OTHER)
    out = _call(pipe_b, "flux")
    assert records(engine_b) == expected_records
    assert torch.equal(out, expected)
    disable_xslim(pipe_b)


def test_enabling_twice_on_one_pipeline_replaces_the_engine():
    pipe = _pipe("flux")
    enable_xslim(pipe, CONFIG)
    engine = enable_xslim(pipe, OTHER)
    expected, _, expected_records = _fresh_pipeline_run("flux", OTHER)
    out = _call(pipe, "flux")
    assert records(engine) == expected_records
    assert torch.equal(out, expected)
    disable_xslim(pipe)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_replaced_scheduler_is_hooked_and_the_run_starts_clean(family):
    """Case 7: before, every call after the replacement was step 0 (no ``step()`` was counted)."""
    pipe = _pipe(family)
    engine = enable_xslim(pipe, CONFIG)
    _call(pipe, family, seed=1, prompt="a dog")
    old = pipe.scheduler
    pipe.scheduler = type(old).from_config(old.config)
    assert "set_timesteps" not in vars(pipe.scheduler)
    _assert_clean_next_call(pipe, family, engine)
    assert "set_timesteps" not in vars(old) and "step" not in vars(old)  # unhooked
    disable_xslim(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
