"""One module per model family, each holding everything about its family (see
``docs/adding_a_model.md``). :func:`adapter_for` picks the adapter for a transformer and
:func:`adapter_named` the adapter of a family; both find the families by importing every module
of this package (:func:`discover_adapters`), so a new family is one new file."""

from .base import (
    BlockCall,
    BlockStack,
    ModelAdapter,
    UnsupportedModelError,
    adapter_for,
    adapter_named,
    discover_adapters,
    family_presets,
    register_adapter,
    registered_adapters,
    rescale_polynomials,
)
from .family import FamilyDescription

__all__ = [
    "BlockCall",
    "BlockStack",
    "FamilyDescription",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "adapter_named",
    "discover_adapters",
    "family_presets",
    "register_adapter",
    "registered_adapters",
    "rescale_polynomials",
]
