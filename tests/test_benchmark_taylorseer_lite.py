"""The benchmark's TaylorSeer lite peer (diffusers ``use_lite_mode``): the blocks are skipped
between full steps, as TaylorSeer's authors publish it, and models without its modules refuse."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.methods import MethodRefused, TaylorSeer
from xslim_xdit.testing.pipelines import tiny_flux_embeds_call, tiny_flux_embeds_pipeline


def _call() -> dict:
    return {**tiny_flux_embeds_call(12), "generator": torch.Generator().manual_seed(0)}


def test_lite_skips_the_blocks_and_is_undone() -> None:
    pipe = tiny_flux_embeds_pipeline()
    block = pipe.transformer.single_transformer_blocks[-1].proj_mlp  # inside the block
    calls: list[int] = []
    handle = block.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            ref = pipe(**_call()).images
        assert len(calls) == 12
        m = TaylorSeer(3, 1, lite=True)
        assert m.name == "TaylorSeer N=3 o=1 lite" and m.family == "taylorseer"
        m.prepare(pipe, None, 12)
        m.enable(pipe)
        calls.clear()
        with torch.no_grad():
            out = pipe(**_call()).images
        # warm-up steps, then one full step in 3: the block's insides run on few steps
        assert 0 < len(calls) < 12
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
        m.disable(pipe)
        calls.clear()
        with torch.no_grad():
            again = pipe(**_call()).images
        assert len(calls) == 12 and torch.equal(again, ref)
    finally:
        handle.remove()


def test_lite_refuses_a_model_without_its_modules() -> None:
    pipe = SimpleNamespace(transformer=nn.Module())
    pipe.transformer.transformer_blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(MethodRefused, match="lite mode"):
        TaylorSeer(3, 1, lite=True).prepare(pipe, None, 12)
