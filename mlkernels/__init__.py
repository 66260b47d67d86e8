"""mlkernels: fast, exact, differentiable PyTorch ops for multi-label image recognition.

import mlkernels
mlkernels.ops.decode_boxes(deltas, anchors)   # CPU or CUDA tensors
mlkernels.build_info()                         # how the extension was built
"""

from __future__ import annotations

import torch

from ._loader import load_extension

_C = load_extension()

from . import _build_config, nn, ops, reference  # noqa: E402  (ops register fake kernels on import)
from . import metrics as metrics  # noqa: E402
from ._build_config import VERSION as __version__  # noqa: E402
from .ops._checks import ShapeError  # noqa: E402

# MLKERNELS_EMULATOR=1 at build time: torch.ops.mlkernels_emulated.* (the CUDA kernels on the CPU
# grid emulator, for the tests) have CPU kernels. Builds from before the switch always had them.
EMULATOR_COMPILED: bool = bool(getattr(_build_config, "WITH_EMULATOR", True))


def registered_ops() -> list[str]:
    """Names of the ops in the ``torch.ops.mlkernels`` namespace, sorted."""
    prefix = "mlkernels::"
    names = {
        n[len(prefix) :].split(".")[0]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith(prefix)
    }
    return sorted(names)


def build_info() -> dict:
    """How this copy of mlkernels was built, and what it runs with.

    Returns a dict with: ``version``, ``torch_built_against``, ``torch_running``,
    ``cuda_compiled`` (bool), ``cuda_archs`` (list of "8.0"-style strings),
    ``emulator_compiled`` (bool: ``torch.ops.mlkernels_emulated.*``, the CUDA kernels on the CPU
    grid emulator, were built in; tests only, ``MLKERNELS_EMULATOR=1``), ``sanitizers``
    (``["address", "undefined"]`` for ``make sanitize``'s build, else ``[]``),
    ``cuda_available`` (a GPU is visible now), ``cpu_threads`` (ATen/OpenMP intra-op threads)
    and ``ops`` (the registered op names).
    """
    return {
        "version": __version__,
        "torch_built_against": _C.torch_version,
        "torch_running": torch.__version__,
        "cuda_compiled": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(";") if a],
        "emulator_compiled": EMULATOR_COMPILED,
        "sanitizers": [s for s in getattr(_build_config, "SANITIZERS", "").split(",") if s],
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "ops": registered_ops(),
    }


__all__ = [
    "ShapeError",
    "build_info",
    "nn",
    "ops",
    "reference",
    "registered_ops",
    "__version__",
]
