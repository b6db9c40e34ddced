"""X-Slim under ``torch.compile``: a compiled transformer (compiled before or after X-Slim is
enabled) makes the same decisions and the same output as the eager one."""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.config import Schedule
from xslim_xdit.testing import sample, tiny_model

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
    torch._dynamo.reset()
    cfg = CONFIGS[name]
    want, want_kinds = _eager(family, cfg)
    assert "skip" in want_kinds and "full" in want_kinds
    m = tiny_model(family)
    if order == "compile-then-enable":
        compiled = torch.compile(m, backend="aot_eager")
        engine = enable_xslim(compiled, cfg, num_inference_steps=STEPS)
    else:
        engine = enable_xslim(m, cfg, num_inference_steps=STEPS)
        compiled = torch.compile(m, backend="aot_eager")
    got = sample(compiled, family, steps=STEPS)
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(compiled)
    assert kinds == want_kinds
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # disabled again: the compiled module computes the plain model
    plain = sample(tiny_model(family), family, steps=STEPS)
    torch.testing.assert_close(sample(compiled, family, steps=STEPS), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_compiled_model_code_compiles_and_steps_do_not_recompile(family):
    """Under ``torch.compile`` the model's own code compiles with X-Slim on (a FLOP-counting
    dispatch mode used to keep dynamo from tracing the forward at all), X-Slim's Python is never
    traced (only "skipped function" breaks, where the model calls into X-Slim's hooks), and its
    decisions never guard a graph: a second run of the same steps compiles nothing new (before,
    guards on the step index, the plan kind and the block hook's index recompiled every step
    until dynamo's recompile limit)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

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
