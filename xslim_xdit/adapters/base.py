"""What the engine needs to know about a model family, and nothing about the algorithm.

An adapter says: which block stacks the transformer has and in which order; for a block call,
which argument is the image-token stream and which (if any) the text stream, and how the block
returns them; how to compute the step probe (block 0's modulated input); and which attention
modules get a token-refresh processor. Adding a model is one file in this package with one
``ModelAdapter`` subclass registered with :func:`register_adapter`: :func:`discover_adapters`
imports every module of the package, so no list names the families. The registry and the lookups
(:func:`register_adapter`, :func:`adapter_for`, ...) live in :mod:`xslim_xdit.adapters.registry`
and are re-exported here, where the family modules import them from.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .family import FamilyDescription

#: How a block returns its streams: the image stream alone, (text, image) or (image, text).
OutputLayout = Literal["img", "txt_img", "img_txt"]
#: Where the text tokens sit in a single-stream block's concatenated sequence.
TextPosition = Literal["none", "first", "last"]


@dataclass
class BlockStack:
    """One stack of identical blocks (FLUX has a double-stream and a single-stream stack)."""

    name: str
    blocks: nn.ModuleList
    attr: str = "transformer_blocks"  # the model attribute holding the blocks
    img_arg: str = "hidden_states"
    txt_arg: str | None = None  # argument carrying the text stream, for joint blocks
    output: OutputLayout = "img"
    #: where to find the text tokens in the sequence that the block's self-attention sees
    #: (``"none"``: the attention sees image tokens only, or text enters as separate K/V)
    attn_text_position: TextPosition = "none"


@dataclass
class BlockCall:
    """A block call in canonical form: the streams plus everything else, to call it again.

    The arguments are bound to the signature only when an adapter asks for them by name
    (:attr:`bound`): the common paths (finding the streams, calling again with new streams) read
    the positional and keyword arguments directly, 0.9 us per block call on CPU against 5.5 us
    with binding; every step calls every block (57 on FLUX.1-dev), skipped steps too.
    """

    img: torch.Tensor
    txt: torch.Tensor | None
    args: tuple
    kwargs: dict
    signature: inspect.Signature = field(repr=False)
    stack: BlockStack = field(repr=False)
    _bound: inspect.BoundArguments | None = field(default=None, repr=False)

    @property
    def bound(self) -> inspect.BoundArguments:
        """The call's arguments by name (those passed; defaults are not filled in)."""
        if self._bound is None:
            self._bound = self.signature.bind(*self.args, **self.kwargs)
        return self._bound

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        """The call's arguments with the image (and text) stream replaced."""
        args, kwargs = list(self.args), dict(self.kwargs)
        _put_arg(self.signature, args, kwargs, self.stack.img_arg, img)
        if self.stack.txt_arg is not None:
            _put_arg(self.signature, args, kwargs, self.stack.txt_arg, txt)
        return tuple(args), kwargs


_MISSING = object()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _position(sig: inspect.Signature, name: str) -> int | None:
    """Index of parameter ``name`` among the leading positional parameters, else ``None``."""
    for i, (n, p) in enumerate(sig.parameters.items()):
        if p.kind not in _POSITIONAL:
            return None
        if n == name:
            return i
    return None


def _get_arg(sig: inspect.Signature, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    i = _position(sig, name)
    return args[i] if i is not None and i < len(args) else _MISSING


def _put_arg(sig: inspect.Signature, args: list, kwargs: dict, name: str, value: Any) -> None:
    i = None if name in kwargs else _position(sig, name)
    if i is not None and i < len(args):
        args[i] = value
    else:
        kwargs[name] = value


class ModelAdapter(FamilyDescription):
    """Base class of the per-family adapters.

    Subclasses set ``name`` and ``model_class_names`` and implement :meth:`stacks`,
    :meth:`modulated_input`, :meth:`self_attention` and :meth:`token_processor`; what else a
    family knows (presets, rescale polynomial, timestep units, tiny test model) comes from
    :class:`~xslim_xdit.adapters.family.FamilyDescription`.

    Example:
        >>> from xslim_xdit.adapters import adapter_for
        >>> from diffusers import DiTTransformer2DModel
        >>> m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     num_layers=2, sample_size=8, num_embeds_ada_norm=10)
        >>> type(adapter_for(m)).__name__
        'DiTAdapter'
    """

    name: str = "base"
    model_class_names: tuple[str, ...] = ()
    #: the model's final output reads the second stream too (LTX-2's audio), not only the image
    #: stream: skip steps then move that stream along its own cached stack residual
    text_output_used: bool = False
    #: why the family has no token level (no :meth:`token_processor`), for the error that refuses it
    token_refusal: str = ""
    #: why the token level cannot run with the sequence sharded (xDiT's Ulysses / Ring), if so:
    #: ``enable_xslim_xdit`` refuses it there before any work starts
    token_sequence_parallel_refusal: str = ""

    def token_refusal_for(self, model: nn.Module) -> str:
        """Why token refresh cannot run on this particular model ("" when it can): checked when
        X-Slim is enabled, so that a config with token steps is refused before any work starts
        rather than at its first token step (e.g. SD3.5 Medium's dual-attention blocks). The
        default: the family's :attr:`token_refusal` if it has no :meth:`token_processor`."""
        if type(self).token_processor is ModelAdapter.token_processor:
            return self.token_refusal or "the family has no token processor"
        return ""

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        raise NotImplementedError

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        """The step probe: block 0's normalised, modulated image input (TeaCache's indicator)."""
        raise NotImplementedError

    def self_attention(self, block: nn.Module) -> nn.Module:
        """The block's self-attention module (the one that gets a K/V cache)."""
        raise NotImplementedError

    def token_attentions(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """The block's attention modules that get a token processor (each with K/V recorders on
        its ``to_k``/``to_v``, restored on detach): the self-attention (:meth:`self_attention`),
        plus, for a family whose other attentions read the image tokens as keys or take image-token
        queries (LTX-2's audio-video cross-attentions), those."""
        return (self.self_attention(block),)

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: Any) -> Callable:
        """A processor computing attention for a subset of tokens against a K/V cache."""
        raise NotImplementedError

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep as a float (first batch element), used to tell CFG branches apart."""
        t = kwargs.get("timestep")
        if t is None:
            try:
                t = inspect.signature(model.forward).bind(*args, **kwargs).arguments.get("timestep")
            except TypeError:
                t = None
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0].item()) if t.numel() else None
        return float(t)

    # ------------------------------------------------------------------ generic helpers
    def parse_call(self, stack: BlockStack, sig: inspect.Signature, args: tuple, kwargs: dict) -> BlockCall:
        """The call's streams, read from the positional or keyword arguments (the arguments are
        bound to ``sig`` only if a stream is not found that way)."""
        img = _get_arg(sig, args, kwargs, stack.img_arg)
        txt = _get_arg(sig, args, kwargs, stack.txt_arg) if stack.txt_arg else None
        call = BlockCall(img=img, txt=txt, args=args, kwargs=kwargs, signature=sig, stack=stack)
        if img is _MISSING or txt is _MISSING:  # unusual call: bind (raises on a bad call)
            call.img = call.bound.arguments[stack.img_arg]
            call.txt = call.bound.arguments.get(stack.txt_arg) if stack.txt_arg else None
        return call

    def reference_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Which image-stream tokens of this call are a conditioning image rather than the output
        (a bool mask over the image tokens, e.g. FLUX Kontext's reference image), or ``None``
        when every image token is output. Token refresh selects among the output tokens only:
        the reference tokens keep the K/V of the last full step, and the model's output for them
        is discarded (:meth:`~xslim_xdit.decision.DecisionRoom._select_output_tokens`)."""
        return None

    def select_samples(self, call: BlockCall, index: torch.Tensor) -> BlockCall:
        """The block call restricted to the batch rows ``index`` (per-sample decisions run the
        samples that compute a block as a sub-batch, :mod:`xslim_xdit.batch`).

        Every tensor argument whose first dimension is the batch (the image stream's) is
        indexed, at the top level and inside dicts; anything else (RoPE tables passed as a tuple,
        scalars, broadcast tensors of size 1) is shared. A family whose blocks take a shared
        tensor whose first dimension can equal the batch, or a per-sample tensor laid out
        otherwise, overrides this.

        Example:
            >>> import torch
            >>> from xslim_xdit.adapters import adapter_named
            >>> ad = adapter_named("flux")
            >>> stack = BlockStack("double", None, txt_arg="encoder_hidden_states")  # type: ignore[arg-type]
            >>> sig = inspect.signature(lambda hidden_states, encoder_hidden_states, temb, image_rotary_emb: 0)
            >>> rope = (torch.ones(70, 4), torch.ones(70, 4))
            >>> call = ad.parse_call(stack, sig, (), dict(hidden_states=torch.zeros(3, 64, 8),
            ...     encoder_hidden_states=torch.zeros(3, 6, 8), temb=torch.arange(3.0), image_rotary_emb=rope))
            >>> sub = ad.select_samples(call, torch.tensor([0, 2]))
            >>> tuple(sub.img.shape), sub.kwargs["temb"].tolist(), sub.kwargs["image_rotary_emb"] is rope
            ((2, 64, 8), [0.0, 2.0], True)
        """
        batch = call.img.shape[0]

        def rows(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.index_select(0, index) if value.dim() >= 1 and value.shape[0] == batch else value
            if isinstance(value, dict):
                return {k: rows(v) for k, v in value.items()}
            return value

        args = tuple(rows(a) for a in call.args)
        kwargs = {k: rows(v) for k, v in call.kwargs.items()}
        img = call.img.index_select(0, index)
        txt = call.txt.index_select(0, index) if call.txt is not None else None
        return BlockCall(
            img=img, txt=txt, args=args, kwargs=kwargs, signature=call.signature, stack=call.stack
        )

    @staticmethod
    def split_output(stack: BlockStack, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if stack.output == "img":
            return out, None
        if stack.output == "txt_img":
            return out[1], out[0]
        return out[0], out[1]

    @staticmethod
    def make_output(stack: BlockStack, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        if stack.output == "img":
            return img
        if stack.output == "txt_img":
            return txt, img
        return img, txt


# The registry imports ModelAdapter from here; it is re-exported for the family modules, which
# import register_adapter from .base (hence at the end, once ModelAdapter exists).
from .registry import (  # noqa: E402, F401
    UnsupportedModelError,
    adapter_for,
    adapter_named,
    discover_adapters,
    family_presets,
    register_adapter,
    registered_adapters,
    rescale_polynomials,
)
