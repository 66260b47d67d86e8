"""``--reference-ops``: run with every mlkernels op replaced by its pure-PyTorch twin.

:func:`reference_ops` swaps ``mlkernels.ops.<name>`` for ``mlkernels.reference.<name>`` for every
public name both modules define, and restores the originals on exit. Code that calls the ops
through the module attribute at call time (``mlkernels.ops.roi_align(...)``, as ``mlkernels.nn``
layers do) then runs the reference; a name bound earlier by ``from mlkernels.ops import roi_align``
keeps the compiled op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def swappable_names() -> list[str]:
    """The public op names that ``mlkernels.ops`` and ``mlkernels.reference`` both define."""
    import mlkernels.ops as ops
    import mlkernels.reference as reference

    names = getattr(ops, "__all__", None) or [n for n in dir(ops) if not n.startswith("_")]
    return sorted(
        name
        for name in names
        if callable(getattr(ops, name, None)) and callable(getattr(reference, name, None))
    )


@contextmanager
def reference_ops(enabled: bool = True) -> Iterator[list[str]]:
    """Within the block, ``mlkernels.ops.<name>`` is ``mlkernels.reference.<name>``.

    Yields the swapped names (empty when ``enabled`` is False, which makes the block a no-op).
    Not thread-safe: the swap is process-wide while the block runs.
    """
    if not enabled:
        yield []
        return
    import mlkernels.ops as ops
    import mlkernels.reference as reference

    names = swappable_names()
    originals = {name: getattr(ops, name) for name in names}
    try:
        for name in names:
            setattr(ops, name, getattr(reference, name))
        yield names
    finally:
        for name, function in originals.items():
            setattr(ops, name, function)
