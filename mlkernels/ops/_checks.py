"""Argument checks for the fake (meta) kernels, word for word those of csrc/common/checks.h.

Messages take one form: "<op>: <argument> must be <expected>, got <what came>".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

FLOAT_TYPES = (torch.float32, torch.float64)
HALF_TYPES = (torch.float16, torch.bfloat16)
# C++'s at::isIntegralType(type, /*includeBool=*/false).
INTEGER_TYPES = (
    *(torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
    *(torch.uint16, torch.uint32, torch.uint64),
)
# Weights are checked against float32's normal range in every dtype, so none becomes 0 or inf.
FLOAT32_NORMAL_MIN, FLOAT32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


class ShapeError(RuntimeError, AssertionError):
    """A tensor argument of the wrong shape. A RuntimeError, like every error of the C++ ops'
    checks, and also an AssertionError, which torchvision raises there (``torch._assert``), so
    code written for torchvision's ops catches ours unchanged."""


def shape_str(t: torch.Tensor) -> str:
    return "Tensor[" + ", ".join(str(s) for s in t.shape) + "]"


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def num_str(value: float) -> str:
    """A double as C++'s ostream prints it (six significant digits): 0.333333, 1e+300, -nan."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return f"{value:g}"


def nums_str(values: Sequence[float]) -> str:
    """A list of doubles as c10 prints an ArrayRef<double>: [1, 0.5, inf]."""
    return "[" + ", ".join(num_str(v) for v in values) + "]"


def check(ok: bool, message: str, error: type[Exception] = RuntimeError) -> None:
    """Raise ``error(message)`` unless ``ok``. Through ``torch._check`` (``_check_value`` for
    ValueError, ``_check_type`` for TypeError), so that a condition on symbolic sizes under
    ``torch.compile(dynamic=True)`` becomes a guard or runtime assert instead of failing."""
    if error is ValueError:
        torch._check_value(ok, lambda: message)
    elif error is TypeError:
        torch._check_type(ok, lambda: message)
    elif error is RuntimeError:
        torch._check(ok, lambda: message)
    elif not ok:
        raise error(message)


def symbolic_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` runs a wrapper on Proxies, which no Python check can
    look at: the wrappers then only record the op's call (its C++ checks run when the traced
    module runs). False under ``torch.export`` and ``torch.compile``, whose fake tensors the
    checks can look at."""
    return is_fx_symbolic_tracing()


def check_defined(op: str, arg: str, t: torch.Tensor | None) -> None:
    """C++'s check_defined: a raw op given None for a tensor gets an undefined tensor."""
    check(t is not None, f"{op}: {arg} must be a Tensor, got None")


def check_tensor(op: str, arg: str, value: object) -> None:
    """Public wrappers call this first, so a non-tensor fails with the op's name in the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a Tensor, got {type(value).__name__}")
    if value.is_quantized:
        raise NotImplementedError(
            f"{op}: {arg} must be a float tensor, got a quantized {dtype_str(value.dtype)} tensor "
            "(mlkernels has no quantized kernels, torch deprecates quantized tensors: pass "
            f"{arg}.dequantize())"
        )


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def as_int(op: str, arg: str, value: object) -> int:
    """``value`` as a Python int (any integer type, not bool), or a TypeError naming op and arg;
    a ValueError when it does not fit the ops' int64."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except (TypeError, RuntimeError):  # RuntimeError: a meta tensor has no value
            pass
        else:
            return check_int64(op, arg, value)
    raise TypeError(f"{op}: {arg} must be an int, got {value!r}")


def check_int64(op: str, arg: str, value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{op}: {arg} must be in [-2**63, 2**63) (an int64), got {value}")
    return value


def as_float(op: str, arg: str, value: object) -> float:
    """``value`` as a Python float (any real number), or a TypeError naming op and arg."""
    if not isinstance(value, (bool, str, bytes)) and value is not None:
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a meta tensor has no value
            pass
    raise TypeError(f"{op}: {arg} must be a number, got {value!r}")


def as_floats(op: str, arg: str, values: object) -> list[float]:
    """A sequence of real numbers as a list of Python floats, or a TypeError naming op and arg."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{op}: {arg} must be a sequence of numbers, got {values!r}")
    return [as_float(op, arg, v) for v in values]


def check_floating(op: str, arg: str, t: torch.Tensor, allow_half: bool = False) -> None:
    allowed = FLOAT_TYPES + (HALF_TYPES if allow_half else ())
    expected = "float16, bfloat16, float32 or float64" if allow_half else "float32 or float64"
    check(t.dtype in allowed, f"{op}: {arg} must be {expected}, got {dtype_str(t.dtype)}")


def check_boxes(op: str, arg: str, t: torch.Tensor, exact_dim: int = -1) -> None:
    ok = t.dim() >= 1 and t.shape[-1] == 4 and (exact_dim < 0 or t.dim() == exact_dim)
    expected = "Tensor[N, 4]" if exact_dim == 2 else "Tensor[..., 4]"
    check(ok, f"{op}: {arg} must be {expected}, got {shape_str(t)}")


def check_same_dtype(op: str, arg_a: str, a: torch.Tensor, arg_b: str, b: torch.Tensor) -> None:
    check(
        a.dtype == b.dtype,
        f"{op}: {arg_b} must have the dtype of {arg_a} ({dtype_str(a.dtype)}), "
        f"got {dtype_str(b.dtype)}",
    )


def check_same_device(op: str, arg_a: str, a: torch.Tensor, arg_b: str, b: torch.Tensor) -> None:
    check(
        a.device == b.device,
        f"{op}: {arg_b} must be on the device of {arg_a} ({a.device}), got {b.device}",
    )


def check_weights(op: str, weights: Sequence[float]) -> None:
    check(
        len(weights) == 4,
        f"{op}: weights must be 4 numbers (wx, wy, ww, wh), got {len(weights)}",
        ValueError,
    )
    check(
        all(FLOAT32_NORMAL_MIN <= w <= FLOAT32_MAX for w in weights),
        f"{op}: weights must be finite and positive (in float32's normal range), "
        f"got {nums_str(weights)}",
        ValueError,
    )


def check_clamp(op: str, clamp: float) -> None:
    check(not math.isnan(clamp), f"{op}: clamp must be a number, got nan", ValueError)


def paired_boxes_shape(
    op: str, first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor
) -> torch.Size:
    """The checks of pair_boxes (csrc/boxes/boxes.h); returns the broadcast shape."""
    check_defined(op, first_name, first)
    check_defined(op, second_name, second)
    check_boxes(op, first_name, first)
    check_boxes(op, second_name, second)
    check_floating(op, first_name, first)
    check_same_dtype(op, first_name, first, second_name, second)
    check_same_device(op, first_name, first, second_name, second)
    try:
        return torch.broadcast_shapes(first.shape, second.shape)
    except RuntimeError:
        raise RuntimeError(
            f"{op}: {first_name} and {second_name} must broadcast to one shape, "
            f"got {shape_str(first)} and {shape_str(second)}"
        ) from None


def allocate_output(
    op: str, like: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """like.new_empty(shape, dtype=dtype), failing as C++'s allocate_output (checks.h) where the
    size does."""
    try:
        return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)
    except RuntimeError as error:
        shape_text = "Tensor[" + ", ".join(str(s) for s in shape) + "]"
        message = str(error).strip().splitlines()[0]
        raise RuntimeError(
            f"{op}: the output {shape_text} could not be allocated ({message})"
        ) from None


def masked_outputs(
    op: str, output_mask: Sequence[bool], *likes: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """A backward op's fake outputs: a contiguous tensor shaped like each input where
    output_mask asks for its gradient, an empty Tensor[0] where it does not (as the kernels)."""
    # The dispatcher refuses another length before a CPU or CUDA kernel runs; a meta call gets here.
    check(
        len(output_mask) == len(likes),
        f"{op}: output_mask must be {len(likes)} bools, got {list(output_mask)}",
    )
    return tuple(
        like.new_empty(like.shape) if wanted else like.new_empty((0,))
        for wanted, like in zip(output_mask, likes, strict=True)
    )


def no_double_backward(backward_op: str) -> None:
    """Make differentiating ``mlkernels::<backward_op>`` raise. Without an autograd kernel,
    autograd only warns and treats the backward as constant: second derivatives
    (``create_graph=True``, gradient penalties) would come out as silent zeros."""
    op = backward_op.removesuffix("_backward")

    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: second derivatives (double backward) are not implemented")

    torch.library.register_autograd(
        f"mlkernels::{backward_op}", backward, setup_context=_no_context
    )


def _no_context(ctx, inputs, output) -> None:
    pass
