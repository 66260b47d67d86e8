"""Training checkpoints: written atomically, read back with errors a user can act on.

A checkpoint is one ``torch.save`` file holding a dict (``FORMAT`` names its version):

- ``"model"``, ``"model_name"``, ``"class_names"``, ``"args"`` (the trainer's options as a dict);
- ``"optimizer"``, ``"scheduler"``, ``"scaler"`` (state dicts; ``scaler`` is None without fp16);
- ``"epoch"``: the number of epochs completed;
- ``"rng"``: the Python, NumPy, torch CPU and CUDA generator states at the end of that epoch;
- ``"metrics"``: the per-epoch history (a list of dicts) and ``"best_map"``.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "mlkernels-trainer-checkpoint-v1"
REQUIRED_KEYS = ("model", "model_name", "class_names", "args", "epoch")


class CheckpointError(Exception):
    """A checkpoint file that is missing, truncated, not one of ours, or from another model."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus ``"format"``) to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk, then renamed
    over ``path`` with ``os.replace``: a run killed mid-write leaves the previous checkpoint whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU).

    Args:
        path: the file, or a run folder (its ``last.pt`` is read).
        model_name: when given, the checkpoint must be of that model.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, not a trainer checkpoint,
            or of another model than ``model_name``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the RNG states hold NumPy arrays; only load checkpoints you trust.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (torch.load: {str(error).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a models.train checkpoint (expected format {FORMAT!r}, "
            f"got {found!r})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if model_name is not None and state["model_name"] != model_name:
        raise CheckpointError(
            f"checkpoint {path} is of model {state['model_name']!r}, not of --model {model_name!r}"
        )
    state["path"] = str(path)
    return state


def rng_states() -> dict[str, Any]:
    """Every random generator's state: Python, NumPy, torch CPU and (when present) CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
