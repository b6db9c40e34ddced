"""Where ranks agree: exact reductions of indicators and integer decisions.

On one device every call is a no-op (:class:`LocalSync`). Under torch.distributed,
:class:`GroupSync` reduces over the process groups that share a tensor.
"""

from .sync import DecisionSync, GroupSync, LocalSync

__all__ = ["DecisionSync", "GroupSync", "LocalSync"]
