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
def test_compiled_forward_is_traced_with_one_break_at_the_decision(family):
    """Under ``torch.compile`` the model's forward is really compiled with X-Slim on (a FLOP
    counting dispatch mode used to keep dynamo from tracing it at all), and the only graph break
    X-Slim causes is its decision point at block 0 (a ``torch.compiler.disable``d call), taken
    once per call outside the compiled graph."""
    from torch._dynamo.utils import counters

    def compiled_run(cfg):
        torch._dynamo.reset()
        counters.clear()
        m = tiny_model(family)
        if cfg is not None:
            enable_xslim(m, cfg, num_inference_steps=STEPS)
        sample(torch.compile(m, backend="eager"), family, steps=STEPS)
        return dict(counters["stats"]), dict(counters["graph_break"])

    plain_stats, plain_breaks = compiled_run(None)
    stats, breaks = compiled_run(CONFIGS["online"])
    assert not plain_breaks
    assert [reason.splitlines()[0] for reason in breaks] == [
        "Skip inlining `torch.compiler.disable()`d function"
    ]
    # every call's blocks and model layers are in compiled graphs (more ops than one plain call's)
    assert stats["calls_captured"] >= plain_stats["calls_captured"]
