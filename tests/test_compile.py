"""X-Slim under ``torch.compile``: a compiled transformer (compiled before or after X-Slim is
enabled) makes the same decisions and the same output as the eager one, with at most one graph
break per transformer call, X-Slim's (dynamo's message names the skipped function,
``XSlimEngine._pre_forward`` in ``xslim_xdit/engine.py``: that is how a break is attributed to
X-Slim), and no recompilation between the steps of a run (see :mod:`xslim_xdit.compiled`)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import adapter_named
from xslim_xdit.config import Schedule
from xslim_xdit.testing import make_inputs, sample, tiny_model

STEPS = 8
CONFIGS = {
    "online": XSlimConfig(warn=0.08, crit=0.3, warmup_steps=2, polish="block", block_thresh=0.5),
    "schedule": XSlimConfig(mode="schedule", schedule=Schedule(STEPS, (0, 1, 4, 7), block_steps=(5,))),
}


def _eager(family: str, cfg: XSlimConfig) -> tuple[torch.Tensor, list[str]]:
    m = tiny_model(family)
    engine = enable_xslim(m, cfg, num_inference_steps=STEPS)
    out = sample(m, family, steps=STEPS)
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(m)
    return out, kinds


@pytest.mark.parametrize("family", ["dit", "flux"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("order", ["compile-then-enable", "enable-then-compile"])
def test_compiled_transformer_matches_eager(family, name, order):
    """Same decisions and output as eager; no graph break at all (``torch.compile`` runs the
    module's hooks outside dynamo, and X-Slim's pre-hook keeps dynamo off the model's forward),
    no graph compiled after the first step (the blocks' graphs are reused whatever each step
    computes); disabled, the compiled module is the plain compiled model again."""
    torch._dynamo.reset()
    cfg = CONFIGS[name]
    want, want_kinds = _eager(family, cfg)
    assert {"skip", "block", "full"} <= set(want_kinds)
    m = tiny_model(family)
    attributes = set(vars(m))
    counters.clear()
    if order == "compile-then-enable":
        compiled = torch.compile(m, backend="aot_eager")
        engine = enable_xslim(compiled, cfg, num_inference_steps=STEPS)
    else:
        engine = enable_xslim(m, cfg, num_inference_steps=STEPS)
        compiled = torch.compile(m, backend="aot_eager")
    graphs_after_step: list[int] = []
    got = sample(compiled, family, steps=STEPS, callback=lambda i, x: graphs_after_step.append(_graphs()))
    kinds = engine.statistics.summary()["kinds"]
    breaks = dict(counters["graph_break"])
    disable_xslim(compiled)
    assert kinds == want_kinds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert breaks == {}, breaks
    assert graphs_after_step[0] >= 1 and set(graphs_after_step) == {graphs_after_step[0]}, graphs_after_step
    # disabled again: the compiled module computes the plain model, and the model is as it was
    # (torch.compile itself marks the module it wraps: ``_is_torch_compile``)
    assert compiled._orig_mod is m and set(vars(m)) - {"_is_torch_compile"} == attributes
    plain = sample(tiny_model(family), family, steps=STEPS)
    torch.testing.assert_close(sample(compiled, family, steps=STEPS), plain, rtol=1e-5, atol=1e-5)


def _graphs() -> int:
    return int(counters["stats"].get("unique_graphs", 0))


def _all_xslim(breaks: dict[str, int]) -> bool:
    """Every graph break is at X-Slim's pre-hook (dynamo's message names the function it skipped)."""
    return all("XSlimEngine._pre_forward" in reason and "xslim_xdit" in reason for reason in breaks)


@pytest.mark.parametrize(("family", "name"), [("flux", "schedule"), ("dit", "online"), ("dit", "token")])
def test_one_graph_break_per_call_on_every_step_kind(family, name):
    """A compiled function that calls the transformer (as a compiled denoising step would), each
    call traced afresh (dynamo reset before it): every call, full, block or skip, breaks its
    graph exactly once, at X-Slim's pre-hook (token steps too: the token processors add
    none); without X-Slim, no break."""
    adapter = adapter_named(family)
    m = tiny_model(family)
    x, cond = make_inputs(family)
    step = torch.compile(lambda x, t: m(x, timestep=t, return_dict=False, **cond)[0], backend="eager")
    timesteps = adapter.timesteps(STEPS)

    def call(i: int) -> dict[str, int]:
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            step(x, adapter.timestep_input(timesteps[i], x.shape[0]))
        return dict(counters["graph_break"])

    assert call(0) == {}
    cfg = TOKEN_CONFIGS["schedule"] if name == "token" else CONFIGS[name]
    engine = enable_xslim(m, cfg, num_inference_steps=STEPS)
    per_call = [call(i) for i in range(STEPS)]
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(m)
    assert {"full", "block", "skip"} <= set(kinds), kinds
    for kind, breaks in zip(kinds, per_call, strict=True):
        assert sum(breaks.values()) == 1 and _all_xslim(breaks), (kind, breaks)


TOKEN_CONFIGS = {
    "schedule": XSlimConfig(
        mode="schedule", schedule=Schedule(STEPS, (0, 1, 4, 7), block_steps=(5,), token_steps=(2, 6))
    ),
    "online": XSlimConfig(warn=0.08, crit=0.3, warmup_steps=2, polish="token"),
}


@pytest.mark.parametrize("family", ["dit", "flux"])
@pytest.mark.parametrize("name", sorted(TOKEN_CONFIGS))
def test_token_steps_compile_no_graph_after_the_first_token_step(family, name):
    """Token refresh under ``torch.compile``: decisions and output equal eager, no graph break,
    and graphs are compiled only at step 0 and at the first token step (its selected rows are a
    second input shape of the blocks): the K/V recorders and token processors traced inside the
    blocks read no X-Slim state that changes between steps or blocks (before: graphs at steps 0,
    1, 2, 5 and 6 of the schedule, one per block until dynamo's recompile limit); a second run
    compiles nothing."""
    cfg = TOKEN_CONFIGS[name]
    want, want_kinds = _eager(family, cfg)
    assert "token" in want_kinds and "full" in want_kinds[want_kinds.index("token") :], want_kinds
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiny_model(family), backend="eager")
    engine = enable_xslim(compiled, cfg, num_inference_steps=STEPS)
    graphs_after_step: list[int] = []
    got = sample(compiled, family, steps=STEPS, callback=lambda i, x: graphs_after_step.append(_graphs()))
    kinds = engine.statistics.summary()["kinds"]
    breaks = dict(counters["graph_break"])
    counters.clear()
    again = sample(compiled, family, steps=STEPS)
    second = _graphs()
    disable_xslim(compiled)
    assert kinds == want_kinds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    assert breaks == {}, breaks
    first_token = kinds.index("token")
    compiled_at = {i for i in range(STEPS) if graphs_after_step[i] > (graphs_after_step[i - 1] if i else 0)}
    assert compiled_at == {0, first_token}, (compiled_at, kinds, graphs_after_step)
    assert second == 0, second


@pytest.mark.parametrize("how", ["compile_repeated_blocks", "module.compile"])
def test_user_compiled_blocks_or_module(how):
    """diffusers' regional compilation (``compile_repeated_blocks``: each block's
    ``_compiled_call_impl``, here with ``fullgraph=True``) and ``nn.Module.compile()`` on the
    transformer: X-Slim's block hook runs outside the compiled blocks, no graph break at all,
    each block class compiles once, the output equals eager, and disabling puts back the user's
    compiled calls."""
    cfg = CONFIGS["schedule"]
    want, want_kinds = _eager("flux", cfg)
    torch._dynamo.reset()
    m = tiny_model("flux")
    blocks = [blk for _, blk in get_engine_blocks(m)]
    if how == "compile_repeated_blocks":
        m.compile_repeated_blocks(backend="eager", fullgraph=True)  # X-Slim is outside the blocks
    else:
        m.compile(backend="eager")
    compiled_calls = [blk._compiled_call_impl for blk in blocks] + [m._compiled_call_impl]
    counters.clear()
    engine = enable_xslim(m, cfg, num_inference_steps=STEPS)
    graphs_after_step: list[int] = []
    got = sample(m, "flux", steps=STEPS, callback=lambda i, x: graphs_after_step.append(_graphs()))
    kinds = engine.statistics.summary()["kinds"]
    breaks = dict(counters["graph_break"])
    disable_xslim(m)
    assert kinds == want_kinds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one graph per block class and input layout (FLUX's first single block gets a wider stride),
    # all compiled at the first step
    classes = len({type(blk) for blk in blocks})
    assert classes <= graphs_after_step[0] <= 2 * classes
    assert set(graphs_after_step) == {graphs_after_step[0]}, graphs_after_step
    assert breaks == {}, breaks
    restored = [blk._compiled_call_impl for blk in blocks] + [m._compiled_call_impl]
    assert all(a is b for a, b in zip(restored, compiled_calls, strict=True))


def test_whole_transformer_fullgraph_is_refused():
    """X-Slim's call hook is a graph break by design: a transformer compiled with
    ``fullgraph=True`` is refused before anything is attached, naming the option."""
    from xslim_xdit.config import ConfigError

    m = tiny_model("dit")
    for compiled in (torch.compile(m, backend="eager", fullgraph=True), m):
        if compiled is m:
            m.compile(backend="eager", fullgraph=True)
        with pytest.raises(ConfigError, match="fullgraph=True"):
            enable_xslim(compiled, CONFIGS["schedule"], num_inference_steps=STEPS)
        assert "_diffusers_hook" not in vars(m) and "forward" not in vars(m)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_compiled_model_code_compiles_and_steps_do_not_recompile(family):
    """Under ``torch.compile`` each block's own forward compiles (a FLOP-counting dispatch mode
    once kept dynamo from tracing anything), X-Slim's Python is never traced, and its decisions
    never guard a graph: a second run of the same steps compiles nothing new (before, guards on
    the step index, the plan kind and the block hook's index recompiled every step until
    dynamo's recompile limit)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    counters.clear()
    m = tiny_model(family)
    enable_xslim(m, CONFIGS["schedule"], num_inference_steps=STEPS)
    compiled = torch.compile(m, backend="eager")
    sample(compiled, family, steps=STEPS)
    first = dict(counters["stats"])
    reasons = {reason.splitlines()[0] for reason in counters["graph_break"]}
    counters.clear()
    sample(compiled, family, steps=STEPS)
    second = dict(counters["stats"])
    # each block class's own forward runs as compiled code (one entry per input shape at most)
    block_classes = {type(blk) for _, blk in get_engine_blocks(m)}
    for cls in block_classes:
        entries = _debug_get_cache_entry_list(cls.forward.__code__)
        assert 1 <= len(entries) <= 3, (cls.__name__, len(entries))
    assert first["unique_graphs"] >= len(block_classes)
    assert reasons <= {
        "Attempted to call function marked as skipped",
        "Attempted to inline function marked as skipped",
    }, reasons
    assert second.get("unique_graphs", 0) == 0, second
    disable_xslim(m)


def get_engine_blocks(model):
    """(stack index, block) of every block the adapter manages."""
    from xslim_xdit.adapters import adapter_for

    return [(i, blk) for i, st in enumerate(adapter_for(model).stacks(model)) for blk in st.blocks]


def test_kv_recorders_hold_nothing_between_blocks():
    """The K/V recorders keep ``to_k``/``to_v``'s output only until X-Slim files it after the
    block (eager code, outside any compiled graph): after a run with token steps none holds a
    tensor, the K/V cache is dense (a token step's splice leaves it so: one stride layout for the
    compiled blocks' guards), and disabling removes every recorder hook."""
    m = tiny_model("flux")
    engine = enable_xslim(m, TOKEN_CONFIGS["schedule"], num_inference_steps=STEPS)
    sample(m, "flux", steps=STEPS, callback=lambda i, x: None)
    hooks = engine._token_attention
    recorders = [done[2] for done in hooks._installed.values() if done[2] is not None]
    cache = [t for pair in engine.token_ctx.kv.values() for t in pair]
    assert "token" in engine.statistics.summary()["kinds"]
    assert recorders and all(r.outputs == [None, None] for r in recorders)
    assert cache and all(t.stride() == torch.empty(t.shape).stride() for t in cache)
    disable_xslim(m)
    for r in recorders:
        assert not any(h.id in lin._forward_hooks for h in r.handles for lin in m.modules())
