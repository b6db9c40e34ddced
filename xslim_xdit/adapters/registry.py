"""The adapter registry: :func:`register_adapter`, the package's families found by
:func:`discover_adapters`, and the lookups (:func:`adapter_for` by model class,
:func:`adapter_named` by family name, the families' presets and rescale polynomials).

Re-exported by :mod:`xslim_xdit.adapters.base` and :mod:`xslim_xdit.adapters`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import ModelAdapter

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
