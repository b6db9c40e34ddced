"""The run fingerprint: every setting that changes a decision, as integers ranks can compare.

Ranks that decide together must run the same controller on the same number of steps; otherwise
they enter different collectives and hang, or act on a decision their own caches cannot serve.
At the start of each run every rank hashes each such field to an int64, the ranks exchange the
vectors in one all-gather (:meth:`~xslim_xdit.parallel.GroupSync.check_run`), and any difference
ends every rank at once with :class:`RankMismatchError` naming the fields and the ranks.

Hashes are exact: the same value gives the same integer on every rank, whatever the platform
(``repr`` of ints, strings, tuples and frozen dataclasses is deterministic, and ``repr`` of a
float round-trips exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

from ..schedule import ConfigError

#: int64 slots exchanged per rank: slot 0 is the hash of the field names (a different package
#: version could have different fields), then one slot per field in name order, then zeros
WIDTH = 64


class RankMismatchError(ConfigError):
    """Ranks that decide together were configured differently (the message names the fields and
    the ranks). Raised on every rank of the group at the same point, at the start of a run."""


def stable_hash(text: str) -> int:
    """A signed 64-bit hash of ``text``, the same in every process (unlike ``hash``).

    Example:
        >>> stable_hash("warn=0.12") == stable_hash("warn=0.12")
        True
    """
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def run_fingerprint(config: Any, num_steps: int, **extra: Any) -> dict[str, str]:
    """The readable value of every field that changes a decision: all of ``config``'s dataclass
    fields (a field added later is covered without touching this function), the run's step count
    and ``extra`` (the controller kind, the depth, ...).

    Example:
        >>> from xslim_xdit import XSlimConfig
        >>> fp = run_fingerprint(XSlimConfig(polish="block"), 10, controller="online")
        >>> fp["polish"], fp["num_steps"], fp["controller"]
        ("'block'", '10', "'online'")
    """
    values = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    values["num_steps"] = repr(int(num_steps))
    for key, value in extra.items():
        if key in values:
            raise ValueError(f"extra fingerprint field {key!r} clashes with a config field")
        values[key] = repr(value)
    return values


def fingerprint_vector(values: Mapping[str, str]) -> list[int]:
    """``WIDTH`` int64 hashes: the field names, then each field (``name=value``) in name order.

    Example:
        >>> len(fingerprint_vector({"warn": "0.12"}))
        64
    """
    names = sorted(values)
    if len(names) > WIDTH - 1:
        raise ValueError(f"a run fingerprint holds at most {WIDTH - 1} fields; got {len(names)}")
    vec = [stable_hash("\x00".join(names))] + [stable_hash(f"{n}={values[n]}") for n in names]
    return vec + [0] * (WIDTH - len(vec))


def mismatch(values: Mapping[str, str], gathered: list[list[int]], ranks: list[int]) -> str | None:
    """None when every rank's vector equals this rank's; otherwise what differs, naming the fields
    and, per field, which ranks hold which hash (the same text on every rank: it is computed from
    the gathered vectors alone, plus this rank's readable values).

    Example:
        >>> v = {"polish": "'block'"}
        >>> a, b = fingerprint_vector(v), fingerprint_vector({"polish": "'none'"})
        >>> mismatch(v, [a, b], [0, 1])
        "field 'polish' differs: ranks [0] hold one value, ranks [1] another"
    """
    if all(g == gathered[0] for g in gathered):
        return None
    if any(g[0] != gathered[0][0] for g in gathered):
        groups = _ranks_by(lambda g: g[0], gathered, ranks)
        return (
            "the ranks run different versions of the configuration (its field names differ: "
            + ", ".join(f"ranks {rs}" for rs in groups)
            + "); install the same xslim-xdit on every rank"
        )
    index = {n: i for i, n in enumerate(sorted(values), start=1)}
    parts = []
    for name in differing_fields(values, gathered):
        groups = _ranks_by(lambda g, i=index[name]: g[i], gathered, ranks)
        parts.append(
            f"field {name!r} differs: ranks {groups[0]} hold one value, "
            + ", ".join(f"ranks {rs} another" for rs in groups[1:])
        )
    return "; ".join(parts)


def differing_fields(values: Mapping[str, str], gathered: list[list[int]]) -> list[str]:
    """The fields whose hash is not the same on every rank (none when the field names differ).

    Example:
        >>> v = {"polish": "'block'", "warn": "0.12"}
        >>> differing_fields(v, [fingerprint_vector(v), fingerprint_vector({**v, "polish": "'none'"})])
        ['polish']
    """
    if any(g[0] != gathered[0][0] for g in gathered):
        return []
    return [n for i, n in enumerate(sorted(values), start=1) if any(g[i] != gathered[0][i] for g in gathered)]


def _ranks_by(key: Any, gathered: list[list[int]], ranks: list[int]) -> list[list[int]]:
    """Ranks grouped by ``key(vector)``, in order of first appearance."""
    out: dict[int, list[int]] = {}
    for g, r in zip(gathered, ranks, strict=True):
        out.setdefault(key(g), []).append(r)
    return list(out.values())
