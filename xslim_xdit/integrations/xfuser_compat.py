"""Run xfuser 0.7.0 (xDiT) on a machine without an accelerator.

xfuser assumes a GPU (or NPU, MUSA, MPS) in a handful of places; on a CPU-only machine
``import xfuser`` itself fails.  :func:`apply_xfuser_cpu_compat` patches exactly those
places, each narrowly, and only when no accelerator is present.  It must be called
*before* ``import xfuser`` because several xfuser modules read the environment at import
time; it installs an import hook that patches each module right after it has executed.

The patches, each with its reason, are in :mod:`.xfuser_fixes` (and :func:`describe` lists
those applied in this process).

:func:`patch_flux1_pad_alias` separately fixes an xfuser bug that is not CPU-specific.

Example:
    >>> from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat
    >>> apply_xfuser_cpu_compat()  # doctest: +SKIP
    True
    >>> import xfuser  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .xfuser_fixes import _DONE, _FIXUPS, _IMPORT_TIME_READERS, ORIGINALS, _set, _yunchang_available  # noqa: F401 (ORIGINALS: re-exported for inspection)

__all__ = [
    "apply_xfuser_cpu_compat",
    "describe",
    "has_accelerator",
    "is_applied",
    "patch_flux1_pad_alias",
]

_LOCK = threading.RLock()
_APPLIED = False


def has_accelerator() -> bool:
    """Whether a device xfuser knows how to use is present.

    Mirrors the devices ``xfuser/envs.py`` recognises: CUDA and ROCm (both through
    ``torch.cuda.is_available()``), MUSA, Apple MPS and Ascend NPU.  Intel XPU is not one
    of them; xfuser has no XPU branch, so XPU does not count.

    Example:
        >>> from xslim_xdit.integrations.xfuser_compat import has_accelerator
        >>> isinstance(has_accelerator(), bool)
        True
    """
    if torch.cuda.is_available():
        return True
    for name in ("musa", "npu"):
        mod = getattr(torch, name, None)
        try:
            if mod is not None and mod.is_available():
                return True
        except Exception:  # a half-installed vendor extension is not an accelerator
            pass
    try:
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


# --------------------------------------------------------------------------- import hook


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the fixup on the fresh module."""

    def __init__(self, loader: Any, fixup: Callable[[types.ModuleType], None]) -> None:
        self._loader = loader
        self._fixup = fixup

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            self._fixup(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for inspect
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


class _XfuserCompatFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loaders of the modules listed in ``_FIXUPS``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        fixup = _FIXUPS.get(fullname)
        if fixup is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
            spec.loader = _PatchingLoader(spec.loader, fixup)
        return spec


_FINDER = _XfuserCompatFinder()


# --------------------------------------------------------------------------- public API


def apply_xfuser_cpu_compat(force: bool | None = None) -> bool:
    """Make xfuser 0.7.0 importable and runnable on a CPU-only machine (gloo).

    Call it before ``import xfuser``.  Idempotent.  When an accelerator is present (see
    :func:`has_accelerator`) nothing is patched and ``False`` is returned.  Modules already
    imported are patched in place; modules imported later are patched by an import hook
    right after they execute, before anything else reads them.

    Args:
        force: ``None`` (default) decides from :func:`has_accelerator`; ``True`` patches even
            with an accelerator present (for tests only); ``False`` patches nothing.

    Returns:
        ``True`` if the compat layer is active in this process.

    Example:
        >>> from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat
        >>> if apply_xfuser_cpu_compat():  # doctest: +SKIP
        ...     print("xfuser runs on CPU with gloo")
        >>> import xfuser  # doctest: +SKIP
    """
    global _APPLIED
    with _LOCK:
        if _APPLIED:
            return True
        wanted = (not has_accelerator()) if force is None else force
        if not wanted:
            return False
        stale = [m for m in _IMPORT_TIME_READERS if m in sys.modules]
        if stale:
            import warnings

            warnings.warn(
                "apply_xfuser_cpu_compat() called after xfuser modules were imported "
                f"({', '.join(stale)}); their import-time copies of the environment are stale. "
                "Call it before `import xfuser`.",
                RuntimeWarning,
                stacklevel=2,
            )
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        # Patch what is already loaded, in _FIXUPS order (envs first).
        for name, fixup in _FIXUPS.items():
            module = sys.modules.get(name)
            if module is not None:
                fixup(module)
        _APPLIED = True
        return True


def is_applied() -> bool:
    """Whether :func:`apply_xfuser_cpu_compat` has activated the compat layer.

    Example:
        >>> from xslim_xdit.integrations.xfuser_compat import is_applied
        >>> isinstance(is_applied(), bool)
        True
    """
    return _APPLIED


_PATCH_LIST: tuple[str, ...] = (
    "xfuser.envs.get_device_version -> None (import-time CUDA_VERSION check; raises on CPU)",
    "xfuser.envs.get_torch_distributed_backend -> 'gloo' (raises on CPU)",
    "xfuser.envs.get_device/get_device_name/get_platform -> cpu (only on a CUDA/ROCm build without a device)",
    "xfuser.envs.PackagesEnvChecker.check_long_ctx_attn -> yunchang importable (drops the CUDA requirement)",
    "xfuser.model_executor.layers.usp.PROCESS_GROUP -> yunchang.globals.PROCESS_GROUP (None on CPU)",
    "xfuser.core.distributed.group_coordinator.synchronize -> no-op (torch.cuda.synchronize)",
    "xfuser...PipelineGroupCoordinator._communicate_shapes -> gloo: shape sends not waited (async PipeFusion deadlock)",
    "xfuser...PipelineGroupCoordinator._pipeline_isend/_pipeline_isend_skip -> gloo: keep send Work until completed",
    "xfuser.core.distributed.attention_backend SDPA_FLASH -> aten._scaled_dot_product_flash_attention_for_cpu on CPU",
    "xfuser.model_executor.pipelines.pipeline_flux.xFuserFluxPipeline.prepare_run -> generator on envs device",
    "xfuser.model_executor.models.runner_models.base_model.*._local_onload_device -> envs.get_device",
)


def describe() -> list[str]:
    """List the patches: the ones performed in this process if any, otherwise all candidates.

    Example:
        >>> from xslim_xdit.integrations.xfuser_compat import describe
        >>> len(describe()) > 0
        True
    """
    return list(_DONE) if _DONE else list(_PATCH_LIST)


def patch_flux1_pad_alias() -> bool:
    """Fix ``xFuserFlux1Transformer2DWrapper._pad_to_sp_divisible`` (xfuser bug, any device).

    ``xFuserFlux1Transformer2DWrapper.forward`` calls ``self._pad_to_sp_divisible`` but the
    method is named ``pad_to_sp_divisible``: an ``AttributeError`` whenever the number of
    image tokens is not divisible by the sequence-parallel degree.  This adds the alias.
    Note that the padding tokens are zeros that take part in attention as keys (the Flux1
    processor passes no ``valid_kv_len``), so a padded run is *not* numerically equal to an
    unpadded one; keep image tokens divisible by the SP degree for exact results.

    Requires ``xfuser`` to be importable (call :func:`apply_xfuser_cpu_compat` first on CPU).

    Returns:
        ``True`` if the alias was added, ``False`` if the method already existed.

    Example:
        >>> from xslim_xdit.integrations.xfuser_compat import patch_flux1_pad_alias
        >>> patch_flux1_pad_alias()  # doctest: +SKIP
        True
    """
    tf = importlib.import_module("xfuser.model_executor.models.transformers.transformer_flux")
    cls = tf.xFuserFlux1Transformer2DWrapper
    if hasattr(cls, "_pad_to_sp_divisible"):
        return False
    cls._pad_to_sp_divisible = cls.pad_to_sp_divisible
    _DONE.append(f"{tf.__name__}.xFuserFlux1Transformer2DWrapper._pad_to_sp_divisible: alias")
    return True
