"""A model family defined in this file alone gets the whole per-family suite: what
``docs/adding_a_model.md`` promises. The model is a small transformer written here (not a
diffusers class): token latents in, adaLN-modulated blocks of diffusers' ``Attention`` and an MLP,
timesteps in [0, 1]. Its adapter says where the blocks are, what the step probe is and which
module is the self-attention, and declares a preset, a rescale polynomial and its tiny model; the
last line opts it into :class:`family_suite.FamilyTesterMixin`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import Attention
from family_suite import FamilyTesterMixin
from torch import nn

from xslim_xdit import PRESETS, XSlimConfig
from xslim_xdit.adapters import BlockCall, BlockStack, ModelAdapter, adapter_for, register_adapter
from xslim_xdit.adapters.attention import SelfAttnTokenProcessor, TokenContext
from xslim_xdit.schedule import Schedule


class TinyTokenBlock(nn.Module):
    """Self-attention and MLP over the tokens, the attention input modulated by the timestep."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def modulate(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(temb).chunk(2, dim=-1)
        return self.norm1(hidden_states) * (1 + scale[:, None]) + shift[:, None]

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.modulate(hidden_states, temb))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class TinyTokenTransformer(nn.Module):
    """Latents shaped (batch, tokens, channels); ``timestep`` in [0, 1], one per sample."""

    def __init__(self, channels: int = 6, dim: int = 16, heads: int = 2, num_layers: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.time_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyTokenBlock(dim, heads) for _ in range(num_layers))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        temb = self.time_embed(timestep.to(hidden_states.dtype)[:, None])
        h = self.proj_in(hidden_states)
        for block in self.blocks:
            h = block(h, temb)
        out = self.proj_out(h)
        return {"sample": out} if return_dict else (out,)


@register_adapter
class TinyTokenAdapter(ModelAdapter):
    name = "tiny_token"
    model_class_names = ("TinyTokenTransformer",)
    rescale_polynomial = (0.5, 0.0)
    presets = {"tiny_token-demo": {"schedule": Schedule(8, (0, 1, 4, 7), (2,), (5,)), "token_ratio": 0.5}}
    timestep_max = 1.0

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [BlockStack("blocks", model.blocks, attr="blocks")]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.modulate(call.img, call.bound.arguments["temb"])

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return SelfAttnTokenProcessor(attn.processor, ctx, "none")

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        torch.manual_seed(seed)
        return TinyTokenTransformer(**overrides).eval()

    def tiny_inputs(self, batch: int = 1, seed: int = 0, tokens: int = 12) -> tuple[torch.Tensor, dict]:
        return torch.randn(batch, tokens, 6, generator=torch.Generator().manual_seed(seed)), {}


class TestTinyTokenFamily(FamilyTesterMixin):
    family = "tiny_token"


def test_the_family_is_reachable_by_name_only():
    assert type(adapter_for(TinyTokenTransformer())) is TinyTokenAdapter
    assert "tiny_token-demo" in PRESETS
    assert XSlimConfig(rescale="tiny_token").rescale_coefficients() == (0.5, 0.0)


def test_a_second_family_under_the_same_name_is_refused():
    impostor = type("TinyTokenAdapter2", (TinyTokenAdapter,), {"model_class_names": ("Other",)})
    with pytest.raises(ValueError, match="^name: family 'tiny_token' is already registered by"):
        register_adapter(impostor)
    bad_preset = type("Renamed", (TinyTokenAdapter,), {"name": "renamed"})  # keeps 'tiny_token-demo'
    with pytest.raises(ValueError, match="^presets: every preset name starts with 'renamed-'"):
        register_adapter(bad_preset)
