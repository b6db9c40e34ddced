"""Tiny random text encoders with in-memory character-level tokenizers, and a tiny image VAE: the
components the tiny pipelines of :mod:`xslim_xdit.testing.pipelines` and the video pipeline modules
share. Nothing is downloaded.

Example:
    >>> enc, tok = tiny_t5_encoder(d_model=8)
    >>> enc.config.d_model, tok("a cat").input_ids[-1]
    (8, 1)
"""

from __future__ import annotations

import string
from typing import Any

import torch

__all__ = [
    "tiny_clip_text_encoder",
    "tiny_t5_encoder",
    "tiny_umt5_encoder",
    "tiny_vae",
]

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def _clip_tokenizer() -> Any:
    """A character-level CLIP BPE tokenizer (no merges): every word splits into letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    """A character-level T5 (unigram) tokenizer: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_clip_text_encoder(hidden_size: int = 16, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``CLIPTextModel`` and its in-memory tokenizer.

    The pooled output (what FLUX uses) has ``hidden_size`` channels.

    Example:
        >>> enc, tok = tiny_clip_text_encoder()
        >>> enc(**tok(["a cat"], return_tensors="pt")).pooler_output.shape[-1]
        16
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(cfg).eval(), tok


def _t5_config_kwargs(d_model: int, vocab_size: int) -> dict[str, Any]:
    """One layer, two heads, the T5 tokenizer's special ids: what the tiny T5 and UMT5 share."""
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_t5_encoder(d_model: int = 24, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``T5EncoderModel`` and its in-memory tokenizer.

    Example:
        >>> enc, tok = tiny_t5_encoder(d_model=24)
        >>> enc(**tok(["a cat"], return_tensors="pt")).last_hidden_state.shape[-1]
        24
    """
    from transformers import T5Config, T5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**_t5_config_kwargs(d_model, len(tok)))).eval(), tok


def tiny_umt5_encoder(d_model: int = 16, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``UMT5EncoderModel`` (Wan's text encoder class) and the in-memory
    T5 tokenizer (same vocabulary conventions: ``<pad>`` = 0, ``</s>`` = 1).

    Example:
        >>> enc, tok = tiny_umt5_encoder(d_model=16)
        >>> enc(**tok(["a cat"], return_tensors="pt")).last_hidden_state.shape[-1]
        16
    """
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(d_model, len(tok)))).eval(), tok


def tiny_vae(latent_channels: int, seed: int = 0, **overrides: Any) -> Any:
    """A random ``AutoencoderKL`` with four levels (VAE scale factor 8, as in FLUX and PixArt).

    Example:
        >>> tiny_vae(4).config.latent_channels
        4
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=64,
    )
    kw.update(overrides)
    return AutoencoderKL(**kw).eval()
