"""Run megatron-core on a machine without a GPU, unchanged and with unchanged numerics.

megatron-core assumes CUDA throughout: it places buffers with
``device=torch.cuda.current_device()``, moves tensors with ``.cuda()``, creates CUDA
streams and events in the MoE token dispatcher, keeps its tensor-parallel RNG in the CUDA
generator, pins host memory, and checks ``tensor.type() == 'torch.cuda.FloatTensor'`` in the
optimizer. None of that is about numbers; it is about where tensors live.

This module makes the CPU play the part of "the current CUDA device" for one process:

* A :class:`torch.overrides.TorchFunctionMode` rewrites every CUDA device request (a
  ``device=`` argument, ``Tensor.cuda()``, ``Tensor.to("cuda")``, an integer device index) to
  the CPU, drops ``pin_memory=True``, and answers ``Tensor.type()`` with the CUDA type name
  megatron's type checks expect. Being a function mode, it sees factory calls that have no
  tensor argument (``torch.empty(..., device=...)``), which plain monkey-patching of a few
  functions would miss.
* ``torch.cuda`` entry points megatron calls (``current_device``, streams, events, RNG state,
  NVTX ranges, memory statistics) get CPU stand-ins. The CUDA RNG state *is* the CPU default
  generator's state, so megatron's RNG tracker forks and restores the generator that CPU
  kernels really draw from, and seeding stays reproducible.
* ``torch.distributed.all_to_all_single`` accepts split sizes given as tensors or numpy
  arrays (megatron only converts them to host lists when the tensor ``is_cuda``), and gloo's
  list ``all_gather`` gets uneven shapes by padding (gloo rejects them; NCCL does not).
* Names megatron leaves undefined when TransformerEngine fails to import are set to
  ``None`` so its own "TE absent" branches are taken.

Nothing here changes a computed value: every rewrite is about placement, streams or
bookkeeping. The runtime is installed only when CUDA is absent (:func:`maybe_install`),
before megatron-core builds anything, and is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_installed = False
_lock = threading.Lock()
_mode: _CudaToCpuMode | None = None

_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal for torch factories and Tensor.to.
    return isinstance(device, int) and not isinstance(device, bool)


def _redirect(value: Any) -> Any:
    return _CPU if _is_cuda_device(value) else value


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """``torch.autograd.backward`` without its torch-function dispatch (same arguments)."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = (
        () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    )
    grads = _make_grads(
        tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False
    )
    _engine_run_backward(
        tensors,
        grads,
        create_graph if retain_graph is None else retain_graph,
        create_graph,
        inputs,
        allow_unreachable=True,
        accumulate_grad=True,
    )


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests to the CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        # A mode is popped while its handler runs. Backward runs Python autograd functions
        # (megatron's all-to-all, ...) that place tensors on "the CUDA device", so the engine
        # must run with this mode active again.
        if func is torch.autograd.backward:
            with self:
                return _run_backward(*args, **kwargs)
        if func is torch.Tensor.backward:
            tensor, *rest = args
            names = ("gradient", "retain_graph", "create_graph", "inputs")
            bound = dict(zip(names, rest, strict=False)) | kwargs
            with self:
                return _run_backward(
                    tensor,
                    bound.get("gradient"),
                    bound.get("retain_graph"),
                    bound.get("create_graph", False),
                    bound.get("inputs"),
                )
        if "device" in kwargs:
            kwargs["device"] = _redirect(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False

        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _Event:
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    """Stand-in for ``torch.cuda.Event``; timing events report wall-clock milliseconds."""

    def __init__(self, enable_timing: bool = False, *args: Any, **kwargs: Any) -> None:
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._time = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        if self._time is None or end._time is None:
            return 0.0
        return (end._time - self._time) * 1000.0


_DEFAULT_STREAM = _Stream()


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back into here.
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _Stream
    cuda.ExternalStream = _Stream
    cuda.Event = _Event
    cuda.stream = _stream_context
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.set_stream = lambda stream: None
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.random.get_rng_state = _get_rng_state
    cuda.random.set_rng_state = _set_rng_state
    cuda.manual_seed = _manual_seed
    # torch.manual_seed seeds the CPU generator and then calls manual_seed_all.
    cuda.manual_seed_all = lambda seed: None
    cuda.random.manual_seed = _manual_seed
    cuda.default_generators = (torch.default_generator,)
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_stats = lambda device=None: {}
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.mark = lambda msg: None


def _as_split_list(sizes: Any) -> Any:
    if sizes is None or isinstance(sizes, list):
        return sizes
    if isinstance(sizes, torch.Tensor):
        return [int(v) for v in sizes.tolist()]
    if hasattr(sizes, "tolist"):  # numpy array
        return [int(v) for v in sizes.tolist()]
    return list(sizes)


def _patch_distributed() -> None:
    original_a2a = dist.all_to_all_single
    original_all_gather = dist.all_gather

    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        return original_a2a(
            output,
            input,
            output_split_sizes=_as_split_list(output_split_sizes),
            input_split_sizes=_as_split_list(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or tensor.dim() == 0:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # gloo requires equal shapes: pad along dim 0 to the largest and slice back.
        longest = max(t.shape[0] for t in tensor_list)
        padded_in = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype)
        padded_in[: tensor.shape[0]] = tensor
        padded_out = [torch.empty_like(padded_in) for _ in tensor_list]
        original_all_gather(padded_out, padded_in, group=group)
        for dst, src in zip(tensor_list, padded_out, strict=True):
            dst.copy_(src[: dst.shape[0]])
        return None

    dist.all_to_all_single = all_to_all_single
    dist.all_gather = all_gather


def _patch_megatron_missing_te_names() -> None:
    """Define the names megatron leaves unbound when TransformerEngine is absent."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return
    for name in ("te_general_gemm",):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


class _DropCpuRngWarning(logging.Filter):
    """megatron warns when the CPU RNG moves inside its CUDA RNG fork; here they are one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _require_triton_for_new_megatron() -> None:
    """megatron-core >= 0.17 imports triton at module level, even for CPU-only code paths."""
    import importlib.metadata
    import importlib.util

    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) >= (0, 17) and importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            f"megatron-core {version} imports triton, which is not installed. Install it "
            "(pip install triton; it imports without a GPU) or use megatron-core 0.16.1."
        )


def is_installed() -> bool:
    """Whether the CPU runtime is active in this process."""
    return _installed


def install() -> None:
    """Install the CPU runtime in this process (idempotent). Prefer :func:`maybe_install`."""
    global _installed, _mode
    with _lock:
        if _installed:
            return
        _require_triton_for_new_megatron()
        _patch_torch_cuda()
        _patch_distributed()
        _patch_megatron_missing_te_names()
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _installed = True
    logger.debug("megatron-core CPU runtime installed")


def maybe_install() -> bool:
    """Install the CPU runtime when CUDA is absent. Returns whether it is active."""
    if torch.cuda.is_available():
        return False
    install()
    return True
