"""Loads the compiled extension, with an error that says what to do when it cannot."""

from __future__ import annotations

import importlib

import torch

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (or `make install`)"


def load_extension():
    """Import mlkernels._C (which registers torch.ops.mlkernels.*) and return it."""
    try:
        config = importlib.import_module("mlkernels._build_config")
    except ImportError as error:
        raise ImportError(
            f"mlkernels: the compiled extension is missing; {REBUILD_HINT}"
        ) from error
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"mlkernels: the extension was built against torch {config.TORCH_VERSION}, "
            f"but torch {torch.__version__} is installed; {REBUILD_HINT}"
        )
    try:
        module = importlib.import_module("mlkernels._C")
    except (ImportError, OSError) as error:
        raise ImportError(
            f"mlkernels: loading the extension (built against torch {config.TORCH_VERSION}, "
            f"running torch {torch.__version__}) failed: {error}; {REBUILD_HINT}"
        ) from error
    if module.torch_version != torch.__version__:
        raise ImportError(
            f"mlkernels: the extension was built against torch {module.torch_version}, "
            f"but torch {torch.__version__} is installed; {REBUILD_HINT}"
        )
    return module
