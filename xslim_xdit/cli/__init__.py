"""The ``xslim-xdit`` console script: ``info``, ``calibrate`` and ``show``.

- ``xslim-xdit info [--json]``: the package version; per model family its transformer classes,
  the reuse levels it supports and the xDiT layouts and diffusers pipelines tested with it
  (:func:`xslim_xdit.support.support_table`); the installed torch, diffusers, transformers and
  xfuser (read from the installed metadata: xfuser is not imported); the accelerator, if any.
- ``xslim-xdit calibrate PIPELINE --prompts FILE --target-speedup X --output OUT.json``: loads a
  diffusers pipeline from a local folder, runs :func:`xslim_xdit.calibration.calibrate` on one
  seeded run per prompt (progress bars on stderr) and saves the result
  (:meth:`~xslim_xdit.calibration.CalibrationResult.save`); every argument is checked before
  the model is loaded.
- ``xslim-xdit show FILE.json``: a calibration result or a statistics file
  (:meth:`~xslim_xdit.stats.CacheStatistics.to_json`) as a table.

Each subcommand is a module of this package (:mod:`~xslim_xdit.cli.info`,
:mod:`~xslim_xdit.cli.calibrate`, :mod:`~xslim_xdit.cli.show`): its subparser (``add_parser``) and
what it runs (``run``). ``python -m xslim_xdit.cli`` runs the same :func:`main`.

Example:
    >>> main(["info"])  # doctest: +ELLIPSIS
    xslim-xdit ...
    model families ...
    0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import calibrate, info, show
from .info import PROG, info_dict
from .show import show_text

__all__ = ["build_parser", "info_dict", "main", "show_text"]

#: the subcommands, in the order ``--help`` lists them
COMMANDS = {"info": info, "calibrate": calibrate, "show": show}


def build_parser() -> argparse.ArgumentParser:
    """The ``xslim-xdit`` argument parser, one subparser per command.

    Example:
        >>> p = build_parser()
        >>> a = p.parse_args(["calibrate", "ckpt", "--prompts", "p.txt", "--target-speedup", "3", "--output", "o.json"])
        >>> a.command, a.target_speedup, a.steps, a.strategy
        ('calibrate', 3.0, 28, 'optimal')
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="X-Slim caching for diffusion transformers (diffusers and xDiT)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,calibrate,show}")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xslim-xdit`` command line; returns the exit status.

    Example:
        >>> main(["info", "--json"])  # doctest: +ELLIPSIS
        {
          "version": ...
        0
    """
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args, args.subparser)
