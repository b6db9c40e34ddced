"""``xslim-xdit show FILE.json``: a calibration result or a statistics file
(:meth:`~xslim_xdit.stats.CacheStatistics.to_json`) as a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .info import PROG


def show_text(path: str | Path, run: int | None = None) -> str:
    """The table ``xslim-xdit show`` prints for a calibration or statistics JSON file.

    Example:
        >>> import os, tempfile
        >>> from xslim_xdit.stats import CacheStatistics
        >>> path = os.path.join(tempfile.mkdtemp(), "stats.json")
        >>> _ = CacheStatistics().to_json(path)
        >>> print(show_text(path))  # doctest: +NORMALIZE_WHITESPACE
        statistics ...stats.json
        step kind   indicator    error  blocks    tokens  FLOPs
        steps 0: full 0, block 0, token 0, skip 0 | FLOPs computed 100.0% (theoretical 1.00x) | cache 0.00 MiB | collectives 0
    """
    from ..calibration import CalibrationResult
    from ..stats import CacheStatistics

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if isinstance(d, dict) and "records" in d:
        stats = CacheStatistics.from_dict(d)
        return f"statistics {path}\n{stats.table(run)}"
    if isinstance(d, dict) and "schedule" in d:
        return f"calibration {path}\n{CalibrationResult.load(path).table()}"
    raise ValueError(
        f"{path}: neither a calibration result (CalibrationResult.save: a 'schedule' key) nor statistics "
        "(CacheStatistics.to_json: a 'records' key)"
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not Path(args.file).is_file():
        parser.error(f"FILE: no such file: {args.file}")
    try:
        print(show_text(args.file, args.run))
    except ValueError as e:  # ConfigError is a ValueError
        print(f"{PROG} show: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    """The ``show`` subparser."""
    p = sub.add_parser(
        "show",
        help="print a calibration or statistics JSON as a table",
        description="Print a calibration result (CalibrationResult.save) or cache statistics "
        "(CacheStatistics.to_json) as the table CacheStatistics.table() prints.",
    )
    p.add_argument("file", metavar="FILE", help="a calibration or statistics JSON file")
    p.add_argument("--run", type=int, default=None, help="statistics: which run (default the last)")
    p.set_defaults(subparser=p)
