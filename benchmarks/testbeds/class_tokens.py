"""A learned stand-in for a text encoder: one short token sequence and one pooled vector per class.

The FLUX and HunyuanVideo testbeds take their condition through the text path of the real
architectures (``encoder_hidden_states`` joined with the image tokens in joint attention, and
``pooled_projections`` added to the timestep embedding). No text encoder weights are available
offline, so :class:`ClassTokenEncoder` maps a class index to a learned ``(num_tokens, dim)`` token
sequence and a learned ``pooled_dim`` vector, trained together with the transformer. Row
``num_classes`` is the null class ("empty prompt") used by classifier-free guidance.

Like a tokenizer padding an empty prompt, the null class can be given fewer valid tokens than the
classes (``null_valid_tokens``); :meth:`ClassTokenEncoder.forward` returns the matching attention
mask (valid tokens first, padding at the end, as HunyuanVideo expects).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ClassTokenEncoder(ModelMixin, ConfigMixin):
    """Per-class learned token sequences, pooled vectors and attention masks.

    Args:
        num_classes: Number of real classes; index ``num_classes`` is the null class.
        num_tokens: Tokens per sequence (the text length ``L``).
        dim: Token width (the transformer's ``joint_attention_dim`` / ``text_embed_dim``).
        pooled_dim: Width of the pooled vector (``pooled_projection_dim``).
        null_valid_tokens: Valid (unmasked) tokens of the null class; the classes use all
            ``num_tokens``.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        num_tokens: int = 4,
        dim: int = 64,
        pooled_dim: int = 64,
        null_valid_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if null_valid_tokens is not None and not 1 <= null_valid_tokens <= num_tokens:
            raise ValueError(f"null_valid_tokens must be in [1, {num_tokens}], got {null_valid_tokens}")
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim))
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim))
        mask = torch.ones(num_classes + 1, num_tokens, dtype=torch.long)
        if null_valid_tokens is not None:
            mask[num_classes, null_valid_tokens:] = 0
        self.register_buffer("mask", mask, persistent=False)

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class."""
        return int(self.config.num_classes)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Look up the condition of each label.

        Args:
            labels: int64 ``(B,)`` class indices in ``[0, num_classes]``.

        Returns:
            ``(encoder_hidden_states (B, L, dim), pooled_projections (B, pooled_dim),
            encoder_attention_mask (B, L) int64)``; masked tokens are zeroed.
        """
        mask = self.mask[labels]
        tokens = self.tokens[labels] * mask.unsqueeze(-1).to(self.tokens.dtype)
        return tokens, self.pooled[labels], mask
