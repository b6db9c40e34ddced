"""Token refresh under sequence parallelism for a family that cannot serve it there (Z-Image)
is refused by ``enable_xslim_xdit`` itself, before any work starts, and the model is left as it was; families that serve it are not refused.

One process: torch.distributed is initialised with a single gloo rank, and xfuser's layout is
replaced by one that reports a sequence-parallel degree of 2 (the refusal reads only the layout,
so no xfuser runtime is needed)."""

from __future__ import annotations

import os
import sys
import tempfile
import types

import pytest
import torch
from family_suite import _restorable_state

from xslim_xdit import XSlimConfig, disable_xslim
from xslim_xdit.config import ConfigError
from xslim_xdit.integrations import xfuser as xfuser_integration
from xslim_xdit.testing import tiny_model


@pytest.fixture()
def sharded_layout(monkeypatch: pytest.MonkeyPatch):
    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    os.unlink(store.name)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    layout = {
        "world": 1,
        "rank": 0,
        "sp": 2,
        "ulysses": 2,
        "ring": 1,
        "pp": 1,
        "cfg": 1,
        "dp": 1,
        "dp_rank": 0,
    }
    monkeypatch.setattr(xfuser_integration, "xdit_layout", lambda: dict(layout))
    monkeypatch.setattr(xfuser_integration, "generation_group", lambda timeout_s=None: (None, [0]))
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("family", ["z_image"])
def test_refused_before_any_work(sharded_layout, family: str) -> None:
    model = tiny_model(family)
    before = _restorable_state(model)
    with pytest.raises(ConfigError, match=rf"family '{family}': token refresh .* sequence parallelism"):
        xfuser_integration.enable_xslim_xdit(model, XSlimConfig(polish="auto"), num_inference_steps=6)
    assert _restorable_state(model) == before
    # without the token level the same layout is served
    engine = xfuser_integration.enable_xslim_xdit(model, XSlimConfig(polish="block"), num_inference_steps=6)
    assert engine.sequence_shards == 2
    disable_xslim(model)
    assert _restorable_state(model) == before


@pytest.mark.parametrize("family", ["flux", "cogvideox", "qwen_image", "ltx2"])
def test_a_family_that_serves_it_is_not_refused(
    sharded_layout, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    # Their token paths under Ulysses and Ring are tested with ranks (tests/test_parallel_xdit.py,
    # tests/test_parallel_xdit_sp_token.py); here only that the refusal does not fire. Importing xfuser needs its CPU compatibility layer, so the
    # two functions the gather set-up reads come from a stand-in module.
    fake = types.ModuleType("xfuser.core.distributed")
    fake.get_sp_group = lambda: types.SimpleNamespace(device_group=None)
    fake.get_runtime_state = lambda: types.SimpleNamespace(split_text_embed_in_sp=False)
    monkeypatch.setitem(sys.modules, "xfuser.core.distributed", fake)
    model = tiny_model(family)
    engine = xfuser_integration.enable_xslim_xdit(model, XSlimConfig(polish="auto"), num_inference_steps=6)
    assert engine.use_token and engine.token_ctx.gather is not None
    disable_xslim(model)


def test_qwen_image_padded_text_under_xfuser_sequence_parallelism_is_refused_on_token_steps() -> None:
    """xfuser's Qwen-Image wrapper passes its joint mask as ``attention_mask`` and attends without
    it; a token step does the same when every key is valid and refuses padded text (which xfuser's
    full steps would attend), naming the family."""
    from xslim_xdit.adapters.qwen_image import QwenDoubleStreamTokenProcessor
    from xslim_xdit.adapters.token_context import TokenContext

    model = tiny_model("qwen_image")
    attn = model.transformer_blocks[0].attn
    ctx = TokenContext(index=torch.tensor([[0, 2]]), gather=lambda x, stream: x)  # a stand-in SP gather
    ctx.kv[(0, id(attn))] = [torch.zeros(1, 4, 32), torch.zeros(1, 4, 32)]
    processor = QwenDoubleStreamTokenProcessor(attn.processor, ctx, "none")
    img, txt = torch.randn(1, 2, 32), torch.randn(1, 3, 32)
    valid = torch.ones(1, 3 + 4, dtype=torch.bool)
    out_img, out_txt = processor(attn, img, txt, None, valid)
    assert out_img.shape == img.shape and out_txt.shape == txt.shape
    padded = valid.clone()
    padded[0, 2] = False
    with pytest.raises(NotImplementedError, match="family 'qwen_image': .*padded text"):
        processor(attn, img, txt, None, padded)


def test_cogvideox_token_step_accepts_xfusers_keyword_and_refuses_temporal_attention() -> None:
    """xfuser's attention wrapper passes ``latte_temporal_attention`` to every processor: False
    (CogVideoX's ``attn1``) runs the token step, True (Latte's temporal attention) is refused."""
    from xslim_xdit.adapters.cogvideox import CogVideoXTokenProcessor
    from xslim_xdit.adapters.token_context import TokenContext

    model = tiny_model("cogvideox", use_rotary_positional_embeddings=False)
    attn = model.transformer_blocks[0].attn1
    ctx = TokenContext(index=torch.tensor([[0, 3]]))
    ctx.kv[(0, id(attn))] = [torch.zeros(1, 8, 32), torch.zeros(1, 8, 32)]
    processor = CogVideoXTokenProcessor(attn.processor, ctx, "first")
    img, txt = torch.randn(1, 2, 32), torch.randn(1, 6, 32)
    out_img, out_txt = processor(attn, img, txt, latte_temporal_attention=False)
    assert out_img.shape == img.shape and out_txt.shape == txt.shape
    with pytest.raises(NotImplementedError, match="family 'cogvideox'"):
        processor(attn, img, txt, latte_temporal_attention=True)
