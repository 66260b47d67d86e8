"""``replacing_ops``: run code that calls mlkernels with the pure-PyTorch twins instead."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.Lock()


def _targets() -> list[tuple[object, str, object]]:
    """(module, attribute, reference function) for every place mlkernels code looks an op up."""
    from .. import nn, ops, reference
    from ..nn import beam_search as nn_beam_search
    from ..nn import roi_align as nn_roi_align

    del nn  # imported so that the layer modules below are loaded
    names = sorted(set(ops.__all__) & set(reference.__all__))
    targets = [(ops, name, getattr(reference, name)) for name in names]
    # The two layers that do not look their op up in mlkernels.ops when called: RoIAlign calls a
    # module global (torch.fx.wrap needs one, so the layer stays one node in fx graphs) and
    # LabelBeamSearch drives the raw advance and backtrack itself, so that its errors name the
    # layer.
    targets.append((nn_roi_align, "roi_align", reference.roi_align))
    targets.append((nn_beam_search, "_raw_advance", reference.beam_search_advance))
    targets.append((nn_beam_search, "_raw_backtrack", reference.beam_search_backtrack))
    return targets


@contextlib.contextmanager
def replacing_ops() -> Iterator[None]:
    """Within the block, every ``mlkernels.ops`` function and every ``mlkernels.nn`` layer runs
    its ``mlkernels.reference`` twin: the compiled kernels are not called.

    For A/B comparisons of speed and results (the trainer's ``--reference-ops``)::

        with mlkernels.reference.replacing_ops():
            slow = model(images)

    It patches module attributes, so it affects every thread of the process while it is active
    and code that bound an op to a name of its own beforehand (``from mlkernels.ops import
    roi_align``) keeps the compiled op; call ops as ``mlkernels.ops.roi_align`` to be covered.
    Blocks do not nest.
    """
    if not _lock.acquire(blocking=False):
        raise RuntimeError("replacing_ops: already active (the blocks do not nest)")
    saved = []
    try:
        for module, name, twin in _targets():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, twin)
        yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)
        _lock.release()
