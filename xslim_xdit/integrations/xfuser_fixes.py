"""The narrow patches that let xfuser 0.7.0 run without an accelerator, one per place it assumes
one; :mod:`.xfuser_compat` installs them (only where no accelerator exists, only when asked).

Patches (all gated on "no accelerator"; see :func:`describe`):

``envs.get_device_version``
    Raises "No Accelerators" on CPU and is reached at import (``config.py`` evaluates
    ``CUDA_VERSION``).  Patched to return ``None`` (xfuser's own value for MPS/NPU), so
    ``CUDA_VERSION`` parses as 0.0; it is only compared in ``check_env()``, which is called
    for CUDA graphs only, and still refuses them.
``envs.get_torch_distributed_backend``
    Raises on CPU; ``parallel_state.init_distributed_environment`` calls it whenever no
    backend is passed (``create_config()`` passes none).  Patched to return ``"gloo"``,
    the value xfuser already uses for MPS.
``envs.get_device`` / ``get_device_name`` / ``get_platform``
    Only touched on a CUDA/ROCm *build* of torch without a visible device, where they would
    return ``cuda`` on the strength of ``torch.version.cuda``.  Patched to the CPU values.
``envs.PACKAGES_CHECKER.check_long_ctx_attn``
    The real check is "``torch.cuda.is_available()`` (or NPU) and yunchang importable";
    without it ``config.py`` rejects Ulysses/Ring degrees > 1 and every module caches
    ``has_long_ctx_attn=False``.  Patched to the yunchang import test alone, and the cached
    ``packages_info["has_long_ctx_attn"]`` is recomputed before any other module reads it.
``model_executor.layers.usp.PROCESS_GROUP``
    Set to ``None`` at import when CUDA is absent (guarding ``from yunchang.globals import
    PROCESS_GROUP``).  USP's Ulysses all-to-all and Ring pass read ``PROCESS_GROUP.ULYSSES_PG``
    and ``.RING_PG``; patched to yunchang's (CPU-safe) global, which
    ``parallel_state.initialize_model_parallel`` fills through ``set_seq_parallel_pg``.
``core.distributed.group_coordinator.synchronize``
    ``torch.cuda.synchronize`` bound at import, called twice in PipeFusion's shape exchange
    (``_communicate_shapes``) to fence the CUDA stream after ``batch_isend_irecv``.  On CPU,
    gloo's ``Work.wait()`` already blocks the host until the transfer is done, so there is
    nothing to fence: patched to a no-op.
``group_coordinator.PipelineGroupCoordinator._communicate_shapes`` / ``_pipeline_isend(_skip)``
    PipeFusion's asynchronous patch phase deadlocks under gloo (see
    ``_fix_pipefusion_gloo_p2p`` and ``docs/xfuser_cpu.md``): a gloo send completes only when
    the receiver posts its receive and ``wait()`` blocks the host, so the shape sends that
    both stages issue before posting their receives wait on each other; and a gloo ``isend``
    whose Work is dropped (as ``pipeline_isend`` does) is never delivered.  Patched, for
    gloo groups only: shape sends are kept but not waited; isend Work is kept until done.
``core.distributed.attention_backend.ATTENTION_FUNCTION_REGISTRY[SDPA_FLASH]``
    Ring attention merges partial results through the log-sum-exp, so ``runtime_state``
    rejects backends that return none (SDPA, SDPA_MATH, ...) when ``ring_degree > 1``: that
    check is correct and left alone.  The LSE-returning SDPA_FLASH backend calls
    ``aten._scaled_dot_product_flash_attention``, which is CUDA-only.  Patched so that CPU
    tensors go to ``aten._scaled_dot_product_flash_attention_for_cpu`` (same math, returns
    ``(output, logsumexp)`` with the same layout); other devices keep the original.  Select it
    with ``attention_backend="SDPA_FLASH"`` (done by :mod:`.xfuser_runtime` when ring > 1).
``model_executor.pipelines.pipeline_flux.xFuserFluxPipeline.prepare_run``
    Builds ``torch.Generator(device="cuda")`` for its warm-up call.  Patched to use
    ``envs.get_device_name()``, as ``base_pipeline.prepare_run`` already does.
``model_executor.models.runner_models.base_model...._local_onload_device``
    Returns ``cuda:<local_rank>`` for CPU offload (runner path only).  Patched to
    ``envs.get_device(local_rank)``, i.e. ``cpu``.

Not patched (documented in ``docs/xfuser_cpu.md``): the cache-dit adapter's
``torch.cuda.current_device()`` (dbcache), the legacy yunchang ``LongContextAttention`` path
(``core/long_ctx_attention``; USP does not use it with torch >= 2.5), fp8 comms, head
balance, CUDA graphs, timing code using ``torch.cuda.Event``.

Example:
    >>> sorted(_FIXUPS)[0]
    'xfuser.core.distributed.attention_backend'
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

# (module name, attribute) -> original value, for inspection and tests.
ORIGINALS: dict[tuple[str, str], Any] = {}
# Human-readable record of the patches actually performed in this process.
_DONE: list[str] = []


def _yunchang_available() -> bool:
    """The second half of xfuser's ``check_long_ctx_attn``: yunchang's USP API imports."""
    try:
        from yunchang import (  # noqa: F401
            LongContextAttention,
            LongContextAttentionQKVPacked,
            UlyssesAttention,
            ring_flash_attn_func,
            set_seq_parallel_pg,
        )
    except ImportError:
        return False
    return True


def _set(module: types.ModuleType, attr: str, value: Any, why: str) -> None:
    key = (module.__name__, attr)
    if key not in ORIGINALS:
        ORIGINALS[key] = getattr(module, attr, None)
    setattr(module, attr, value)
    _DONE.append(f"{module.__name__}.{attr}: {why}")


# --------------------------------------------------------------------------- fixups


def _fix_envs(envs: types.ModuleType) -> None:
    # Real check: returns the CUDA/HIP/MUSA version string, None for MPS/NPU, raises otherwise.
    # config.py evaluates CUDA_VERSION (= parse(get_device_version() or "0.0")) at import.
    def get_device_version() -> str | None:
        return None

    _set(envs, "get_device_version", get_device_version, "no accelerator: None (CUDA_VERSION 0.0)")

    # Real check: nccl/mccl/hccl per vendor, gloo for MPS, raises otherwise.
    def get_torch_distributed_backend() -> str:
        return "gloo"

    _set(envs, "get_torch_distributed_backend", get_torch_distributed_backend, "no accelerator: gloo")

    # On a CUDA/ROCm build of torch without a device, xfuser would still pick cuda tensors.
    if envs.get_device_name() != "cpu":

        def get_device(local_rank: int) -> torch.device:
            return torch.device("cpu")

        def get_device_name() -> str:
            return "cpu"

        def get_platform() -> str:
            return "cpu"

        _set(envs, "get_device", get_device, "accelerator build without a device: cpu")
        _set(envs, "get_device_name", get_device_name, "accelerator build without a device: cpu")
        _set(envs, "get_platform", get_platform, "accelerator build without a device: cpu")

    # Real check: (torch.cuda.is_available() or NPU) and yunchang imports. yunchang's USP
    # pieces that xfuser uses (process-group globals, set_seq_parallel_pg) work on CPU.
    checker = envs.PACKAGES_CHECKER
    cls = type(checker)
    if not getattr(cls.check_long_ctx_attn, "_xslim_cpu_compat", False):
        ORIGINALS.setdefault(
            (envs.__name__, "PackagesEnvChecker.check_long_ctx_attn"), cls.check_long_ctx_attn
        )

        def check_long_ctx_attn(self: Any) -> bool:
            return _yunchang_available()

        check_long_ctx_attn._xslim_cpu_compat = True  # type: ignore[attr-defined]
        cls.check_long_ctx_attn = check_long_ctx_attn
        _DONE.append(f"{envs.__name__}.PackagesEnvChecker.check_long_ctx_attn: yunchang import only")
    # PACKAGES_CHECKER was instantiated at envs import; recompute the cached value before
    # config.py, parallel_state.py, attention_processor.py ... copy it into module globals.
    checker.packages_info["has_long_ctx_attn"] = checker.check_long_ctx_attn()


def _fix_usp(usp: types.ModuleType) -> None:
    # Real code: `if torch.cuda.is_available() or envs._is_npu(): from yunchang.globals
    # import PROCESS_GROUP else: PROCESS_GROUP = None`.
    if getattr(usp, "PROCESS_GROUP", None) is None and _yunchang_available():
        from yunchang.globals import PROCESS_GROUP

        _set(usp, "PROCESS_GROUP", PROCESS_GROUP, "yunchang PROCESS_GROUP (Ulysses/Ring groups)")


def _fix_group_coordinator(gc: types.ModuleType) -> None:
    # Real code: `from torch.cuda import synchronize`, called after each batch_isend_irecv in
    # _communicate_shapes to fence the CUDA stream. gloo work.wait() blocks the host already.
    def synchronize(device: Any = None) -> None:
        return None

    _set(gc, "synchronize", synchronize, "no-op (gloo waits are host-blocking)")
    _fix_pipefusion_gloo_p2p(gc.PipelineGroupCoordinator)


def _is_gloo(group: Any) -> bool:
    import torch.distributed as dist

    try:
        return str(dist.get_backend(group)) == "gloo"
    except Exception:  # not a c10d group we can query: keep xfuser's behaviour
        return False


def _keep(coord: Any, work: Any, *tensors: torch.Tensor) -> None:
    """Hold a gloo send's Work (and its tensors) until it completes; drop finished ones."""
    pending: list[tuple[Any, tuple[torch.Tensor, ...]]] = coord.__dict__.setdefault(
        "_xslim_pending_sends", []
    )
    pending[:] = [p for p in pending if not p[0].is_completed()]
    pending.append((work, tensors))


def _fix_pipefusion_gloo_p2p(cls: type) -> None:
    """PipeFusion's asynchronous patch phase deadlocks or loses messages under gloo.

    Two differences between gloo and NCCL point-to-point, both measured here:

    1. A gloo send completes only once the receiver has posted the matching receive
       (rendezvous), and ``Work.wait()`` blocks the host.  ``_communicate_shapes`` waits on
       its sends.  In the async phase each stage sends the shape of every new patch (and of
       the encoder states) the first time, *before* it posts the receives (``recv_next``)
       the other stage is waiting on: first stage blocks sending patch 1's shape, last stage
       blocks sending patch 0's shape, nobody receives.  NCCL returns from ``wait()``
       without blocking the host, so the same order runs there.
       Fix (gloo only): the shape *sends* are posted and kept, not waited; the shape
       *receives* are still waited (their value is needed).  Message order per peer, which
       is what matches sends to receives, is unchanged.
    2. ``pipeline_isend`` / ``pipeline_isend_skip`` discard the Work of their ``isend``.
       With gloo, a send whose Work is garbage-collected before the peer posts its receive
       is never delivered (the receiver waits forever).  Fix (gloo only): keep the Work
       until it has completed.
    """
    import torch.distributed as dist

    orig_shapes = cls._communicate_shapes
    orig_isend = cls._pipeline_isend
    orig_isend_skip = cls._pipeline_isend_skip
    if getattr(orig_shapes, "_xslim_cpu_compat", False):
        return

    def _communicate_shapes(
        self: Any, tensor_send_to_next: Any = None, recv_prev: bool = False
    ) -> torch.Size:
        if not _is_gloo(self.device_group):
            return orig_shapes(self, tensor_send_to_next=tensor_send_to_next, recv_prev=recv_prev)
        # Same messages, same groups and same order as xfuser's version (dims first, then
        # shapes); only the waits on sends are gone.
        recv_dim = recv_work = None
        if recv_prev:
            recv_dim = torch.empty((1), device=self.device, dtype=torch.int64)
            recv_work = dist.irecv(recv_dim, self.prev_rank, group=self.device_group)
        if tensor_send_to_next is not None:
            dim = torch.tensor(tensor_send_to_next.dim(), device=self.device, dtype=torch.int64)
            _keep(self, dist.isend(dim, self.next_rank, group=self.device_group), dim)
        if recv_work is not None:
            recv_work.wait()

        recv_shape = None
        if recv_prev:
            recv_shape = torch.empty(torch.Size(recv_dim), device=self.device, dtype=torch.int64)
            recv_work = dist.irecv(recv_shape, self.prev_rank, group=self.device_group)
        if tensor_send_to_next is not None:
            shape = torch.tensor(tensor_send_to_next.size(), device=self.device, dtype=torch.int64)
            _keep(self, dist.isend(shape, self.next_rank, group=self.device_group), shape)
        if recv_prev:
            recv_work.wait()
            return torch.Size(recv_shape)
        return torch.Size([0, 0, 0])

    def _pipeline_isend(self: Any, tensor: torch.Tensor) -> Any:
        work = orig_isend(self, tensor)
        if _is_gloo(self.device_group):
            _keep(self, work, tensor)
        return work

    def _pipeline_isend_skip(self: Any, tensor: torch.Tensor) -> Any:
        work = orig_isend_skip(self, tensor)
        if _is_gloo(self.skip_device_group):
            _keep(self, work, tensor)
        return work

    for fn in (_communicate_shapes, _pipeline_isend, _pipeline_isend_skip):
        fn._xslim_cpu_compat = True  # type: ignore[attr-defined]
    name = f"{cls.__module__}.{cls.__name__}"
    ORIGINALS.setdefault((name, "_communicate_shapes"), orig_shapes)
    ORIGINALS.setdefault((name, "_pipeline_isend"), orig_isend)
    ORIGINALS.setdefault((name, "_pipeline_isend_skip"), orig_isend_skip)
    cls._communicate_shapes = _communicate_shapes
    cls._pipeline_isend = _pipeline_isend
    cls._pipeline_isend_skip = _pipeline_isend_skip
    _DONE.append(f"{name}._communicate_shapes: gloo: shape sends not waited (async PipeFusion deadlock)")
    _DONE.append(f"{name}._pipeline_isend(_skip): gloo: keep send Work alive until completed")


def _fix_attention_backend(ab: types.ModuleType) -> None:
    registry = ab.ATTENTION_FUNCTION_REGISTRY
    key = ab.AttentionBackendType.SDPA_FLASH
    original = registry.get(key)
    if original is None or getattr(original, "_xslim_cpu_compat", False):
        return
    aten = torch.ops.aten

    def _sdpa_flash_attn_call(
        query: torch.Tensor,
        key_: torch.Tensor,
        value: torch.Tensor,
        dropout_p: float,
        is_causal: bool,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Real code: aten._scaled_dot_product_flash_attention (CUDA kernel only).
        if query.device.type != "cpu":
            return original(query, key_, value, dropout_p, is_causal, attention_kwargs)
        output, softmax_lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key_, value, dropout_p=dropout_p, is_causal=is_causal
        )
        return output, softmax_lse

    _sdpa_flash_attn_call._xslim_cpu_compat = True  # type: ignore[attr-defined]
    ORIGINALS.setdefault((ab.__name__, "ATTENTION_FUNCTION_REGISTRY[SDPA_FLASH]"), original)
    registry[key] = _sdpa_flash_attn_call
    _DONE.append(f"{ab.__name__}.ATTENTION_FUNCTION_REGISTRY[SDPA_FLASH]: CPU flash kernel with LSE")


def _fix_pipeline_flux(pf: types.ModuleType) -> None:
    cls = pf.xFuserFluxPipeline
    from xfuser.envs import get_device_name

    # Same body as xfuser 0.7.0's prepare_run, except the generator device: the original
    # hard-codes "cuda" (or "npu"); base_pipeline.prepare_run uses get_device_name().
    def prepare_run(self: Any, input_config: Any, steps: int = 3, sync_steps: int = 1) -> None:
        prompt = [""] * input_config.batch_size if input_config.batch_size > 1 else ""
        state = pf.get_runtime_state()
        warmup_steps = state.runtime_config.warmup_steps
        state.runtime_config.warmup_steps = sync_steps
        self.__call__(
            height=input_config.height,
            width=input_config.width,
            prompt=prompt,
            num_inference_steps=steps,
            max_sequence_length=input_config.max_sequence_length,
            generator=torch.Generator(device=get_device_name()).manual_seed(42),
            output_type=input_config.output_type,
        )
        state.runtime_config.warmup_steps = warmup_steps

    ORIGINALS.setdefault((pf.__name__, "xFuserFluxPipeline.prepare_run"), cls.prepare_run)
    cls.prepare_run = prepare_run
    _DONE.append(f"{pf.__name__}.xFuserFluxPipeline.prepare_run: generator on get_device_name()")


def _fix_base_model(bm: types.ModuleType) -> None:
    from xfuser.envs import get_device

    for name in dir(bm):
        cls = getattr(bm, name)
        if not isinstance(cls, type) or cls.__module__ != bm.__name__:
            continue
        if "_local_onload_device" not in cls.__dict__:
            continue

        # Real code: torch.device(f"cuda:{get_world_group().local_rank}").
        def _local_onload_device(self: Any) -> torch.device:
            return get_device(bm.get_world_group().local_rank)

        ORIGINALS.setdefault((bm.__name__, f"{name}._local_onload_device"), cls._local_onload_device)
        cls._local_onload_device = _local_onload_device
        _DONE.append(f"{bm.__name__}.{name}._local_onload_device: envs.get_device (cpu)")


_FIXUPS: dict[str, Callable[[types.ModuleType], None]] = {
    "xfuser.envs": _fix_envs,
    "xfuser.model_executor.layers.usp": _fix_usp,
    "xfuser.core.distributed.group_coordinator": _fix_group_coordinator,
    "xfuser.core.distributed.attention_backend": _fix_attention_backend,
    "xfuser.model_executor.pipelines.pipeline_flux": _fix_pipeline_flux,
    "xfuser.model_executor.models.runner_models.base_model": _fix_base_model,
}

# Modules that copy ``has_long_ctx_attn`` (or test CUDA) into globals at import: if one is
# already loaded when the compat layer is applied, its cached value is stale.
_IMPORT_TIME_READERS: Sequence[str] = (
    "xfuser.config.config",
    "xfuser.core.distributed.parallel_state",
    "xfuser.core.distributed.group_coordinator",
    "xfuser.model_executor.layers.attention_processor",
    "xfuser.model_executor.models.transformers.transformer_flux",
)
