"""What the engine needs to know about a model family, and nothing about the algorithm.

An adapter says: which block stacks the transformer has and in which order; for a block call,
which argument is the image-token stream and which (if any) the text stream, and how the block
returns them; how to compute the step probe (block 0's modulated input); and which attention
modules get a token-refresh processor. Adding a model is one file in this package with one
``ModelAdapter`` subclass registered with :func:`register_adapter`: :func:`discover_adapters`
imports every module of the package, so no list names the families.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
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


_REGISTRY: dict[str, type[ModelAdapter]] = {}  # by family name, in registration order
_DISCOVERED = False


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter available to :func:`adapter_for`, its presets to
    ``XSlimConfig.from_preset`` and its rescale polynomial to ``XSlimConfig(rescale=name)``.

    Registering again a class of the same module and name (a module imported twice) replaces it;
    another class claiming a registered family name is refused.

    Example:
        >>> from xslim_xdit.adapters import ModelAdapter, register_adapter
        >>> register_adapter(type("Nameless", (ModelAdapter,), {}))
        Traceback (most recent call last):
        ...
        ValueError: name: an adapter needs a family name of its own (a non-empty string other than 'base'); got 'base'
    """
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise TypeError(f"cls must be a ModelAdapter subclass; got {cls!r}")
    if not cls.__module__.startswith(f"{__package__}."):
        discover_adapters()  # the package's families first: a clash is then blamed on the newcomer
    name = cls.name
    if not isinstance(name, str) or not name or name == ModelAdapter.name:
        raise ValueError(
            f"name: an adapter needs a family name of its own (a non-empty string other than 'base'); got {name!r}"
        )
    names = cls.model_class_names
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_class_names: a non-empty tuple of class names; got {names!r} on {name!r}")
    for preset in cls.presets:
        if not isinstance(preset, str) or not preset.startswith(f"{name}-"):
            raise ValueError(f"presets: every preset name starts with '{name}-' (the family); got {preset!r}")
    known = _REGISTRY.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"name: family {name!r} is already registered by {known.__module__}.{known.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def discover_adapters() -> None:
    """Import every module of the ``xslim_xdit.adapters`` package once; each registers its own
    adapters, so a new family is a new file and nothing else.

    Example:
        >>> from xslim_xdit.adapters import discover_adapters, registered_adapters
        >>> discover_adapters()
        >>> "hunyuan_video" in [a.name for a in registered_adapters()]
        True
    """
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True  # before importing: a module that looks an adapter up must not recurse
    try:
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__package__}.{module.name}")
    except BaseException:
        _DISCOVERED = False
        raise


def registered_adapters() -> tuple[type[ModelAdapter], ...]:
    """Every registered adapter class, the package's own first (they are discovered before a
    family from elsewhere registers).

    Example:
        >>> from xslim_xdit.adapters import registered_adapters
        >>> {"dit", "flux", "hunyuan_video", "pixart"} <= {a.name for a in registered_adapters()}
        True
    """
    discover_adapters()
    return tuple(_REGISTRY.values())


def adapter_named(name: str) -> ModelAdapter:
    """The adapter of the family called ``name``.

    Example:
        >>> from xslim_xdit.adapters import adapter_named
        >>> adapter_named("pixart").model_class_names
        ('PixArtTransformer2DModel',)
    """
    discover_adapters()
    if name not in _REGISTRY:
        raise ValueError(f"family must be one of {sorted(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]()


def family_presets() -> dict[str, Mapping[str, Any]]:
    """Every registered family's presets, by preset name (what :data:`xslim_xdit.PRESETS` shows).

    Example:
        >>> from xslim_xdit.adapters import family_presets
        >>> family_presets()["flux-fast"]["token_ratio"]
        0.7
    """
    return {p: fields for cls in registered_adapters() for p, fields in cls.presets.items()}


def rescale_polynomials() -> dict[str, tuple[float, ...]]:
    """Every registered family's rescale polynomial, by family name (``XSlimConfig(rescale=name)``).

    Example:
        >>> from xslim_xdit.adapters import rescale_polynomials
        >>> len(rescale_polynomials()["flux"])
        5
    """
    return {c.name: tuple(c.rescale_polynomial) for c in registered_adapters() if c.rescale_polynomial}


class UnsupportedModelError(TypeError):
    """No adapter handles this model class."""


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for a transformer, found by class name along its MRO (so wrappers and
    subclasses such as xfuser's are matched too).

    Example:
        >>> from xslim_xdit.adapters import adapter_for
        >>> from xslim_xdit.testing import tiny_model
        >>> adapter_for(tiny_model("hunyuan_video")).name
        'hunyuan_video'
    """
    adapters = registered_adapters()
    target = model
    # xfuser wraps the diffusers module; look through `.module` wrappers.
    for _ in range(3):
        names = {c.__name__ for c in type(target).__mro__}
        for cls in adapters:
            if names & set(cls.model_class_names):
                return cls()
        inner = getattr(target, "module", None)
        if not isinstance(inner, nn.Module):
            break
        target = inner
    supported = sorted(n for c in adapters for n in c.model_class_names)
    raise UnsupportedModelError(
        f"model: no X-Slim adapter for {type(model).__name__}; supported transformer classes: {supported}"
    )
