"""One thin adapter per model family. :func:`adapter_for` picks the one for a transformer."""

from .base import (
    BlockCall,
    BlockStack,
    ModelAdapter,
    UnsupportedModelError,
    adapter_for,
    register_adapter,
)

__all__ = [
    "BlockCall",
    "BlockStack",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "register_adapter",
]
