"""Where ranks agree: exact reductions of indicators and integer decisions.

On one device every call is a no-op (:class:`LocalSync`). Under torch.distributed,
:class:`GroupSync` reduces over the process groups that share a tensor, compares the run
fingerprint at the start of each run (:class:`RankMismatchError`), and a failed collective raises
:class:`XSlimCollectiveError` and ends the process (:mod:`xslim_xdit.parallel.failure`).
"""

from .fingerprint import RankMismatchError
from .sync import DecisionSync, GroupSync, LocalSync, XSlimCollectiveError

__all__ = ["DecisionSync", "GroupSync", "LocalSync", "RankMismatchError", "XSlimCollectiveError"]
