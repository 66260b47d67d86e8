"""Bad-input sweep (issue 7): every public op, every layer and every raw torch.ops.mlkernels op
(the *_backward ops included), called with hypothesis-built bad arguments.

A case is a valid call of one target (small random inputs) with one to three arguments replaced:
wrong ranks, wrong last or first dimensions, other dtypes (int, bool, half, complex, the other
float), a "meta" tensor (standing in for a second device), empty and 0-d tensors, non-contiguous,
transposed and overlapping (expanded, as_strided) layouts, NaN/Inf/huge/negative values, sizes far
beyond memory (expanded, so they cost nothing to build), and huge, negative, None, string, NaN,
bool or wrongly shaped scalar arguments. Each call must

* raise a RuntimeError/ValueError/TypeError/IndexError whose message starts with the op's name
  (``roi_align: ...``) and names one of its arguments; the raw ops may instead raise the
  dispatcher's schema error, which names the op (``mlkernels::roi_align()``) and the argument; or
* return what mlkernels.reference returns for the same input (compared where the reference is
  defined there), with the op's invariants (shapes, dtypes, indices in range), and gradients equal
  to the reference's for the differentiable ops;

and never crash or hang. For the ops, the same call on fake tensors (the register_fake kernels,
what torch.compile runs) must raise the same message or return the same shapes and dtypes.

The sweep runs in a child process (``MLKERNELS_SWEEP_CHILD=1``), so that a segfault or a hang
fails one test rather than the whole suite; in the child every call runs under a watchdog and the
case in flight is written to a file the parent reports. ``pytest -s`` prints the case count.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import mlkernels
from mlkernels import nn, ops, reference
from mlkernels.ops.proposals import ProposeConfig
from mlkernels.ops.roi_align import checked_rois, output_pair

CHILD = os.environ.get("MLKERNELS_SWEEP_CHILD") == "1"
# Examples per target: the "ci" profile (CI=true, see conftest.py) is derandomized and sized for
# CI's time; "dev" hunts with more, at random.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
EXAMPLES = 100 if PROFILE == "ci" else 300
CALL_LIMIT_S = 5.0  # a call slower than this is a hang for the sweep (they take milliseconds)
WATCHDOG_S = 30.0  # a call still running after this kills the child with tracebacks
HUGE = 2**40  # rows no allocator can hold (16 TB of float32 boxes), yet free to build by expand

raw = torch.ops.mlkernels


# ---------------------------------------------------------------------------------------------
# Targets: a valid call, its arguments' kinds, and its reference
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    label: str
    prefixes: tuple[str, ...]  # an error message must start with one of these + ":"
    call: Callable[..., Any]
    make: Callable[[torch.Generator], dict[str, Any]]  # valid keyword arguments
    kinds: dict[str, str]  # argument name -> kind of mutation it gets
    reference: Callable[..., Any] | None = None
    raw_op: str | None = None  # the schema's name, for the dispatcher's own messages
    fake: bool = False  # compare with the fake kernels
    grads: tuple[str, ...] = ()  # floating tensor arguments to differentiate
    check: Callable[[dict[str, Any], Any], None] | None = None  # invariants of a result
    outputs: int | None = None  # compare only the first outputs with the reference's


def _boxes(g: torch.Generator, n: int, dtype=torch.float32, size: float = 40.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1).to(dtype)


def _rois(g: torch.Generator, k: int, images: int, dtype=torch.float32) -> torch.Tensor:
    index = torch.randint(0, images, (k, 1), generator=g).to(torch.float64)
    return torch.cat([index, _boxes(g, k, torch.float64, size=10.0)], 1).to(dtype)


def _randn(g: torch.Generator, *shape: int, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _dtype(g: torch.Generator):
    return torch.float64 if torch.randint(0, 3, (1,), generator=g).item() == 0 else torch.float32


def _anchors_setup(g: torch.Generator) -> dict[str, Any]:
    dtype = _dtype(g)
    anchors = ops.generate_anchors((2, 3), 8, (16.0, 24.0), (0.5, 1.0), dtype=dtype)
    n, a = 2, anchors.shape[0]
    return {
        "anchors": anchors,
        "deltas": _randn(g, n, a, 4, dtype=dtype, scale=0.3),
        "objectness": _randn(g, n, a, dtype=dtype),
        "image_sizes": torch.tensor([[20.0, 30.0], [24.0, 16.0]], dtype=dtype),
    }


def _make_encode(g):
    dtype = _dtype(g)
    return {"boxes": _boxes(g, 5, dtype), "anchors": _boxes(g, 5, dtype), "weights": [1, 1, 2, 2]}


def _make_decode(g):
    dtype = _dtype(g)
    return {
        "deltas": _randn(g, 3, 5, 4, dtype=dtype, scale=0.5),
        "anchors": _boxes(g, 5, dtype),
        "weights": [1.0, 1.0, 1.0, 1.0],
        "clamp": 4.0,
    }


def _make_decode_backward(g):
    args = _make_decode(g)
    grad = _randn(g, 3, 5, 4, dtype=args["deltas"].dtype)
    return {"grad": grad, **args, "output_mask": [True, True]}


def _make_iou(g):
    dtype = _dtype(g)
    return {"boxes1": _boxes(g, 4, dtype), "boxes2": _boxes(g, 6, dtype)}


def _make_nms(g):
    dtype = _dtype(g)
    return {"boxes": _boxes(g, 8, dtype), "scores": _randn(g, 8, dtype=dtype), "iou_threshold": 0.3}


def _make_batched_nms(g):
    args = _make_nms(g)
    idxs = torch.randint(0, 3, (8,), generator=g)
    return {"boxes": args["boxes"], "scores": args["scores"], "idxs": idxs, "iou_threshold": 0.3}


_SETTINGS = {
    "pre_nms_top_n": "int",
    "post_nms_top_n": "int",
    "iou_threshold": "float",
    "min_size": "float",
    "score_threshold": "float",
    "weights": "floats",
    "clamp": "float",
    "append_whole_image": "bool",
}


def _make_propose(g):
    args = _anchors_setup(g)
    args["image_sizes"] = [(20, 30), (24.0, 16)]
    return {
        **args,
        "pre_nms_top_n": 10,
        "post_nms_top_n": 4,
        "iou_threshold": 0.5,
        "min_size": 1e-3,
        "score_threshold": 0.0,
        "weights": (1.0, 1.0, 1.0, 1.0),
        "clamp": 4.0,
        "append_whole_image": bool(torch.randint(0, 2, (1,), generator=g).item()),
    }


def _make_raw_propose(g):
    args = _make_propose(g)
    args["image_sizes"] = torch.tensor(args["image_sizes"], dtype=args["anchors"].dtype)
    args["weights"] = list(args["weights"])
    return args


def _make_propose_backward(g):
    args = _anchors_setup(g)
    n, a = args["deltas"].shape[:2]
    kept = torch.randint(-1, a, (n, 5), generator=g)
    return {
        "grad_boxes": _randn(g, n, 5, 4, dtype=args["deltas"].dtype),
        "anchors": args["anchors"],
        "deltas": args["deltas"],
        "kept_anchors": kept,
        "image_sizes": args["image_sizes"],
        "weights": [1.0, 1.0, 1.0, 1.0],
        "clamp": 4.0,
        "output_mask": [True, True],
    }


def _make_roi_align(g):
    dtype = _dtype(g)
    return {
        "input": _randn(g, 2, 3, 6, 7, dtype=dtype),
        "boxes": _rois(g, 4, 2, dtype),
        "output_size": (2, 3),
        "spatial_scale": 0.5,
        "sampling_ratio": int(torch.randint(-1, 3, (1,), generator=g).item()),
        "aligned": bool(torch.randint(0, 2, (1,), generator=g).item()),
    }


def _make_roi_align_list(g):
    args = _make_roi_align(g)
    dtype = args["input"].dtype
    args["boxes"] = [_boxes(g, 2, dtype, size=10.0), _boxes(g, 1, dtype, size=10.0)]
    return args


def _make_raw_roi_align(g):
    args = _make_roi_align(g)
    oh, ow = args.pop("output_size")
    return {
        "input": args["input"],
        "boxes": args["boxes"],
        "spatial_scale": args["spatial_scale"],
        "pooled_height": oh,
        "pooled_width": ow,
        "sampling_ratio": args["sampling_ratio"],
        "aligned": args["aligned"],
    }


def _make_roi_align_backward(g):
    args = _make_raw_roi_align(g)
    k, c = args["boxes"].shape[0], args["input"].shape[1]
    grad = _randn(g, k, c, args["pooled_height"], args["pooled_width"], dtype=args["input"].dtype)
    return {"grad": grad, **args, "output_mask": [True, True]}


def _make_generate_anchors(g):
    return {
        "feature_size": (2, 3),
        "stride": (8, 16),
        "sizes": (16.0, 32.0),
        "aspect_ratios": (0.5, 1.0, 2.0),
        "dtype": _dtype(g),
        "device": None,
    }


def _make_anchor_generator(g):
    dtype = _dtype(g)
    return {
        "sizes": (16.0, 32.0),
        "aspect_ratios": (1.0, 2.0),
        "stride": None,
        "features": torch.zeros(1, 2, 3, 4, dtype=dtype),
        "image_size": (30, 40),
        "dtype": None,
    }


def _make_proposal_layer(g):
    return {
        "in_channels": 3,
        "sizes": (16.0,),
        "aspect_ratios": (1.0, 2.0),
        "stride": 8,
        "hidden": 4,
        "pre_nms_top_n": 12,
        "post_nms_top_n": 5,
        "iou_threshold": 0.6,
        "features": _randn(g, 2, 3, 3, 4),
        "image_sizes": [(24, 32), (20, 30)],
    }


# ---- calls: the public functions and layers take the arguments by keyword ----


def _propose_call(anchors, deltas, objectness, image_sizes, **settings):
    return ops.propose(anchors, deltas, objectness, image_sizes, **settings)


def _propose_reference(anchors, deltas, objectness, image_sizes, **settings):
    return reference.propose(anchors, deltas, objectness, image_sizes, **settings)


def _raw_propose_reference(anchors, deltas, objectness, image_sizes, *args, **settings):
    names = list(_SETTINGS)
    settings = {**dict(zip(names, args, strict=False)), **settings}
    return reference.propose(anchors, deltas, objectness, image_sizes, **settings)


def _roi_align_layer(output_size, spatial_scale, sampling_ratio, aligned, input, boxes):
    return nn.RoIAlign(output_size, spatial_scale, sampling_ratio, aligned)(input, boxes)


def _roi_align_reference(
    input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False
):
    rois = checked_rois("roi_align", boxes, input).detach()
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32  # the kernels'
    scale = torch.tensor(float(spatial_scale), dtype=dtype)
    if not torch.isfinite(rois[:, 1:].to(dtype) * scale).all():
        # The reference's positions are inf - inf there; the op's contract: _check_roi_align.
        raise ValueError("no reference for non-finite box coordinates")
    return reference.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def _raw_roi_align_reference(
    input, boxes, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
):
    size = (pooled_height, pooled_width)
    return _roi_align_reference(input, boxes, size, spatial_scale, sampling_ratio, aligned)


def _generate_anchors_reference(feature_size, stride, *args, **kwargs):
    # The reference loops over the cells in Python: defined for small maps only.
    height, width = (feature_size,) * 2 if isinstance(feature_size, int) else feature_size
    if not (isinstance(height, int) and isinstance(width, int) and height * width < 10**4):
        raise ValueError("no reference for this map")
    if height * width == 0:
        height = width = 0
    return reference.generate_anchors((height, width), stride, *args, **kwargs)


def _anchor_generator(sizes, aspect_ratios, stride, features, image_size, dtype):
    layer = nn.AnchorGenerator(sizes, aspect_ratios, stride)
    return layer(features, image_size, dtype=dtype)


def _anchor_generator_reference(sizes, aspect_ratios, stride, features, image_size, dtype):
    height, width = features.shape[-2:]
    if stride is None:
        stride = (int(image_size[0]) // max(height, 1), int(image_size[1]) // max(width, 1))
    return _generate_anchors_reference(
        (height, width), stride, sizes, aspect_ratios, dtype=dtype or features.dtype
    ).to(features.device)


def _proposal_layer(in_channels, sizes, aspect_ratios, stride, hidden, features, image_sizes, **kw):
    torch.manual_seed(0)
    layer = nn.ProposalLayer(in_channels, sizes, aspect_ratios, stride, hidden=hidden, **kw)
    return layer(features, image_sizes), layer


def _proposal_layer_call(**args):
    return _proposal_layer(**args)[0]


def _proposal_layer_reference(**args):
    # The layer's own head and anchors (tested elsewhere), then the reference proposals.
    out, layer = _proposal_layer(**args)
    return reference.propose(
        out.anchors.detach(),
        out.deltas.detach(),
        out.objectness.detach(),
        args["image_sizes"],
        layer.config,
    )


def _decode_backward_reference(grad, deltas, anchors, weights, clamp, output_mask=(True, True)):
    return _autograd_reference(
        lambda d, a: reference.decode_boxes(d, a, weights, clamp),
        grad,
        torch.broadcast_tensors(deltas, anchors),
        output_mask,
    )


def _roi_align_backward_reference(grad, input, boxes, *args, output_mask=(True, True), **kw):
    return _autograd_reference(
        lambda x, b: _raw_roi_align_reference(x, b, *args, **kw), grad, (input, boxes), output_mask
    )


def _propose_backward_reference(
    grad_boxes, anchors, deltas, kept_anchors, image_sizes, weights, clamp, output_mask=(True, True)
):
    def rows(d, a):
        sizes = image_sizes.to(d.dtype)
        out = []
        for image in range(kept_anchors.shape[0]):
            for anchor in kept_anchors[image].tolist():
                if anchor < 0:
                    out.append(d.new_zeros(4))
                    continue
                box = reference.decode_boxes(d[image, anchor], a[anchor], weights, clamp)
                out.append(reference.proposals.clip_boxes(box, *sizes[image].tolist()))
        return torch.stack(out).view(*kept_anchors.shape, 4) if out else grad_boxes * 0

    if kept_anchors.numel() and not (
        kept_anchors.min() >= -1 and kept_anchors.max() < len(anchors)
    ):
        raise IndexError("kept_anchors out of range: no reference")
    return _autograd_reference(rows, grad_boxes, (deltas, anchors), output_mask)


def _autograd_reference(fn, grad, inputs, output_mask):
    """The gradients of fn(*inputs) for ``grad``, as a backward op returns them: in each input's
    shape where output_mask asks for it, an empty Tensor[0] where it does not."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return tuple(
        (g if g is not None else torch.zeros_like(t)) if wanted else t.new_empty((0,))
        for wanted, g, t in zip(output_mask, grads, leaves, strict=True)
    )


# ---- attention ----


def _make_attention(g):
    dtype = _dtype(g)
    return {
        "query": _randn(g, 2, 2, 5, 4, dtype=dtype),
        "key": _randn(g, 2, 2, 6, 4, dtype=dtype),
        "value": _randn(g, 2, 2, 6, 3, dtype=dtype),
        "attn_mask": _randn(g, 5, 6, dtype=dtype),
        "is_causal": False,
        "scale": 0.5,
    }


def _make_raw_attention(g):
    args = _make_attention(g)
    return {
        "query": args["query"],
        "key": args["key"],
        "value": args["value"],
        "bias": args["attn_mask"][None, None],
        "scale": 0.5,
        "is_causal": False,
    }


def _raw_attention_reference(query, key, value, bias, scale, is_causal):
    if is_causal:  # the raw op applies both; the public function takes one or the other
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).triu(1)
        causal = torch.zeros(causal.shape, dtype=query.dtype).masked_fill(causal, -math.inf)
        bias = causal if bias is None else bias + causal
    out = reference.scaled_dot_product_attention(query, key, value, bias, scale=scale)
    # The log-sum-exp by its definition, in the op's accumulation type (the reference returns
    # float32, which is inf for float64 rows beyond float32's range).
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scores = (query.to(acc) @ key.to(acc).transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    return out, torch.logsumexp(scores, dim=-1)


def _make_attention_backward(g):
    args = _make_raw_attention(g)
    with torch.no_grad():
        out, lse = raw.scaled_dot_product_attention(*args.values())
    grad = _randn(g, *out.shape, dtype=out.dtype)
    return {
        "grad": grad,
        **{k: args[k] for k in ("query", "key", "value", "bias")},
        "out": out,
        "lse": lse,
        "scale": args["scale"],
        "is_causal": False,
        "output_mask": [True, True, True, True],
    }


def _attention_backward_reference(
    grad, query, key, value, bias, out, lse, scale, is_causal, output_mask=(True,) * 4
):
    """The gradients from the given out (the backward's input), in float64: P = softmax(S)
    recomputed from the scores (the op recomputes it as the forward's; lse is only checked),
    dS = P * (dO V^T - rowsum(dO * O))."""
    q, k, v, g, o = (t.double() for t in (query, key, value, grad, out))
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.double()
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == -math.inf, 0.0)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    p = p / total.masked_fill(total == 0, 1.0)
    ds = p * (g @ v.transpose(-2, -1) - (g * o).sum(-1, keepdim=True))
    grads = [ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ g]
    grads.append(ds.sum_to_size(bias.shape) if bias is not None else None)
    like = (query, key, value, bias)
    return tuple(
        t.to(query.dtype) if wanted and t is not None else query.new_empty((0,))
        for wanted, t, _ in zip(output_mask, grads, like, strict=True)
    )


def _make_mha(g):
    dtype = _dtype(g)
    return {
        "embed_dim": 8,
        "num_heads": 2,
        "query": _randn(g, 2, 5, 8, dtype=dtype),
        "key": _randn(g, 2, 6, 8, dtype=dtype),
        "value": _randn(g, 2, 6, 8, dtype=dtype),
        "key_padding_mask": torch.rand(2, 6, generator=g) > 0.8,
        "attn_mask": _randn(g, 5, 6, dtype=dtype),
    }


def _mha_call(embed_dim, num_heads, query, key, value, key_padding_mask, attn_mask):
    torch.manual_seed(0)
    floating = isinstance(query, torch.Tensor) and query.is_floating_point()
    dtype = query.dtype if floating else torch.float32  # a module's dtype must be floating
    layer = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True).to(dtype)
    return layer(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)


def _check_mha(args, out):
    output, weights = out
    q = args["query"]
    assert output.shape == q.shape and output.dtype == q.dtype, (output.shape, output.dtype)
    assert weights.shape == (q.shape[0], q.shape[1], args["key"].shape[1]), weights.shape


# ---- beam search ----


def _make_beam_step(g):
    B, K, C = 2, 3, 5
    log_probs = torch.randn(B, K, C, generator=g).log_softmax(-1)
    scores = -torch.rand(B, K, generator=g) * 3
    scores[:, 2] = -math.inf
    used = torch.randint(0, 2**C, (B, K, 1), generator=g)
    finished = torch.rand(B, K, generator=g) < 0.3
    return {
        "log_probs": log_probs.to(_dtype(g)),
        "scores": scores,
        "used": used,
        "finished": finished,
        "log_threshold": -2.0,
        "max_length": 4,
    }


_BEAM_KINDS = {
    "log_probs": "tensor",
    "scores": "tensor",
    "used": "tensor",
    "finished": "tensor",
    "log_threshold": "float",
    "max_length": "int",
}


def _make_beam_advance(g):
    args = _make_beam_step(g)
    rows = args["log_probs"].shape[0] * args["log_probs"].shape[1]
    state = [torch.randn(rows, 4, generator=g), torch.randint(0, 9, (rows,), generator=g)]
    return {**args, "state": state}


_ADVANCE_KINDS = {**_BEAM_KINDS, "state": "tensor_list"}


# The sweep's step function: log-probs of 4 labels from the last label alone; the state is
# passed along untouched, so that every mutation of it tests the driver's checks and reordering.
_BEAM_TABLE = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).log_softmax(-1)


def _beam_step_fn(last, state):
    return _BEAM_TABLE.to(last.device)[last + 1], state


def _make_beam_search(g):
    return {
        "state": torch.randn(6, 3, generator=g),
        "batch_size": 2,
        "num_labels": 4,
        "beam_size": 3,
        "max_length": 3,
        "threshold": 0.05,
    }


_SEARCH_KINDS = {
    "state": "tensor",
    "batch_size": "int",
    "num_labels": "int",
    "beam_size": "int",
    "max_length": "int",
    "threshold": "float",
}


def _beam_search_call(state, **settings):
    return ops.beam_search(_beam_step_fn, state, **settings)


def _beam_search_reference(state, **settings):
    return reference.beam_search(_beam_step_fn, state, **settings)


def _label_beam_search(state, batch_size, num_labels, beam_size, max_length, threshold):
    layer = nn.LabelBeamSearch(beam_size, max_length, threshold)
    return layer(_beam_step_fn, state, batch_size, num_labels)


def _check_beam_step(args, out):
    scores, parents, labels, used, finished = out
    log_probs = args["log_probs"]
    B, K, C = log_probs.shape
    assert scores.shape == (B, K) and scores.dtype == torch.float32, scores
    for t in (parents, labels):
        assert t.shape == (B, K) and t.dtype == torch.int64, t
    assert used.shape == (B, K, (C + 63) // 64) and used.dtype == torch.int64, used
    assert finished.shape == (B, K) and finished.dtype == torch.bool, finished
    if scores.is_meta or scores.numel() == 0:
        return
    assert parents.min() >= -1 and parents.max() < K, parents
    assert labels.min() >= -1 and labels.max() < C, labels
    assert ((parents == -1) == (scores == -math.inf)).all(), (parents, scores)


def _check_beam_advance(args, out):
    scores, sources, labels, used, finished, state, done = out
    B, K = scores.shape
    assert done.shape == () and done.dtype == torch.bool, done
    for t in (sources, labels):
        assert t.shape == (B * K,) and t.dtype == torch.int64, t
    assert [t.shape for t in state] == [t.shape for t in args["state"]], state
    parents = sources.view(B, K)  # the beams they came from: checked as the step's parents
    if not (scores.is_meta or scores.numel() == 0):
        from_first = sources.view(B, K) - torch.arange(B, device=sources.device)[:, None] * K
        assert ((from_first >= 0) & (from_first < K)).all(), sources  # a beam of its own image
        parents = from_first.masked_fill(scores == -math.inf, -1)
    _check_beam_step(args, (scores, parents, labels.view(B, K), used, finished))


def _make_beam_backtrack(g):
    T, B, K = 3, 2, 3
    sources = torch.randint(0, B * K, (T, B * K), generator=g)
    labels = torch.randint(-1, 5, (T, B * K), generator=g)
    scores = -torch.rand(B, K, generator=g) * 3
    scores[:, 2] = -math.inf
    return {"sources": sources, "labels": labels, "scores": scores, "width": 4}


_BACKTRACK_KINDS = {"sources": "tensor", "labels": "tensor", "scores": "tensor", "width": "int"}


def _check_beam_backtrack(args, out):
    paths, lengths = out
    B, K = args["scores"].shape
    assert paths.shape == (B, K, args["width"]) and paths.dtype == torch.int64, paths
    assert lengths.shape == (B, K) and lengths.dtype == torch.int64, lengths
    if paths.is_meta or paths.numel() == 0:
        return
    assert ((paths >= 0).sum(-1) == lengths).all(), (paths, lengths)


def _check_beam_search(args, out):
    labels, scores, lengths = out
    B, K = args["batch_size"], args["beam_size"]
    assert labels.shape[:2] == (B, K) and scores.shape == (B, K) and lengths.shape == (B, K)
    if labels.is_meta or labels.numel() == 0:
        return
    assert labels.min() >= -1 and labels.max() < args["num_labels"], labels
    assert ((labels >= 0).sum(-1) == lengths).all(), (labels, lengths)


# ---- invariants of results, checked whether or not the reference is defined ----


def _check_nms(args, keep):
    n = args["boxes"].shape[0]
    assert keep.dtype == torch.int64 and keep.dim() == 1, keep
    if keep.numel():
        assert keep.min() >= 0 and keep.max() < n, f"index out of range: {keep} for {n} boxes"
        assert keep.unique().numel() == keep.numel(), f"repeated index: {keep}"


def _check_propose(args, out):
    boxes, scores, counts = out[:3]
    n = args["deltas"].shape[0]
    rows = boxes.shape[1]
    assert boxes.shape == (n, rows, 4) and scores.shape == (n, rows), (boxes.shape, scores.shape)
    assert counts.shape == (n,) and counts.dtype == torch.int64, counts
    if n and not counts.is_meta:
        assert counts.min() >= 0 and counts.max() <= rows, counts
        for i, c in enumerate(counts.tolist()):
            assert (boxes[i, c:] == 0).all() and (scores[i, c:] == 0).all(), (i, boxes, scores)
    if len(out) == 4 and n and rows and not counts.is_meta:
        kept = out[3]
        a = args["anchors"].shape[0]
        assert kept.shape == (n, rows) and kept.min() >= -1 and kept.max() < a, kept


def _check_roi_align(args, out, size=None):
    """Shape and dtype; and where the reference is not defined (non-finite box coordinates) the
    documented contract: a NaN coordinate gives NaN bins, infinite ones finite bins."""
    input = args["input"]
    rois = checked_rois("roi_align", args["boxes"], input).detach()
    oh, ow = size or output_pair("roi_align", args["output_size"])
    assert out.shape == (rois.shape[0], input.shape[1], oh, ow), out.shape
    assert out.dtype == input.dtype, out.dtype
    if out.is_meta or out.numel() == 0:
        return
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32  # the kernels'
    coords = rois[:, 1:].to(dtype) * torch.tensor(float(args["spatial_scale"]), dtype=dtype)
    nan_box = coords.isnan().any(1)
    assert out[nan_box].isnan().all(), "a box with a NaN coordinate must give NaN bins"
    if input.numel() < 10**6 and (input.abs() < 1e30).all():  # no NaN, no overflow in the bins
        assert torch.isfinite(out[~nan_box]).all(), "boxes without NaN must give finite bins"


def _check_raw_roi_align(args, out):
    _check_roi_align(args, out, (args["pooled_height"], args["pooled_width"]))


TARGETS = [
    Target(
        "ops.encode_boxes",
        ("encode_boxes",),
        ops.encode_boxes,
        _make_encode,
        {"boxes": "tensor", "anchors": "tensor", "weights": "floats"},
        reference.encode_boxes,
        "encode_boxes",
        fake=True,
    ),
    Target(
        "ops.decode_boxes",
        ("decode_boxes",),
        ops.decode_boxes,
        _make_decode,
        {"deltas": "tensor", "anchors": "tensor", "weights": "floats", "clamp": "float"},
        reference.decode_boxes,
        "decode_boxes",
        fake=True,
        grads=("deltas", "anchors"),
    ),
    Target(
        "ops.box_iou",
        ("box_iou",),
        ops.box_iou,
        _make_iou,
        {"boxes1": "tensor", "boxes2": "tensor"},
        reference.box_iou,
        "box_iou",
        fake=True,
    ),
    Target(
        "ops.generate_anchors",
        ("generate_anchors",),
        ops.generate_anchors,
        _make_generate_anchors,
        {
            "feature_size": "pair",
            "stride": "stride",
            "sizes": "floats",
            "aspect_ratios": "floats",
            "dtype": "dtype",
            "device": "device",
        },
        _generate_anchors_reference,
    ),
    Target(
        "ops.nms",
        ("nms",),
        ops.nms,
        _make_nms,
        {"boxes": "tensor", "scores": "tensor", "iou_threshold": "float"},
        reference.nms,
        "nms",
        fake=True,
        check=_check_nms,
    ),
    Target(
        "ops.batched_nms",
        ("batched_nms",),
        ops.batched_nms,
        _make_batched_nms,
        {"boxes": "tensor", "scores": "tensor", "idxs": "tensor", "iou_threshold": "float"},
        reference.batched_nms,
        "batched_nms",
        fake=True,
        check=_check_nms,
    ),
    Target(
        "ops.propose",
        ("propose",),
        _propose_call,
        _make_propose,
        {
            "anchors": "tensor",
            "deltas": "tensor",
            "objectness": "tensor",
            "image_sizes": "image_sizes",
            **_SETTINGS,
        },
        _propose_reference,
        "propose",
        fake=True,
        grads=("deltas", "anchors"),
        check=_check_propose,
    ),
    Target(
        "ops.roi_align",
        ("roi_align",),
        ops.roi_align,
        _make_roi_align,
        {
            "input": "tensor",
            "boxes": "tensor",
            "output_size": "output_size",
            "spatial_scale": "float",
            "sampling_ratio": "int",
            "aligned": "bool",
        },
        _roi_align_reference,
        "roi_align",
        fake=True,
        grads=("input", "boxes"),
        check=_check_roi_align,
    ),
    Target(
        "ops.roi_align(list of boxes)",
        ("roi_align",),
        ops.roi_align,
        _make_roi_align_list,
        {
            "input": "tensor",
            "boxes": "tensor_list",
            "output_size": "output_size",
            "spatial_scale": "float",
            "sampling_ratio": "int",
            "aligned": "bool",
        },
        _roi_align_reference,
        "roi_align",
        fake=True,
        grads=("input", "boxes"),
        check=_check_roi_align,
    ),
    Target(
        "nn.RoIAlign",
        ("roi_align", "RoIAlign"),
        _roi_align_layer,
        _make_roi_align,
        {
            "output_size": "output_size",
            "spatial_scale": "float",
            "sampling_ratio": "int",
            "aligned": "bool",
            "input": "tensor",
            "boxes": "tensor",
        },
        _roi_align_reference,
        "roi_align",
        grads=("input", "boxes"),
        check=_check_roi_align,
    ),
    Target(
        "nn.AnchorGenerator",
        ("AnchorGenerator", "generate_anchors"),
        _anchor_generator,
        _make_anchor_generator,
        {
            "sizes": "floats",
            "aspect_ratios": "floats",
            "stride": "stride",
            "features": "tensor",
            "image_size": "pair",
            "dtype": "dtype",
        },
        _anchor_generator_reference,
    ),
    Target(
        "nn.ProposalLayer",
        ("ProposalLayer", "propose", "AnchorGenerator", "generate_anchors"),
        _proposal_layer_call,
        _make_proposal_layer,
        {
            "in_channels": "int",
            "sizes": "floats",
            "aspect_ratios": "floats",
            "stride": "stride",
            "hidden": "int",
            "pre_nms_top_n": "int",
            "post_nms_top_n": "int",
            "iou_threshold": "float",
            "features": "tensor",
            "image_sizes": "image_sizes",
        },
        _proposal_layer_reference,
        check=lambda args, out: _check_propose({"deltas": out.deltas}, out),
        outputs=3,
    ),
    Target(
        "ops.beam_search_step",
        ("beam_search_step",),
        ops.beam_search_step,
        _make_beam_step,
        _BEAM_KINDS,
        reference.beam_search_step,
        "beam_search_step",
        fake=True,
        check=_check_beam_step,
    ),
    Target(
        "ops.beam_search_advance",
        ("beam_search_advance",),
        ops.beam_search_advance,
        _make_beam_advance,
        _ADVANCE_KINDS,
        reference.beam_search_advance,
        "beam_search_advance",
        fake=True,
        check=_check_beam_advance,
    ),
    Target(
        "ops.beam_search_backtrack",
        ("beam_search_backtrack",),
        ops.beam_search_backtrack,
        _make_beam_backtrack,
        _BACKTRACK_KINDS,
        reference.beam_search_backtrack,
        "beam_search_backtrack",
        fake=True,
        check=_check_beam_backtrack,
    ),
    Target(
        "ops.beam_search",
        ("beam_search", "beam_search_advance"),
        _beam_search_call,
        _make_beam_search,
        _SEARCH_KINDS,
        _beam_search_reference,
        check=_check_beam_search,
    ),
    Target(
        "nn.LabelBeamSearch",
        ("LabelBeamSearch", "beam_search_advance"),
        _label_beam_search,
        _make_beam_search,
        _SEARCH_KINDS,
        _beam_search_reference,
        check=_check_beam_search,
    ),
    # ---- the raw ops, as torch.compile and autograd call them ----
    Target(
        "raw.encode_boxes",
        ("encode_boxes",),
        raw.encode_boxes,
        _make_encode,
        {"boxes": "tensor", "anchors": "tensor", "weights": "floats"},
        reference.encode_boxes,
        "encode_boxes",
        fake=True,
    ),
    Target(
        "raw.decode_boxes",
        ("decode_boxes",),
        raw.decode_boxes,
        _make_decode,
        {"deltas": "tensor", "anchors": "tensor", "weights": "floats", "clamp": "float"},
        reference.decode_boxes,
        "decode_boxes",
        fake=True,
    ),
    Target(
        "raw.decode_boxes_backward",
        ("decode_boxes_backward",),
        raw.decode_boxes_backward,
        _make_decode_backward,
        {
            "grad": "tensor",
            "deltas": "tensor",
            "anchors": "tensor",
            "weights": "floats",
            "clamp": "float",
            "output_mask": "mask",
        },
        _decode_backward_reference,
        "decode_boxes_backward",
        fake=True,
    ),
    Target(
        "raw.box_iou",
        ("box_iou",),
        raw.box_iou,
        _make_iou,
        {"boxes1": "tensor", "boxes2": "tensor"},
        reference.box_iou,
        "box_iou",
        fake=True,
    ),
    Target(
        "raw.nms",
        ("nms",),
        raw.nms,
        _make_nms,
        {"boxes": "tensor", "scores": "tensor", "iou_threshold": "float"},
        reference.nms,
        "nms",
        fake=True,
        check=_check_nms,
    ),
    Target(
        "raw.batched_nms",
        ("batched_nms",),
        raw.batched_nms,
        _make_batched_nms,
        {"boxes": "tensor", "scores": "tensor", "idxs": "tensor", "iou_threshold": "float"},
        reference.batched_nms,
        "batched_nms",
        fake=True,
        check=_check_nms,
    ),
    Target(
        "raw.propose",
        ("propose",),
        raw.propose,
        _make_raw_propose,
        {"anchors": "tensor", "deltas": "tensor", "objectness": "tensor", "image_sizes": "tensor"}
        | _SETTINGS,
        _raw_propose_reference,
        "propose",
        fake=True,
        check=_check_propose,
        outputs=3,
    ),
    Target(
        "raw.propose_backward",
        ("propose_backward",),
        raw.propose_backward,
        _make_propose_backward,
        {
            "grad_boxes": "tensor",
            "anchors": "tensor",
            "deltas": "tensor",
            "kept_anchors": "tensor",
            "image_sizes": "tensor",
            "weights": "floats",
            "clamp": "float",
            "output_mask": "mask",
        },
        _propose_backward_reference,
        "propose_backward",
        fake=True,
    ),
    Target(
        "ops.scaled_dot_product_attention",
        ("scaled_dot_product_attention",),
        ops.scaled_dot_product_attention,
        _make_attention,
        {
            "query": "tensor",
            "key": "tensor",
            "value": "tensor",
            "attn_mask": "tensor",
            "is_causal": "bool",
            "scale": "float",
        },
        reference.scaled_dot_product_attention,
        "scaled_dot_product_attention",
        grads=("query", "key", "value", "attn_mask"),
    ),
    Target(
        "nn.MultiheadAttention",
        ("MultiheadAttention", "scaled_dot_product_attention"),
        _mha_call,
        _make_mha,
        {
            "embed_dim": "int",
            "num_heads": "int",
            "query": "tensor",
            "key": "tensor",
            "value": "tensor",
            "key_padding_mask": "tensor",
            "attn_mask": "tensor",
        },
        check=_check_mha,
    ),
    Target(
        "raw.scaled_dot_product_attention",
        ("scaled_dot_product_attention",),
        raw.scaled_dot_product_attention,
        _make_raw_attention,
        {
            "query": "tensor",
            "key": "tensor",
            "value": "tensor",
            "bias": "tensor",
            "scale": "float",
            "is_causal": "bool",
        },
        _raw_attention_reference,
        "scaled_dot_product_attention",
        fake=True,
    ),
    Target(
        "raw.scaled_dot_product_attention_backward",
        ("scaled_dot_product_attention_backward",),
        raw.scaled_dot_product_attention_backward,
        _make_attention_backward,
        {
            "grad": "tensor",
            "query": "tensor",
            "key": "tensor",
            "value": "tensor",
            "bias": "tensor",
            "out": "tensor",
            "lse": "tensor",
            "scale": "float",
            "is_causal": "bool",
            "output_mask": "mask",
        },
        _attention_backward_reference,
        "scaled_dot_product_attention_backward",
        fake=True,
    ),
    Target(
        "raw.beam_search_step",
        ("beam_search_step",),
        raw.beam_search_step,
        _make_beam_step,
        _BEAM_KINDS,
        reference.beam_search_step,
        "beam_search_step",
        fake=True,
        check=_check_beam_step,
    ),
    Target(
        "raw.beam_search_advance",
        ("beam_search_advance",),
        raw.beam_search_advance,
        _make_beam_advance,
        _ADVANCE_KINDS,
        reference.beam_search_advance,
        "beam_search_advance",
        fake=True,
        check=_check_beam_advance,
    ),
    Target(
        "raw.beam_search_backtrack",
        ("beam_search_backtrack",),
        raw.beam_search_backtrack,
        _make_beam_backtrack,
        _BACKTRACK_KINDS,
        reference.beam_search_backtrack,
        "beam_search_backtrack",
        fake=True,
        check=_check_beam_backtrack,
    ),
    Target(
        "raw.roi_align",
        ("roi_align",),
        raw.roi_align,
        _make_raw_roi_align,
        {
            "input": "tensor",
            "boxes": "tensor",
            "spatial_scale": "float",
            "pooled_height": "int",
            "pooled_width": "int",
            "sampling_ratio": "int",
            "aligned": "bool",
        },
        _raw_roi_align_reference,
        "roi_align",
        fake=True,
        check=_check_raw_roi_align,
    ),
    Target(
        "raw.roi_align_backward",
        ("roi_align_backward",),
        raw.roi_align_backward,
        _make_roi_align_backward,
        {
            "grad": "tensor",
            "input": "tensor",
            "boxes": "tensor",
            "spatial_scale": "float",
            "pooled_height": "int",
            "pooled_width": "int",
            "sampling_ratio": "int",
            "aligned": "bool",
            "output_mask": "mask",
        },
        _roi_align_backward_reference,
        "roi_align_backward",
        fake=True,
    ),
]


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------


def _set_values(t: torch.Tensor, g: torch.Generator, value: float, fraction: bool) -> torch.Tensor:
    """A copy of t with one element (fraction=False) or all elements set to value; integer and
    bool tensors get the extreme of their type instead of a NaN/Inf."""
    if t.is_meta or t.numel() == 0:
        return t
    t = t.clone()
    if not (t.is_floating_point() or t.is_complex()):
        if t.dtype == torch.bool:
            value = True
        elif math.isnan(value) or math.isinf(value) or abs(value) > 2**62:
            info = torch.iinfo(t.dtype)
            value = info.min if value < 0 else info.max
        else:
            value = int(value)
    if fraction:
        t.fill_(value)
    else:
        t.view(-1)[torch.randint(0, t.numel(), (1,), generator=g).item()] = value
    return t


def _rows(t: torch.Tensor, count: int) -> torch.Tensor:
    """t with `count` rows (dimension 0), repeating its first row or zeros."""
    if t.dim() == 0:
        return t.expand(count) if count >= 0 else t
    first = t[:1] if t.shape[0] else t.new_zeros((1, *t.shape[1:]))
    return first.expand(count, *t.shape[1:])


def _huge_float(t: torch.Tensor) -> float:
    return 3e38 if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e300


TENSOR_MUTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], Any]] = {
    "flatten": lambda t, g: t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1),
    "unsqueeze": lambda t, g: t.unsqueeze(0),
    "0-d": lambda t, g: t.reshape(-1)[0] if t.numel() else t.new_zeros(()),
    "last+1": lambda t, g: F.pad(t, (0, 1)) if t.dim() and not t.is_meta else t.unsqueeze(-1),
    "last-1": lambda t, g: t[..., :-1] if t.dim() else t,
    "rows+1": lambda t, g: torch.cat([t, _rows(t, 1)]) if t.dim() else t.reshape(1),
    "rows-1": lambda t, g: t[1:] if t.dim() else t,
    "empty": lambda t, g: t[:0] if t.dim() else t.reshape(1)[:0],
    "empty-last": lambda t, g: t[..., :0] if t.dim() else t,
    "int32": lambda t, g: t.to(torch.int32),
    "int64": lambda t, g: t.to(torch.int64),
    "bool": lambda t, g: t.to(torch.bool),
    "uint8": lambda t, g: t.to(torch.uint8),
    "float16": lambda t, g: t.to(torch.float16),
    "bfloat16": lambda t, g: t.to(torch.bfloat16),
    "other-float": lambda t, g: t.to(torch.float32 if t.dtype == torch.float64 else torch.float64),
    "complex64": lambda t, g: t.to(torch.complex64),
    "meta": lambda t, g: t.to("meta"),
    # layouts with the same values
    "strided": lambda t, g: torch.stack([t, t], -1)[..., 0],
    "transposed": lambda t, g: t.mT.contiguous().mT if t.dim() >= 2 else t,
    "channels-last": (
        lambda t, g: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    ),
    # overlapping memory
    "expand-rows": lambda t, g: _rows(t, t.shape[0]) if t.dim() else t,
    "overlap": lambda t, g: (
        t.reshape(-1).as_strided(t.shape, (1,) * t.dim()) if t.dim() and t.numel() else t
    ),
    # values
    "nan": lambda t, g: _set_values(t, g, math.nan, False),
    "all-nan": lambda t, g: _set_values(t, g, math.nan, True),
    "inf": lambda t, g: _set_values(t, g, math.inf, False),
    "-inf": lambda t, g: _set_values(t, g, -math.inf, True),
    "huge": lambda t, g: _set_values(t, g, _huge_float(t), False),
    "all-huge": lambda t, g: _set_values(t, g, -_huge_float(t), True),
    "negated": lambda t, g: -t if t.dtype != torch.bool else ~t,
    "zeros": lambda t, g: torch.zeros_like(t),
    "tiny": lambda t, g: t * 1e-30 if t.is_floating_point() else t,
    # sizes no memory holds
    "huge-rows": lambda t, g: _rows(t, HUGE),
    "huge-last": lambda t, g: t[..., :1].expand(*t.shape[:-1], HUGE) if t.dim() else t,
    # not tensors
    "list": lambda t, g: t.tolist() if not t.is_meta else [],
    "None": lambda t, g: None,
    "number": lambda t, g: 1.5,
    "string": lambda t, g: "boxes",
}

# fmt: off
SCALARS: dict[str, list[Any]] = {
    "int": [0, -1, -5, -(2**63), 2**31, 2**62, 2**63 - 1, 2**63, 2**70, None, "2", 2.5,
            math.nan, True, torch.tensor(3), torch.tensor(2.0), [2]],
    "float": [math.nan, -math.nan, math.inf, -math.inf, -1.0, -1 / 3, 0.0, 1e308, 5e-324, 2**70,
              None, "0.5", True, torch.tensor(0.5), torch.tensor([0.5, 0.5]), 1j, [0.5]],
    "floats": [[], [1.0] * 3, [1.0] * 5, [0.0, 1, 1, 1], [-1.0, 1, 1, 1], [math.nan] * 4,
               [math.inf, 1, 1, 1], [1e-300] * 4, [1e300] * 4, [1 / 3] * 4, None, "1111",
               [1, None, 1, 1], [1, "a", 1, 1], 2.0, torch.ones(4), (2**70, 1, 1, 1), [True] * 4],
    "bool": [None, 2, -1, "yes", 1.0, torch.tensor(True), [True]],
    "mask": [[True], [True, True, True], None, [False, False], [True, False], [False, True],
             "ab", [None, True], [1, 0], True],
    "output_size": [0, -1, (0, 2), (2, -3), (1, 2, 3), (2,), 2.5, "7", None, True, 2**31,
                    (HUGE, HUGE), 2**63, torch.tensor(2), torch.tensor(2.0), (2, None),
                    [3, 1], (torch.tensor(2), 1)],
    "pair": [(-1, 2), 2.5, (2.5, 3), (HUGE, HUGE), (HUGE, 0), (0, 0), 0, None, "3x3", (1, 2, 3),
             (math.nan, 2), (math.inf, 2), (2**63, 2), (2,), (True, 2), [4, 5]],
    "stride": [0, -16, math.nan, math.inf, (16,), (16, 0), None, "16", 1e308, (16, 16.5), 1e-300,
               (2**70, 1), True],
    "dtype": [torch.int64, torch.bool, torch.float16, torch.bfloat16, torch.complex64, "float32",
              None, 3, torch.float64],
    "device": ["meta", "nope", 3, torch.device("cpu"), "cuda:7"],
    "image_sizes": [[], [(20, 30)] * 3, [(20,), (24,)], [("a", "b")] * 2, [(math.nan, 5)] * 2,
                    [(-1, 5)] * 2, [(1e40, 5)] * 2, [(math.inf, 5)] * 2, [(2**70, 5)] * 2, None,
                    "640x480", [[20, 30, 1]] * 2, [(0, 0)] * 2],
}
# fmt: on


def _mutate(kind: str, value: Any, name: str, choice: int, g: torch.Generator) -> tuple[str, Any]:
    """The choice-th mutation of an argument of this kind (modulo the number there are)."""
    if kind == "tensor" and not isinstance(value, torch.Tensor):
        return "(no tensor left to mutate)", value
    if kind == "tensor_list" and not isinstance(value, list):
        return "(no list left to mutate)", value
    if kind in ("tensor", "image_sizes", "tensor_list"):
        options = list(TENSOR_MUTATIONS)
        if kind == "image_sizes":
            options = [f"list:{i}" for i in range(len(SCALARS["image_sizes"]))] + options
        if kind == "tensor_list":
            options = ["list:empty", "list:string", "list:mixed", "list:tuple", "list:dict"]
            options += [f"item:{m}" for m in TENSOR_MUTATIONS]
        label = options[choice % len(options)]
        if label.startswith("list:") and kind == "image_sizes":
            return label, SCALARS["image_sizes"][int(label[5:])]
        if kind == "image_sizes":
            value = torch.as_tensor(value, dtype=torch.float64)
        if kind == "tensor_list":
            return label, _mutate_list(label, value, g)
        return label, TENSOR_MUTATIONS[label](value, g)
    options = SCALARS[kind]
    index = choice % len(options)
    return f"{name}={options[index]!r}", options[index]


def _mutate_list(label: str, boxes: list[torch.Tensor], g: torch.Generator) -> Any:
    if label == "list:empty":
        return []
    if label == "list:string":
        return [boxes[0], "boxes"]
    if label == "list:mixed":
        return [
            boxes[0],
            boxes[1].double() if boxes[1].dtype != torch.float64 else boxes[1].float(),
        ]
    if label == "list:tuple":
        return tuple(boxes)
    if label == "list:dict":
        return dict(enumerate(boxes))
    which = torch.randint(0, len(boxes), (1,), generator=g).item()
    out = list(boxes)
    out[which] = TENSOR_MUTATIONS[label[5:]](boxes[which], g)
    return out


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

TENSOR_KINDS = ("tensor", "tensor_list", "image_sizes")
ALL_META = "all tensors on meta"
ACCEPTED = (RuntimeError, ValueError, TypeError, IndexError)
# Checks of values that fake tensors cannot see (they have no values), or of memory.
VALUE_CHECKS = (
    "(batch index) must be",
    "image_sizes must be finite",
    "kept_anchors must lie in",
    "sources must hold rows in",
    "could not be allocated",
    "must fit in memory once made contiguous",
    "must fit in memory once concatenated",
    "can't allocate memory",
)


# Errors the sweep knows and tolerates (counted, and printed with the case count), each left for a
# fix outside the files the sweep's fixes may touch:
KNOWN = {
    # A raw op given no tensor at all (every tensor argument None): the dispatcher has no key to
    # dispatch on and refuses before any kernel runs; its message names the schema
    # ("... registered for schema mlkernels::nms.") but not in the op's own words.
    "no tensor argument": lambda target, message: (
        target.raw_op is not None
        and f"no fallback function is registered for schema mlkernels::{target.raw_op}." in message
    ),
    # A bool[2] (bool[4]) output_mask of another length fails in the dispatcher's argument
    # parsing, before
    # the op runs, with a message that names neither the op nor the argument.
    "output_mask length": lambda target, message: (
        "output_mask" in target.kinds and "to a fixed-size array of size" in message
    ),
}


class Stats:
    cases = 0
    known: dict[str, int] = {}
    calls = 0
    raised = 0
    compared = 0
    gradients = 0
    slowest = (0.0, "")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return (
            f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
            f"{'@' + value.device.type if value.device.type != 'cpu' else ''}"
            f"{'' if value.is_contiguous() else ' strides=' + str(value.stride())}"
        )
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value).__name__ + "(" + ", ".join(_describe(v) for v in value) + ")"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


_CASE_FILE = os.environ.get("MLKERNELS_SWEEP_CASE_FILE")
_case_fd = os.open(_CASE_FILE, os.O_WRONLY | os.O_CREAT) if CHILD and _CASE_FILE else None


def _in_flight(text: str) -> None:
    """Record the case being run, for the parent to report after a crash or a hang."""
    if _case_fd is not None:
        data = text.encode()
        os.ftruncate(_case_fd, 0)
        os.pwrite(_case_fd, data, 0)


def _timed(description: str, fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    _in_flight(description)
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    start = time.perf_counter()
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 (judged by the caller)
        return None, error
    finally:
        elapsed = time.perf_counter() - start
        faulthandler.cancel_dump_traceback_later()
        Stats.calls += 1
        if elapsed > Stats.slowest[0]:
            Stats.slowest = (elapsed, description)
        assert elapsed < CALL_LIMIT_S, f"{description}: took {elapsed:.1f} s"


def _first_line(error: BaseException) -> str:
    return str(error).strip().split("\n")[0]


def _check_error(target: Target, error: BaseException, description: str) -> bool:
    """Asserts the error is one the sweep accepts; True if it is one of the KNOWN failures."""
    message = _first_line(error)
    assert isinstance(error, ACCEPTED), f"{description}: {type(error).__name__}: {message}"
    for known, matches in KNOWN.items():
        if matches(target, message):
            Stats.known[known] = Stats.known.get(known, 0) + 1
            return True
    assert "INTERNAL ASSERT" not in str(error), f"{description}: {message}"
    names = set(target.kinds) | {"output", "config", "features", "image_size", "settings"}
    names |= {"boxes", "input", "grad"} if "roi_align" in target.prefixes[0] else set()
    ours = any(message.startswith(p + ":") for p in target.prefixes)
    schema = target.raw_op is not None and (
        f"mlkernels::{target.raw_op}()" in message or f"{target.raw_op}() Expected" in message
    )
    assert ours or schema, (
        f"{description}: the message does not name the op ({', '.join(target.prefixes)}): "
        f"{type(error).__name__}: {message}"
    )
    assert any(name in message for name in names), (
        f"{description}: the message names no argument: {type(error).__name__}: {message}"
    )
    return False


def _tolerance(t: torch.Tensor) -> dict[str, float]:
    if t.dtype == torch.float64:
        return {"rtol": 1e-7, "atol": 1e-9}
    if t.dtype == torch.float32:
        return {"rtol": 2e-5, "atol": 2e-5}
    if t.is_floating_point():
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 0, "atol": 0}


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _compare(
    ours: Any, want: Any, description: str, lenient: bool = False, magnitude: float = 1.0
) -> None:
    """Outputs equal in shape, dtype, device and value (NaN equal to NaN). Lenient (for inputs
    with NaN, Inf or huge values): where the reference is NaN or Inf, any value passes (inf - inf
    in one summation order, inf or an overflowed difference in another). Elsewhere the values
    must agree, within an absolute tolerance scaled by ``magnitude`` (see _magnitude)."""
    ours_list, want_list = _flatten(ours), _flatten(want)
    assert len(ours_list) == len(want_list), f"{description}: {len(ours_list)} outputs"
    for i, (a, b) in enumerate(zip(ours_list, want_list, strict=True)):
        what = f"{description}: output {i}"
        assert isinstance(a, torch.Tensor), f"{what} is {type(a).__name__}"
        assert a.shape == b.shape, f"{what}: shape {list(a.shape)}, reference {list(b.shape)}"
        assert a.dtype == b.dtype, f"{what}: dtype {a.dtype}, reference {b.dtype}"
        assert a.device == b.device, f"{what}: device {a.device}, reference {b.device}"
        if a.is_meta:
            continue
        if lenient and a.is_floating_point():
            a = torch.where(~b.isfinite(), b, a)
        tolerance = _tolerance(a)
        tolerance["atol"] *= magnitude
        torch.testing.assert_close(
            a, b, equal_nan=True, msg=lambda m, w=what: f"{w}: {m}", **tolerance
        )


def _leaves(args: dict[str, Any], names: tuple[str, ...]) -> list[torch.Tensor]:
    """Make the floating CPU tensors among args[names] (lists included) leaves that require
    grad; returns them."""
    leaves = []
    for name in names:
        value = args.get(name)
        items = value if isinstance(value, list) else [value]
        for i, t in enumerate(items):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                t = t.detach().requires_grad_()
                items[i] = t
                leaves.append(t)
        if not isinstance(value, list):
            args[name] = items[0]
    return leaves


def _gradients(out: Any, leaves: list[torch.Tensor]) -> list[torch.Tensor] | None:
    first = _flatten(out)[0]
    if not leaves or not isinstance(first, torch.Tensor) or not first.requires_grad:
        return None
    grads = torch.autograd.grad(first.sum(), leaves, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves, strict=True)]


def _fake_args(mode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value, static_shapes=True)
    if isinstance(value, list):
        return [_fake_args(mode, v) for v in value]
    if isinstance(value, tuple):
        return tuple(_fake_args(mode, v) for v in value)
    return value


def _check_fake(target: Target, args: dict[str, Any], out: Any, error, description: str) -> None:
    """The same call on fake tensors: the same error message, or the same shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if error is not None and any(c in str(error) for c in VALUE_CHECKS):
        return
    tensors = [v for v in _flatten(list(args.values())) if isinstance(v, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        return  # the eager call ran the fake kernel already (the Meta dispatch key)
    numbers = [v for k, v in args.items() if target.kinds[k] not in TENSOR_KINDS]
    if any(isinstance(v, torch.Tensor) for v in _flatten(numbers)):
        return  # a Tensor for a number: the dispatcher reads its value, which fakes do not have
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_args = {
            k: _fake_args(mode, v) if target.kinds[k] in TENSOR_KINDS else v
            for k, v in args.items()
        }
        fake_out, fake_error = _timed(description + " [fake]", lambda: target.call(**fake_args))
    if error is not None:
        assert fake_error is not None, (
            f"{description}: eager raised {type(error).__name__}: {_first_line(error)}, "
            "the fake kernel did not"
        )
        assert (type(fake_error), _first_line(fake_error)) == (type(error), _first_line(error)), (
            f"{description}: eager and fake kernels differ:\n  eager {type(error).__name__}: "
            f"{_first_line(error)}\n  fake  {type(fake_error).__name__}: {_first_line(fake_error)}"
        )
        return
    assert fake_error is None, (
        f"{description}: the fake kernel raised {type(fake_error).__name__}: "
        f"{_first_line(fake_error)}, eager did not"
    )
    if target.check is _check_nms:
        return  # the kept count is data-dependent: an unbacked size
    for i, (a, b) in enumerate(zip(_flatten(out), _flatten(fake_out), strict=True)):
        assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype), (
            f"{description}: output {i} is {a.dtype}{list(a.shape)} eager, "
            f"{b.dtype}{list(b.shape)} fake"
        )


def run_case(target: Target, seed: int, mutations: list[tuple[str, int]]) -> bool:
    """Runs one case; False when the mutated input cannot be built."""
    g = torch.Generator().manual_seed(seed)
    args = target.make(g)
    labels = []
    for name, choice in mutations:
        if name == ALL_META:  # every tensor on the meta device: the fake kernels run eagerly
            for key, value in args.items():
                if isinstance(value, torch.Tensor):
                    args[key] = value.to("meta")
            labels.append(ALL_META)
            continue
        try:
            label, args[name] = _mutate(target.kinds[name], args[name], name, choice, g)
        except (RuntimeError, MemoryError, TypeError, ValueError, AttributeError, IndexError):
            return False  # e.g. an int32 copy of an expanded huge tensor: no such input
        labels.append(f"{name}:{label}" if not label.startswith(name + "=") else label)
    description = f"{target.label}({', '.join(labels) or 'valid'}; seed={seed})"
    details = ", ".join(f"{k}={_describe(v)}" for k, v in args.items())
    Stats.cases += 1

    leaves = _leaves(args, target.grads)
    out, error = _timed(f"{description} [{details}]", lambda: target.call(**args))
    if error is not None:
        Stats.raised += 1
        if _check_error(target, error, f"{description} [{details}]"):
            return True  # a known failure: nothing to compare
    else:
        if target.check is not None:
            target.check(args, out)
        grads, grad_error = _timed(description + " [backward]", lambda: _gradients(out, leaves))
        if grad_error is not None:
            _check_error(target, grad_error, f"{description} backward [{details}]")
        gradient_op = target.label.endswith("_backward")
        if target.reference is not None and not (gradient_op and _has_huge(args)):
            ref_args = {
                k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()
            }
            ref_args = {
                k: [x.detach() for x in v] if k in target.grads and isinstance(v, list) else v
                for k, v in ref_args.items()
            }
            ref_leaves = _leaves(ref_args, target.grads) if grads is not None else []
            want, _ = _timed(description + " [reference]", lambda: target.reference(**ref_args))
            if want is not None:
                Stats.compared += 1
                compared = out[: target.outputs] if target.outputs else out
                nonfinite = _has_nonfinite(args)
                what = f"{description} [{details}]"
                # A backward op's outputs are gradients (see _magnitude).
                magnitude = _magnitude(args) if gradient_op else 1.0
                _compare(_detach(compared), _detach(want), what, nonfinite, magnitude)
                differ = _has_huge(args)  # products overflow in one order and not another
                if grads is not None and not differ:
                    want_grads = _gradients(want, ref_leaves)
                    if want_grads is not None:
                        Stats.gradients += 1
                        what = f"{description} gradients [{details}]"
                        _compare(grads, want_grads, what, nonfinite, _magnitude(args))
    if target.fake:
        _check_fake(target, args, out, error, f"{description} [{details}]")
    return True


def _magnitude(args: dict[str, Any]) -> float:
    """How much to scale the absolute tolerance of gradients by: 1, or the largest finite
    magnitude among the floating inputs when it passes 1e3. A gradient that cancels to ~0 in
    exact arithmetic (attention's dq = sum_j dS_ij k_j with every key 3e8: the dS_ij sum to 0)
    comes out of any float32 computation as eps32 * 3e8 ~ 20 in one summation order and -16 in
    another; compared with atol 2e-5, two correct kernels fail each other. The error of a
    float32 sum of products scales with the magnitude of its terms, and so does the bound."""
    largest = 1.0
    for t in _flatten(list(args.values())):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
            finite = t.detach()[t.detach().isfinite()]
            if t.numel() < 10**6 and finite.numel() > 0:
                largest = max(largest, finite.abs().max().item())
    return largest if largest > 1e3 else 1.0


def _has_nonfinite(args: dict[str, Any]) -> bool:
    """Whether a floating tensor argument holds NaN, Inf or values so large (1e30) that sums of
    them overflow."""
    return any(
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and not t.is_meta
        and t.numel() < 10**6
        and not (t.abs() < 1e30).all()
        for t in _flatten(list(args.values()))
    )


def _has_huge(args: dict[str, Any]) -> bool:
    return any(
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and not t.is_meta
        and t.numel() < 10**6
        and ((t.abs() >= 1e30) & t.isfinite()).any()
        for t in _flatten(list(args.values()))
    )


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return [_detach(v) for v in value]
    return value


@st.composite
def _cases(draw, target: Target):
    seed = draw(st.integers(0, 2**16))
    count = draw(st.sampled_from([1, 1, 1, 2, 2, 3, 0]))
    names = [*target.kinds, ALL_META]
    mutations = [(draw(st.sampled_from(names)), draw(st.integers(0, 10**6))) for _ in range(count)]
    return seed, mutations


if CHILD:  # collected only in the child process that test_bad_input_sweep starts

    @pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
    def test_sweep_target(target):
        @settings(max_examples=EXAMPLES)
        @given(case=_cases(target))
        def sweep(case):
            seed, mutations = case
            assume(run_case(target, seed, mutations))

        before = Stats.cases
        try:
            sweep()
        finally:
            with open(os.environ["MLKERNELS_SWEEP_COUNT_FILE"], "a") as f:
                row = {"target": target.label, "cases": Stats.cases - before}
                names = ("calls", "raised", "compared", "gradients", "known")
                row |= {k: getattr(Stats, k) for k in names}
                f.write(json.dumps(row | {"slowest": Stats.slowest[0]}) + "\n")


def test_bad_input_sweep(tmp_path):
    """Runs the sweep (test_sweep_target for every target) in a child process; -s prints the
    number of cases."""
    # The folder that holds the mlkernels under test (the checkout, or make sanitize's build).
    root = Path(mlkernels.__file__).resolve().parent.parent
    count_file, case_file = tmp_path / "counts", tmp_path / "case"
    env = {
        **os.environ,
        "MLKERNELS_SWEEP_CHILD": "1",
        "MLKERNELS_SWEEP_COUNT_FILE": str(count_file),
        "MLKERNELS_SWEEP_CASE_FILE": str(case_file),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    command += [f"{Path(__file__).resolve()}::test_sweep_target"]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired as error:
        last = case_file.read_text() if case_file.exists() else "?"
        pytest.fail(f"the sweep timed out ({error.timeout} s); the case in flight: {last}")
    elapsed = time.perf_counter() - start
    last = case_file.read_text() if case_file.exists() else "?"
    assert result.returncode == 0, (
        f"the sweep failed (exit code {result.returncode}); the case in flight: {last}\n"
        + result.stdout[-6000:]
        + result.stderr[-4000:]
    )
    rows = [json.loads(line) for line in count_file.read_text().splitlines()]
    cases, last_row = sum(r["cases"] for r in rows), rows[-1]
    print(
        f"\nbad-input sweep: {cases} cases over {len(rows)} targets in {elapsed:.1f} s "
        f"({last_row['calls']} calls, {last_row['raised']} raised, {last_row['compared']} "
        f"compared with the reference, {last_row['gradients']} of them with gradients; slowest "
        f"call {max(r['slowest'] for r in rows):.3f} s); "
        f"known and tolerated: {last_row['known'] or 'none'}"
    )
    assert len(rows) == len(TARGETS) and all(r["cases"] >= EXAMPLES // 2 for r in rows), rows


def test_every_op_is_swept():
    labels = {t.label for t in TARGETS}
    classes = ("ProposeConfig", "BeamAdvance", "BeamSearchResult", "BeamStep")  # not ops
    assert {f"ops.{name}" for name in ops.__all__ if name not in classes} <= labels
    assert {f"nn.{name}" for name in nn.__all__ if name != "Proposals"} <= labels
    assert {t.raw_op for t in TARGETS if t.label.startswith("raw.")} == set(
        mlkernels.registered_ops()
    )
    assert set(_SETTINGS) == {f.name for f in dataclasses.fields(ProposeConfig)}
