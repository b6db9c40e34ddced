"""The engine on the tiny random models: token ratios, per-sample selection, the online controller,
caches, guidance branches, errors and the row helpers. The checks every family must pass (identity
when it should be, every reuse level doing what the statistics say) are in ``family_suite.py``."""

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import UnsupportedModelError, adapter_for
from xslim_xdit.engine import XSlimRuntimeError
from xslim_xdit.testing import make_inputs, sample, timesteps_for, tiny_model

STEPS = 8


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_token_ratio_computes_that_fraction(ratio):
    fam = "flux"
    m = tiny_model(fam)
    sched = Schedule(STEPS, full_steps=(0, 1, 7), token_steps=tuple(range(2, 7)))
    eng = enable_xslim(
        m, XSlimConfig(mode="schedule", schedule=sched, token_ratio=ratio), num_inference_steps=STEPS
    )
    sample(m, fam, steps=STEPS)
    disable_xslim(m)
    tok = [r for r in eng.statistics.run_records() if r.kind == "token"]
    frac = sum(r.tokens_computed for r in tok) / sum(r.tokens_total for r in tok)
    assert abs(frac - ratio) <= 1.0 / make_inputs(fam)[0].shape[1]  # one token of rounding


def test_token_selection_is_per_sample():
    m = tiny_model("dit")
    sched = Schedule(6, full_steps=(0, 1, 5), token_steps=(2, 3, 4))
    eng = enable_xslim(
        m, XSlimConfig(mode="schedule", schedule=sched, token_ratio=0.25), num_inference_steps=6
    )
    seen = []
    orig = eng.room._select_tokens

    def spy(caches):
        idx = orig(caches)
        seen.append(idx.clone())
        return idx

    eng.room._select_tokens = spy
    sample(m, "dit", steps=6, batch=4)
    disable_xslim(m)
    assert seen and all(idx.shape == (4, 4) for idx in seen)
    assert any(not torch.equal(idx[0], idx[1]) for idx in seen)  # samples choose their own tokens


def test_online_controller_uses_all_levels_and_resets_between_runs():
    m = tiny_model("pixart")
    cfg = XSlimConfig(warn=0.04, crit=0.5, polish="auto", warmup_steps=2)
    eng = enable_xslim(m, cfg, num_inference_steps=12)
    first = sample(m, "pixart", steps=12)
    log1 = eng.statistics.decision_log(run=0)
    second = sample(m, "pixart", steps=12)  # the engine restarts by itself after 12 steps
    log2 = eng.statistics.decision_log(run=1)
    disable_xslim(m)
    assert eng.run_index == 1
    assert log1 == log2 and torch.equal(first, second)
    kinds = {k for k, _, _ in log1}
    assert "full" in kinds and len(kinds) >= 2
    inds = eng.statistics.summary(run=0)["indicators"]
    assert inds[0] is None and all(v is not None and v >= 0 for v in inds[1:])


def test_caches_hold_only_what_levels_need():
    fam = "flux"
    sizes = {}
    for polish in ("none", "block", "token"):
        m = tiny_model(fam)
        eng = enable_xslim(m, XSlimConfig(warn=0.05, crit=0.5, polish=polish), num_inference_steps=6)
        sample(m, fam, steps=6)
        sizes[polish] = eng.cache_bytes()
        disable_xslim(m)
    assert (
        sizes["none"]["block_residuals"] == 0
        and sizes["none"]["kv"] == 0
        and sizes["none"]["token_history"] == 0
    )
    assert sizes["block"]["block_residuals"] > 0 and sizes["block"]["kv"] == 0
    assert sizes["token"]["kv"] > 0 and sizes["token"]["block_residuals"] == 0
    assert sizes["token"]["token_history"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_every_level_runs_in_half_precision_with_caches_in_the_model_dtype(family, dtype):
    """Skip, block and token steps in bf16 and fp16: the caches (stack and block residuals and
    their slopes, K/V) keep the model's dtype and the output stays finite."""
    m = tiny_model(family).to(dtype)
    schedule = Schedule(10, full_steps=(0, 1, 5, 9), block_steps=(2, 6), token_steps=(3, 7))
    eng = enable_xslim(m, XSlimConfig(mode="schedule", schedule=schedule), num_inference_steps=10)
    x, cond = make_inputs(family)
    cond = {
        k: v.to(dtype) if v.is_floating_point() and k != "img_ids" and k != "txt_ids" else v
        for k, v in cond.items()
    }
    outs = []
    with torch.no_grad():
        for t in timesteps_for(family, 10):
            outs.append(m(x.to(dtype), timestep=torch.tensor([t]), **cond).sample)
    kinds = eng.statistics.summary()["kinds"]
    dtypes = {st.residual.dtype for st in eng.branches.values()}
    dtypes |= {t.dtype for pair in eng.token_ctx.kv.values() for t in pair if t is not None}
    dtypes |= {
        v.dtype
        for st in eng.branches.values()
        for tr in st.blocks.values()
        for v in tr.values
        if v is not None
    }
    dtypes |= {
        v.dtype
        for st in eng.branches.values()
        for tr in st.blocks.values()
        for v in (tr.slope or ())
        if v is not None
    }
    disable_xslim(m)
    assert {"skip", "block", "token", "full"} <= set(kinds)
    assert dtypes == {dtype}
    assert all(torch.isfinite(o).all() for o in outs)


def test_separate_guidance_calls_share_one_decision():
    """A pipeline that calls the transformer once per guidance branch: the second call of a step
    (same timestep) reuses the first call's decision and keeps caches of its own."""
    m = tiny_model("dit")
    eng = enable_xslim(
        m, XSlimConfig(warn=0.05, crit=0.6, polish="auto", warmup_steps=2), num_inference_steps=6
    )
    x, cond = make_inputs("dit")
    with torch.no_grad():
        for t in [900, 750, 600, 450, 300, 150]:
            tt = torch.tensor([t])
            e_c = m(x, timestep=tt, class_labels=torch.tensor([3])).sample
            e_u = m(x, timestep=tt, class_labels=torch.tensor([10])).sample
            x = x - 0.1 * (e_u + 2.0 * (e_c - e_u))
    branches = len(eng.branches)
    disable_xslim(m)
    recs = eng.statistics.run_records()
    assert len(recs) == 12 and {r.branch for r in recs} == {0, 1}
    assert [r.kind for r in recs[0::2]] == [r.kind for r in recs[1::2]]
    assert branches == 2


def test_unsupported_model_is_refused_before_anything_runs():
    with pytest.raises(UnsupportedModelError, match="model: no X-Slim adapter for Linear"):
        enable_xslim(torch.nn.Linear(2, 2), XSlimConfig())


def test_bare_transformer_without_step_count_fails_clearly():
    m = tiny_model("dit")
    enable_xslim(m, XSlimConfig())
    x, cond = make_inputs("dit")
    with pytest.raises(XSlimRuntimeError, match="num_inference_steps"):
        m(x, timestep=torch.tensor([900]), **cond)
    disable_xslim(m)
    m(x, timestep=torch.tensor([900]), **cond)  # the model is intact afterwards


def test_adapter_exposes_stack_boundaries():
    m = tiny_model("flux")
    stacks = adapter_for(m).stacks(m)
    assert [s.name for s in stacks] == ["double", "single"]
    assert [len(s.blocks) for s in stacks] == [2, 3]


@pytest.mark.parametrize("extrapolate", ["linear", "none"])
def test_reused_blocks_move_along_their_own_slope(extrapolate):
    """On a block step a reused block adds its cached residual moved along the slope between the
    last two times it ran (extrapolate="linear"), as a skipped stack does. Blocks 1.. are replaced
    by functions whose residual grows linearly with the step, so the extrapolated reuse is exact
    and a block step must equal a full step; without extrapolation it lags."""
    m = tiny_model("dit")
    n = len(m.transformer_blocks)
    direction = torch.randn(
        m.config.num_attention_heads * m.config.attention_head_dim, generator=torch.Generator().manual_seed(3)
    )
    calls = {"step": -1}
    m.register_forward_pre_hook(lambda *_: calls.__setitem__("step", calls["step"] + 1))

    def linear_in_step(hidden_states, *a, **k):
        return hidden_states + 0.1 * calls["step"] * direction

    outs: dict[str, list[torch.Tensor]] = {}
    for name, sched in (
        ("full", Schedule(6, tuple(range(6)))),
        ("block", Schedule(6, (0, 1, 2, 5), block_steps=(3, 4))),
    ):
        calls["step"] = -1
        for blk in list(m.transformer_blocks)[1:]:
            blk.forward = linear_in_step  # disable_xslim removes instance forwards: set each run
        cfg = XSlimConfig(mode="schedule", schedule=sched, block_thresh=1e6, extrapolate=extrapolate)
        eng = enable_xslim(m, cfg, num_inference_steps=6)
        seen: list[torch.Tensor] = []
        h = m.register_forward_hook(lambda mod, a, out, seen=seen: seen.append(out[0].detach().clone()))
        sample(m, "dit", steps=6)
        h.remove()
        kinds = eng.statistics.summary()["kinds"]
        masks = [r.blocks_mask for r in eng.statistics.records]
        disable_xslim(m)
        outs[name] = seen
    assert kinds == ["full", "full", "full", "block", "block", "full"]
    assert masks[3] == [1] + [0] * (n - 1)  # only block 0 ran on the block steps
    for step in (3, 4):
        same = torch.allclose(outs["block"][step], outs["full"][step], atol=1e-5)
        assert same == (extrapolate == "linear"), step


def test_row_splice_and_gather_match_scatter_and_gather():
    from xslim_xdit.adapters.attention import flat_rows, gather_rows, splice

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 10, 5), (2, 7, 3, 4)]:  # (B, N, D) and (B, N, heads, head_dim)
        b, n = shape[:2]
        x = torch.randn(*shape, generator=g)
        index = torch.stack([torch.randperm(n, generator=g)[:4].sort().values for _ in range(b)])
        rows = torch.randn(b, 4, *shape[2:], generator=g)
        expand = index.reshape(b, 4, *([1] * (len(shape) - 2))).expand(b, 4, *shape[2:])
        want_gather = torch.gather(x, 1, expand)
        want_splice = x.scatter(1, expand, rows)
        flat = flat_rows(index, n)
        for f in (None, flat):
            assert torch.equal(gather_rows(x, index, f), want_gather)
            assert torch.equal(splice(x, index, rows, f), want_splice)
        # non-contiguous inputs, and the input is never written
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not xt.is_contiguous() or len(shape) == 2
        assert torch.equal(gather_rows(xt, index), want_gather)
        assert torch.equal(splice(xt, index, rows), want_splice)
        assert torch.equal(xt, x)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_parse_call_finds_streams_however_they_are_passed(family):
    import inspect

    from xslim_xdit.adapters.base import adapter_for

    m = tiny_model(family)
    adapter = adapter_for(m)
    stack = adapter.stacks(m)[0]
    blk = stack.blocks[0]
    sig = inspect.signature(blk.forward)
    img, txt = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    extra = {"temb": torch.randn(2, 8)} if stack.txt_arg else {"timestep": torch.tensor([1, 2])}
    streams = {stack.img_arg: img, **({stack.txt_arg: txt} if stack.txt_arg else {})}
    names = list(sig.parameters)
    positional = tuple(streams[n] for n in names[: len(streams)])
    for args, kwargs in [(positional, extra), ((), {**streams, **extra})]:
        call = adapter.parse_call(stack, sig, args, kwargs)
        assert call.img is img and call.txt is (txt if stack.txt_arg else None)
        new_img, new_txt = torch.zeros_like(img), torch.zeros_like(txt)
        a2, k2 = call.with_streams(new_img, new_txt if stack.txt_arg else None)
        bound = sig.bind(*a2, **k2).arguments
        assert bound[stack.img_arg] is new_img
        if stack.txt_arg:
            assert bound[stack.txt_arg] is new_txt
        # everything else passes through unchanged, and `bound` names the call's arguments
        assert all(bound[k] is v for k, v in extra.items())
        assert call.bound.arguments[stack.img_arg] is img
    with pytest.raises(TypeError):  # a call the block could not take is still refused
        adapter.parse_call(stack, sig, (), {"no_such_argument": 1})
