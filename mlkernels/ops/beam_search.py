"""Beam search over label sets (the Order-Free RNN's decoder): beam_search_step, beam_search,
and the driver's own steps, beam_search_advance and beam_search_backtrack.

Kernels: csrc/beam_search (CPU, CUDA); pure-PyTorch equivalents: mlkernels.reference.beam_search.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _checks as C

_OP = "beam_search_step"
_ADVANCE_OP = "beam_search_advance"
WORD_BITS = 64
# A row's candidate index lives in 32 bits of its key (csrc/beam_search/beam_search_math.h).
MAX_CANDIDATES = 2**32


class BeamStep(NamedTuple):
    """What :func:`beam_search_step` returns: the beams of the next step, best first."""

    scores: Tensor  # [B, K] float32 log path probabilities; -inf for an empty slot
    parents: Tensor  # [B, K] int64 the beam each came from; -1 for an empty slot
    labels: Tensor  # [B, K] int64 the label it added; -1 when carried or empty
    used: Tensor  # [B, K, W] int64 label pools (bitsets)
    finished: Tensor  # [B, K] bool


class BeamAdvance(NamedTuple):
    """What :func:`beam_search_advance` returns: the next step's beams, as rows of the search."""

    scores: Tensor  # [B, K] float32, as BeamStep.scores
    sources: Tensor  # [B * K] int64 the row (b * K + k) of the input beams each came from
    labels: Tensor  # [B * K] int64 the label it added; -1 when carried or empty
    used: Tensor  # [B, K, W] int64 label pools (bitsets)
    finished: Tensor  # [B, K] bool
    state: list[Tensor]  # each state tensor's rows picked by sources
    done: Tensor  # [] bool: every beam has finished (finished.all())


class BeamSearchResult(NamedTuple):
    """What :func:`beam_search` returns, best first along K."""

    labels: Tensor  # [B, K, T] int64, the chosen labels in order, padded with -1
    scores: Tensor  # [B, K] float32 log path probabilities; -inf for an empty slot
    lengths: Tensor  # [B, K] int64 the number of labels of each path


def pool_words(num_labels: int) -> int:
    """W, the int64 words of a label pool over ``num_labels`` labels: ceil(C / 64)."""
    return (num_labels + WORD_BITS - 1) // WORD_BITS


def beam_search_step(
    log_probs: Tensor,
    scores: Tensor,
    used: Tensor,
    finished: Tensor,
    *,
    log_threshold: float = -math.inf,
    max_length: int | None = None,
) -> BeamStep:
    """One step of batched beam search over label sets, with a label pool and a threshold stop.

    Args:
        log_probs (Tensor[B, K, C]): log-probabilities of the next label for each beam; float32,
            float16, bfloat16 or float64, added to ``scores`` in float32 (float64 rounded first).
            NaN counts as -inf.
        scores (Tensor[B, K]) float32: log path probabilities. Start with ``[0, -inf, ...]`` so
            that only beam 0 is live. A beam whose score is -inf or NaN is an empty slot.
        used (Tensor[B, K, W]) int64: each beam's pool of chosen labels, bit ``c % 64`` of word
            ``c // 64`` for label c (W = ceil(C / 64)); its popcount is the beam's length.
        finished (Tensor[B, K]) bool: beams that are complete.
        log_threshold: a path stops when its log-probability would fall below this, in
            [-inf, 0] (the log of a probability threshold).
        max_length: the most labels of a path, >= 1; default C.

    The candidates are: every finished beam, carried unchanged; for every live beam of length
    < min(max_length, C), each label c outside its pool whose score ``s + log_probs[c]`` is
    > -inf and >= ``log_threshold``; a live beam with no such label is carried and becomes
    finished. The K best candidates by the strict total order (score descending, then beam, then
    label ascending) survive; with fewer than K candidates the rest are empty slots (score
    -inf, parent and label -1, empty pool, finished). An extended beam that reaches the length
    limit is finished at once.

    Returns:
        BeamStep(scores, parents, labels, used, finished), best first: ``labels`` -1 where a beam
        was carried or is empty, ``parents`` -1 for empty slots.

    Deterministic and bitwise identical on CPU and CUDA. Not differentiable (a backward through
    the scores raises).
    CPU: batch rows in parallel, one pass over the K x C candidates per row keeping a bounded heap
    (no sort, no allocation beyond the outputs); CUDA: one block per row, a radix select in shared
    memory (K up to 2352).
    Equivalent PyTorch code: :func:`mlkernels.reference.beam_search_step`.
    """
    log_threshold, max_length = _step_settings(
        _OP, log_probs, scores, used, finished, log_threshold, max_length
    )
    out = torch.ops.mlkernels.beam_search_step(
        log_probs, scores, used, finished, log_threshold=log_threshold, max_length=max_length
    )
    return BeamStep(*out)


def _step_settings(op, log_probs, scores, used, finished, log_threshold, max_length) -> tuple:
    """The Python types of a step's arguments checked (the kernels check the rest), and
    (log_threshold, max_length) with max_length's default, C, filled in."""
    if not torch.jit.is_scripting() and not C.symbolic_tracing():
        tensors = {"log_probs": log_probs, "scores": scores, "used": used, "finished": finished}
        for name, value in tensors.items():
            C.check_tensor(op, name, value)
        log_threshold = C.as_float(op, "log_threshold", log_threshold)
        if max_length is not None:
            max_length = C.as_int(op, "max_length", max_length)
    if max_length is None:
        max_length = max(log_probs.shape[-1], 1) if log_probs.dim() > 0 else 1
    return log_threshold, max_length


def beam_search_advance(
    log_probs: Tensor,
    scores: Tensor,
    used: Tensor,
    finished: Tensor,
    state: Sequence[Tensor] = (),
    *,
    log_threshold: float = -math.inf,
    max_length: int | None = None,
) -> BeamAdvance:
    """A step of :func:`beam_search`'s driver in one op: :func:`beam_search_step`, then the rows
    the new beams came from, and the state tensors reordered along them.

    Args:
        log_probs, scores, used, finished, log_threshold, max_length: as
            :func:`beam_search_step` takes them (log_probs Tensor[B, K, C]).
        state: tensors with leading dimension B * K (row b * K + k: beam k of image b), any
            dtype, each on any device; empty for a step after which nothing reads the state.

    Returns:
        BeamAdvance(scores [B, K], sources [B * K], labels [B * K], used [B, K, W],
        finished [B, K], state, done []): scores, used and finished as :func:`beam_search_step`
        returns them; ``sources[b * K + j]`` = ``b * K + parents[b, j]``, the row of the beam
        that slot j came from (``b * K`` for an empty slot, whose state is never read);
        ``labels`` the step's labels, flat; ``state[i]`` = ``state[i].index_select(0, sources)``
        (new tensors); ``done`` = ``finished.all()``, a bool tensor on the device of scores.

    One call where the driver would make a dozen (the step, the parents into rows, a reorder per
    state tensor, the test for the search's end), each of which costs microseconds between the
    model's steps. Not differentiable. Equivalent PyTorch code:
    :func:`mlkernels.reference.beam_search_advance`.
    """
    log_threshold, max_length = _step_settings(
        _ADVANCE_OP, log_probs, scores, used, finished, log_threshold, max_length
    )
    if not torch.jit.is_scripting() and not C.symbolic_tracing():
        if not isinstance(state, (list, tuple)):
            raise TypeError(
                f"{_ADVANCE_OP}: state must be a list of tensors, got {type(state).__name__}"
            )
        for i, t in enumerate(state):
            C.check_tensor(_ADVANCE_OP, f"state[{i}]", t)
    out = torch.ops.mlkernels.beam_search_advance(
        log_probs, scores, used, finished, state, log_threshold=log_threshold, max_length=max_length
    )
    return BeamAdvance(*out)


StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]


# The driver's ops, whose arguments it has checked already: the ops themselves, looked up once
# (each step of a search would otherwise pay for the lookup and the wrapper's checks).
_raw_advance = torch.ops.mlkernels.beam_search_advance.default
_raw_backtrack = torch.ops.mlkernels.beam_search_backtrack.default


def beam_search_backtrack(
    sources: Tensor, labels: Tensor, scores: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """The end of a search (:func:`beam_search`'s driver calls it once): each final beam's labels,
    followed back through the steps, in one op.

    Args:
        sources: ``Tensor[T, R]`` int64, R = B * K: row ``r`` of step ``t`` holds the row (beam
            ``b * K + k`` of step ``t - 1``) that beam ``r`` of step ``t`` came from, in [0, R)
            (row 0 is not read); an index outside raises an IndexError (on a GPU, a device-side
            assert).
        labels: ``Tensor[T, R]`` int64: the label each beam added at step ``t`` (-1: none).
        scores: ``Tensor[B, K]`` float32, the final beams' scores (-inf or NaN: an empty slot,
            whose path is all -1).
        width: the paths' length, >= T (the steps past T are -1).

    Returns:
        ``paths Tensor[B, K, width]`` int64 (the labels of steps 0..T-1, then -1) and
        ``lengths Tensor[B, K]`` int64 (the labels >= 0 of each path). Not differentiable.
        Equivalent PyTorch code: :func:`mlkernels.reference.beam_search_backtrack`.
    """
    for name, value in (("sources", sources), ("labels", labels), ("scores", scores)):
        C.check_tensor("beam_search_backtrack", name, value)
    width = C.as_int("beam_search_backtrack", "width", width)
    return _raw_backtrack(sources, labels, scores, width)


def beam_search(
    step_fn: StepFn,
    state: Any,
    *,
    batch_size: int,
    num_labels: int,
    beam_size: int = 5,
    max_length: int | None = None,
    threshold: float = 0.0,
) -> BeamSearchResult:
    """Decode label sets with beam search (the Order-Free RNN's inference).

    Args:
        step_fn: ``step_fn(last_labels, state) -> (log_probs, state)``, with ``last_labels``
            Tensor[B*K] int64 (the label each beam added last; -1 at the start and for beams
            that were carried or are empty) and ``log_probs`` Tensor[B*K, C]. Beams are numbered
            b * K + k.
        state: a tensor, or a tuple/list/dict of them (nested, other values passed along as they
            are), each with leading dimension B*K (repeat each row K times, e.g.
            ``x.repeat_interleave(K, 0)``); reordered along the surviving beams' parents after
            every step.
        batch_size (B), num_labels (C >= 1), beam_size (K >= 1).
        max_length: the most labels of a path, >= 1; default (and at most) C.
        threshold: a path stops when its probability would fall below this, in [0, 1].

    Returns:
        BeamSearchResult(labels Tensor[B, K, T] int64 padded with -1, scores Tensor[B, K]
        float32, lengths Tensor[B, K] int64), best first along K, with T = min(max_length, C).
        A path's score is the sum of its labels' log-probabilities (float32, in step order).

    Each step calls step_fn once and :func:`beam_search_advance` once (the step, and the state
    reordered); the only host synchronisation per step is one check whether every beam has
    finished. No label repeats
    within a path. Equivalent PyTorch code: :func:`mlkernels.reference.beam_search`.
    """
    return decode(
        _raw_advance,
        _raw_backtrack,
        step_fn,
        state,
        "beam_search",
        **_settings("beam_search", batch_size, num_labels, beam_size, max_length, threshold),
    )


def _settings(op, batch_size, num_labels, beam_size, max_length, threshold) -> dict:
    """The settings of beam_search, checked, with errors that name op and argument."""
    batch_size = C.as_int(op, "batch_size", batch_size)
    num_labels = C.as_int(op, "num_labels", num_labels)
    beam_size, max_length, threshold = check_search_settings(op, beam_size, max_length, threshold)
    if batch_size < 0:
        raise ValueError(f"{op}: batch_size must be >= 0, got {batch_size}")
    if num_labels < 1:
        raise ValueError(f"{op}: num_labels must be >= 1, got {num_labels}")
    return {
        "batch_size": batch_size,
        "num_labels": num_labels,
        "beam_size": beam_size,
        "max_length": max_length,
        "threshold": threshold,
    }


def check_search_settings(
    op: str, beam_size: object, max_length: object, threshold: object
) -> tuple[int, int | None, float]:
    """beam_size >= 1, max_length None or >= 1, threshold in [0, 1]; normalized."""
    beam_size = C.as_int(op, "beam_size", beam_size)
    if beam_size < 1:
        raise ValueError(f"{op}: beam_size must be >= 1, got {beam_size}")
    if max_length is not None:
        max_length = C.as_int(op, "max_length", max_length)
        if max_length < 1:
            raise ValueError(f"{op}: max_length must be >= 1 or None, got {max_length}")
    threshold = C.as_float(op, "threshold", threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{op}: threshold must be a probability in [0, 1], got {threshold}")
    return beam_size, max_length, threshold


def _tensors(state: Any) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _tensors(s)]
    if isinstance(state, dict):
        return [t for s in state.values() for t in _tensors(s)]
    return []


def _check_state(op: str, state: Any, rows: int, what: str) -> None:
    for t in _tensors(state):
        if t.dim() == 0 or t.shape[0] != rows:
            raise ValueError(
                f"{op}: {what} must have leading dimension B * K = {rows}, got {C.shape_str(t)}"
            )


def _replace(state: Any, tensors: Iterator[Tensor]) -> Any:
    """``state`` with its tensors replaced, in :func:`_tensors`' order, by ``tensors``; the
    structure kept."""
    if isinstance(state, Tensor):
        return next(tensors)
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(_replace(s, tensors) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_replace(s, tensors) for s in state)
    if isinstance(state, dict):
        return type(state)((k, _replace(v, tensors)) for k, v in state.items())
    return state


def decode(
    advance: Callable[..., tuple],
    backtrack: Callable[..., tuple],
    step_fn: StepFn,
    state: Any,
    op: str,
    *,
    batch_size: int,
    num_labels: int,
    beam_size: int,
    max_length: int | None,
    threshold: float,
) -> BeamSearchResult:
    """The beam search driver over any implementation of the step (``advance(log_probs, scores,
    used, finished, state_tensors, log_threshold=, max_length=)``, as beam_search_advance) and of
    the backtrack (``backtrack(sources, labels, scores, width)``), ours or the reference's;
    settings checked. The steps' source rows and labels are kept (2 x B x K int64 per step run,
    nothing for steps not run) and followed back once at the end."""
    if not callable(step_fn):
        raise TypeError(f"{op}: step_fn must be callable, got {type(step_fn).__name__}")
    B, C_, K = batch_size, num_labels, beam_size
    T = min(max_length if max_length is not None else C_, C_)
    rows = B * K
    _check_state(op, state, rows, "state tensors")
    device = next(iter(_tensors(state)), torch.empty(0)).device
    log_threshold = math.log(threshold) if threshold > 0 else -math.inf

    def allocate():
        if B == 0:
            return BeamSearchResult(
                torch.full((0, K, T), -1, dtype=torch.int64, device=device),
                torch.empty((0, K), dtype=torch.float32, device=device),
                torch.zeros((0, K), dtype=torch.int64, device=device),
            )
        scores = torch.full((B, K), -math.inf, device=device)
        scores[:, 0] = 0.0
        used = None  # allocated once the first log_probs are known to have C columns
        finished = torch.zeros((B, K), dtype=torch.bool, device=device)
        last = torch.full((rows,), -1, dtype=torch.int64, device=device)
        return scores, used, finished, last

    first = _allocate(op, B, K, C_, allocate)
    if isinstance(first, BeamSearchResult):
        return first
    scores, used, finished, last = first
    sources, labels_seen = [], []
    for t in range(T):
        log_probs, state = step_fn(last, state)
        if not isinstance(log_probs, Tensor) or log_probs.shape != (rows, C_):
            got = C.shape_str(log_probs) if isinstance(log_probs, Tensor) else repr(log_probs)
            raise ValueError(
                f"{op}: step_fn must return log_probs Tensor[batch_size * beam_size, num_labels]"
                f" = Tensor[{rows}, {C_}], got {got}"
            )
        if log_probs.device != scores.device:  # a state on no device: follow the model
            scores, finished, last = (x.to(log_probs.device) for x in (scores, finished, last))
        if used is None:
            pool_shape = (B, K, pool_words(C_))
            zeros = functools.partial(scores.new_zeros, pool_shape, dtype=torch.int64)
            used = _allocate(op, B, K, C_, zeros)
        # The state is reordered only for a step to come: nothing reads it after the last one.
        last_step = t + 1 == T
        try:
            scores, source, last, used, finished, reordered, done = advance(
                log_probs.reshape(B, K, C_),
                scores,
                used,
                finished,
                [] if last_step else _tensors(state),
                log_threshold=log_threshold,
                max_length=T,
            )
        except RuntimeError:
            # The op checks the state's rows too; the driver's message says where they came from.
            _check_state(op, state, rows, "the state tensors step_fn returns")
            raise
        sources.append(source)
        labels_seen.append(last)
        # The one host synchronisation of a step (none on the last step; a meta tensor has no
        # value to look at, so a meta search runs every step).
        if last_step or (not done.is_meta and bool(done)):
            break
        state = _replace(state, iter(reordered))
    # One op for the whole backtrack (its outputs' allocation errors name it and the sizes).
    paths, lengths = backtrack(torch.stack(sources), torch.stack(labels_seen), scores, T)
    return BeamSearchResult(paths, scores, lengths)


def _allocate(op: str, B: int, K: int, C_: int, fn: Callable[[], Any]) -> Any:
    """fn(), whose allocations far beyond memory raise an error naming op and the sizes."""
    try:
        return fn()
    except RuntimeError as error:
        raise RuntimeError(
            f"{op}: the search for batch_size={B}, beam_size={K}, num_labels={C_} could not be "
            f"allocated ({str(error).strip().splitlines()[0]})"
        ) from None


# ---- fake kernel: the C++ checks, repeated, and the output shapes ----


def _check_shape(arg: str, t: Tensor, expected: tuple[int, ...], why: str, op: str = _OP) -> None:
    C.check(
        tuple(t.shape) == expected,
        f"{op}: {arg} must be Tensor[{', '.join(str(s) for s in expected)}] ({why}), "
        f"got {C.shape_str(t)}",
    )


def _check_dtype(arg: str, t: Tensor, expected: torch.dtype, op: str = _OP) -> None:
    C.check(
        t.dtype == expected,
        f"{op}: {arg} must be {C.dtype_str(expected)}, got {C.dtype_str(t.dtype)}",
    )


def _check_step(op, log_probs, scores, used, finished, log_threshold, max_length) -> tuple:
    """The C++ checks of beam_search_step's arguments (prepare_step), message for message; the
    output shapes (B, K, W)."""
    for name, t in (("log_probs", log_probs), ("scores", scores), ("used", used)):
        C.check_defined(op, name, t)
    C.check_defined(op, "finished", finished)
    C.check(
        log_probs.dim() == 3,
        f"{op}: log_probs must be Tensor[B, K, C], got {C.shape_str(log_probs)}",
    )
    C.check_floating(op, "log_probs", log_probs, allow_half=True)
    B, K, num_labels = log_probs.shape
    W = pool_words(num_labels)
    _check_shape("scores", scores, (B, K), "B and K of log_probs", op)
    _check_dtype("scores", scores, torch.float32, op)
    _check_shape("used", used, (B, K, W), "B and K of log_probs, ceil(C / 64) words", op)
    _check_dtype("used", used, torch.int64, op)
    _check_shape("finished", finished, (B, K), "B and K of log_probs", op)
    _check_dtype("finished", finished, torch.bool, op)
    for name, t in (("scores", scores), ("used", used), ("finished", finished)):
        C.check_same_device(op, "log_probs", log_probs, name, t)
    C.check(
        log_threshold <= 0.0,
        f"{op}: log_threshold must be in [-inf, 0] (the log of a probability), "
        f"got {C.num_str(log_threshold)}",
        ValueError,
    )
    C.check(max_length >= 1, f"{op}: max_length must be >= 1, got {max_length}", ValueError)
    C.check(
        K * (num_labels + 1) <= MAX_CANDIDATES,
        f"{op}: log_probs must have K * (C + 1) <= 2**32 candidates per row, "
        f"got {C.shape_str(log_probs)}",
    )
    return B, K, W


@torch.library.register_fake("mlkernels::beam_search_step")
def _beam_search_step_fake(log_probs, scores, used, finished, *, log_threshold, max_length):
    B, K, W = _check_step(_OP, log_probs, scores, used, finished, log_threshold, max_length)
    return (
        C.allocate_output(_OP, scores, (B, K)),
        C.allocate_output(_OP, scores, (B, K), dtype=torch.int64),
        C.allocate_output(_OP, scores, (B, K), dtype=torch.int64),
        C.allocate_output(_OP, scores, (B, K, W), dtype=torch.int64),
        C.allocate_output(_OP, scores, (B, K), dtype=torch.bool),
    )


@torch.library.register_fake("mlkernels::beam_search_advance")
def _beam_search_advance_fake(
    log_probs, scores, used, finished, state, *, log_threshold, max_length
):
    op = _ADVANCE_OP
    B, K, W = _check_step(op, log_probs, scores, used, finished, log_threshold, max_length)
    for i, t in enumerate(state):
        C.check(
            t.dim() >= 1 and t.shape[0] == B * K,
            f"{op}: state[{i}] must have leading dimension B * K = {B * K}, got {C.shape_str(t)}",
        )
        # A state tensor may live on another device than log_probs, but one meta tensor sends the
        # whole call here, where nothing is computed: the real tensors' results would be garbage.
        C.check(
            t.is_meta == log_probs.is_meta,
            f"{op}: state[{i}] must be on the meta device exactly when log_probs is (a meta "
            f"tensor has no values to reorder), got state[{i}] on {t.device} and log_probs on "
            f"{log_probs.device}",
        )
    return (
        C.allocate_output(op, scores, (B, K)),
        C.allocate_output(op, scores, (B * K,), dtype=torch.int64),
        C.allocate_output(op, scores, (B * K,), dtype=torch.int64),
        C.allocate_output(op, scores, (B, K, W), dtype=torch.int64),
        C.allocate_output(op, scores, (B, K), dtype=torch.bool),
        [t.new_empty(t.shape) for t in state],
        C.allocate_output(op, scores, (), dtype=torch.bool),
    )


_BACKTRACK_OP = "beam_search_backtrack"


@torch.library.register_fake("mlkernels::beam_search_backtrack")
def _beam_search_backtrack_fake(sources, labels, scores, width):
    op = _BACKTRACK_OP
    for name, t in (("sources", sources), ("labels", labels), ("scores", scores)):
        C.check_defined(op, name, t)
    C.check(
        sources.dim() == 2,
        f"{op}: sources must be Tensor[T, R] (T steps, R = B * K beams), got "
        f"{C.shape_str(sources)}",
    )
    _check_dtype("sources", sources, torch.int64, op)
    C.check(
        labels.shape == sources.shape,
        f"{op}: labels must be Tensor[{', '.join(str(s) for s in sources.shape)}] (the shape of "
        f"sources), got {C.shape_str(labels)}",
    )
    _check_dtype("labels", labels, torch.int64, op)
    C.check(
        scores.dim() == 2 and scores.numel() == sources.shape[1],
        f"{op}: scores must be Tensor[B, K] with B * K = R = {sources.shape[1]} (the beams of "
        f"sources), got {C.shape_str(scores)}",
    )
    _check_dtype("scores", scores, torch.float32, op)
    C.check_same_device(op, "sources", sources, "labels", labels)
    C.check_same_device(op, "sources", sources, "scores", scores)
    C.check(
        width >= sources.shape[0],
        f"{op}: width must be at least the number of steps T = {sources.shape[0]}, got {width}",
        ValueError,
    )
    B, K = scores.shape
    return (
        C.allocate_output(op, scores, (B, K, width), dtype=torch.int64),
        C.allocate_output(op, scores, (B, K), dtype=torch.int64),
    )
