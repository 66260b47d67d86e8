"""Shared by the tests: the implementations under test (``Impl``), input generators, asserts.

Every op has up to three implementations, tested with the same assertions:

- ``cpu``: the CPU kernels (``torch.ops.mlkernels`` on CPU tensors);
- ``emulated``: the CUDA kernels' code run on the CPU grid emulator
  (``torch.ops.mlkernels_emulated``: the same schemas, CPU tensors only), marked ``emulated``;
- ``cuda``: the CUDA kernels (``torch.ops.mlkernels`` on CUDA tensors), marked ``cuda`` and skipped
  without a GPU.

A test takes ``impl`` and is decorated with ``@ALL_IMPLS`` (raw ops: all three), ``@DEVICE_IMPLS``
(the ``mlkernels.ops`` wrappers and autograd: cpu and cuda) or ``impl_params(...)`` for a subset.
It builds its inputs on the CPU, runs ``impl.call("op", *args)`` (inputs moved to ``impl.device``,
outputs back on the CPU) or ``ops.fn(*impl.to(...))``, and compares with references computed on the
CPU. ``impl.assert_matches_cpu`` adds the comparison with the CPU kernels: bitwise for the emulator
(g++ compiles the same math headers), ``assert_close``'s default tolerances for CUDA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from mlkernels.testing import assert_coords_close  # noqa: F401  (re-exported for the tests)


@dataclass(frozen=True)
class Impl:
    """One implementation of the raw ops: the op namespace it calls and where its tensors live."""

    name: str  # the test id: "cpu", "emulated" or "cuda"
    namespace: str  # "mlkernels" or "mlkernels_emulated"
    device: str  # "cpu" or "cuda"

    def __repr__(self) -> str:
        return self.name

    @property
    def ops(self):
        """The op namespace: ``torch.ops.mlkernels`` or ``torch.ops.mlkernels_emulated``."""
        return getattr(torch.ops, self.namespace)

    @property
    def emulated(self) -> bool:
        """The grid emulator: every CUDA thread is run one after the other, so slow at scale."""
        return self.namespace == "mlkernels_emulated"

    @property
    def cpu_tolerance(self) -> dict:
        """assert_close's arguments for a result of this implementation against the CPU kernels'."""
        return {} if self.device == "cuda" else {"rtol": 0, "atol": 0}

    def to(self, *values):
        """The tensors in ``values`` (also inside lists and tuples) on this implementation's
        device; one value for one argument, a tuple for several."""
        moved = tuple(_to(v, self.device) for v in values)
        return moved[0] if len(values) == 1 else moved

    def op(self, name: str):
        """The raw op ``name`` as a function of CPU tensors that returns CPU tensors."""
        return lambda *args: self.call(name, *args)

    def call(self, name: str, *args):
        """The raw op ``name`` run on this implementation: tensors in ``args`` are moved to its
        device, the outputs come back on the CPU."""
        return _to(getattr(self.ops, name)(*(_to(a, self.device) for a in args)), "cpu")

    def assert_matches_cpu(self, got, name: str, *args, **kwargs) -> None:
        """``got`` (this implementation's CPU-side outputs of ``name(*args)``) against the CPU
        kernels on the same CPU ``args``: bitwise for the emulator, within ``assert_close``'s
        default tolerances for CUDA; ``kwargs`` go to ``assert_close`` (e.g. equal_nan)."""
        if self.name == "cpu":
            return
        expected = getattr(torch.ops.mlkernels, name)(*args)
        torch.testing.assert_close(got, expected, **self.cpu_tolerance, **kwargs)


def _to(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


IMPLS = {
    "cpu": Impl("cpu", "mlkernels", "cpu"),
    "emulated": Impl("emulated", "mlkernels_emulated", "cpu"),
    "cuda": Impl("cuda", "mlkernels", "cuda"),
}
_MARKS = {"cpu": (), "emulated": (pytest.mark.emulated,), "cuda": (pytest.mark.cuda,)}


def impl_params(*names: str) -> list:
    """pytest params for the named implementations, with their marks and ids."""
    return [pytest.param(IMPLS[n], marks=_MARKS[n], id=n) for n in names]


# The raw ops on all three implementations; the mlkernels.ops wrappers (and autograd) on devices.
ALL_IMPLS = pytest.mark.parametrize("impl", impl_params("cpu", "emulated", "cuda"))
DEVICE_IMPLS = pytest.mark.parametrize("impl", impl_params("cpu", "cuda"))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(enabled)
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def random_boxes(
    n: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    size: float = 100.0,
    min_side: float = 1.0,
    max_side: float = 50.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """n boxes (x1, y1, x2, y2) with corners in [offset, offset + size] and sides in
    [min_side, max_side]; min_side <= 0 allows degenerate (zero or negative-width) boxes."""
    x1y1 = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size + offset
    sides = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    sides = sides * (max_side - min_side) + min_side
    return torch.cat([x1y1, x1y1 + sides], dim=1).to(dtype)


def assert_raises(fn, args: tuple, error: type[Exception], message: str, mode: str) -> None:
    """fn(*args) raises `error` matching `message`, in eager mode or ("fake") on fake tensors,
    where the op's fake kernel must repeat the C++ checks."""
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake_mode:

            def fake(a):
                if isinstance(a, torch.Tensor):
                    return fake_mode.from_tensor(a)
                return [fake(t) for t in a] if isinstance(a, list) else a

            args = tuple(fake(a) for a in args)
            with pytest.raises(error, match=message):
                fn(*args)
    else:
        with pytest.raises(error, match=message):
            fn(*args)


def run_opcheck(impl, name: str, args: tuple) -> None:
    """torch.library.opcheck of torch.ops.mlkernels.<name> with args moved to impl's device
    (tensors detached, keeping requires_grad)."""
    args = tuple(
        impl.to(a.detach()).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    )
    torch.library.opcheck(getattr(torch.ops.mlkernels, name), args)


def sgd_step_losses(model, batch: dict, seed: int | None = None, lr: float = 0.05):
    """One SGD step of a models/ model on ``batch``: the loss before and after it, as floats.
    Asserts that the step's backward reached every parameter. ``seed`` reseeds torch before each
    loss, for models whose loss samples (the same draws both times)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def loss():
        if seed is not None:
            torch.manual_seed(seed)
        return model.loss(model(batch["images"]), batch)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
    optimizer.step()
    return before.item(), loss().item()
