"""``xslim-xdit info``: the package version, the supported families and levels, the installed
packages and the accelerator.

Example:
    >>> d = info_dict()
    >>> sorted(d)
    ['accelerator', 'families', 'packages', 'version']
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from importlib import metadata
from typing import Any

PROG = "xslim-xdit"
_PACKAGES = ("torch", "diffusers", "transformers", "xfuser")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _accelerator() -> dict[str, Any]:
    """The accelerator torch sees, of any kind (CUDA, ROCm, XPU, MPS, ...): through
    ``torch.accelerator`` and the kind's device module, not a device literal."""
    import torch

    if not torch.accelerator.is_available():
        return {"available": False, "kind": None, "devices": []}
    kind = torch.accelerator.current_accelerator().type
    module = torch.get_device_module(kind)
    count = torch.accelerator.device_count()
    names = getattr(module, "get_device_name", None)
    devices = [names(i) if names is not None else f"{kind}:{i}" for i in range(count)]
    if getattr(torch.version, "hip", None):
        kind = "rocm"  # a ROCm build's accelerator presents itself as CUDA
    return {"available": True, "kind": kind, "devices": devices}


def info_dict() -> dict[str, Any]:
    """What ``xslim-xdit info --json`` prints: version, families, packages, accelerator.

    Example:
        >>> d = info_dict()
        >>> sorted(d), {"dit", "flux"} <= {f["family"] for f in d["families"]}
        (['accelerator', 'families', 'packages', 'version'], True)
    """
    from .. import __version__
    from ..adapters import registered_adapters
    from ..support import support_table

    presets = {cls.name: sorted(cls.presets) for cls in registered_adapters()}
    families = []
    for row in support_table():
        d = row.to_dict()
        d["presets"] = presets.get(row.family, [])
        families.append(d)
    return {
        "version": __version__,
        "families": families,
        "packages": {name: _installed(name) for name in _PACKAGES},
        "accelerator": _accelerator(),
    }


def _info_text(d: dict[str, Any]) -> str:
    def listed(items: Sequence[str]) -> str:
        return ", ".join(items) if items else "none"

    lines = [f"{PROG} {d['version']}", "model families (levels; tested on CPU with tiny models):"]
    for f in d["families"]:
        lines.append(f"  {f['family']}: {listed(f['model_classes'])}")
        lines.append(f"    levels: {listed(f['levels'])}")
        lines.append(f"    xDiT layouts tested: {listed(f['xdit_layouts'])}")
        lines.append(f"    diffusers pipelines tested: {listed(f['pipelines'])}")
        lines.append(f"    presets: {listed(f['presets'])}")
        if f["note"]:
            lines.append(f"    note: {f['note']}")
    pk = d["packages"]
    lines.append("packages: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in pk.items()))
    acc = d["accelerator"]
    if acc["available"]:
        lines.append(
            f"accelerator: {acc['kind']}, {len(acc['devices'])} device(s): {', '.join(acc['devices'])}"
        )
    else:
        lines.append("accelerator: none (CPU only)")
    return "\n".join(lines)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    d = info_dict()
    print(json.dumps(d, indent=2) if args.json else _info_text(d))
    return 0


def add_parser(sub: Any) -> None:
    """The ``info`` subparser."""
    p = sub.add_parser(
        "info",
        help="version, supported models and levels, installed packages, accelerator",
        description="The package version; per model family its transformer classes, reuse levels, "
        "the xDiT layouts and diffusers pipelines tested; torch / diffusers / transformers / xfuser "
        "versions (xfuser is not imported); whether an accelerator is present.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    p.set_defaults(subparser=p)
