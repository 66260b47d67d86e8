"""beam_search_step / beam_search / nn.LabelBeamSearch: every implementation of the step (CPU, the
CUDA kernel's logic on the grid emulator, CUDA) against the pure-PyTorch reference, to the bit;
the decoder against exhaustive enumeration and greedy decoding; the contract's properties (no
repeats, pool sizes, monotone scores, used labels irrelevant, batch permutation, repeatable runs,
the tie order); opcheck, bad input, empty input."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from helpers import ALL_IMPLS, DEVICE_IMPLS, IMPLS, assert_raises, impl_params
from hypothesis import assume, given
from hypothesis import strategies as st

from mlkernels import nn, ops, reference
from mlkernels.ops.beam_search import pool_words

INF = math.inf
LOG_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# ---- inputs ----


def initial_state(B: int, K: int, C: int):
    """The state of a search before its first step: only beam 0 live."""
    scores = torch.full((B, K), -INF)
    if K:
        scores[:, 0] = 0.0
    used = torch.zeros(B, K, pool_words(C), dtype=torch.int64)
    return scores, used, torch.zeros(B, K, dtype=torch.bool)


def random_pools(g: torch.Generator, B: int, K: int, C: int, density: float) -> torch.Tensor:
    """Random bitset pools over C labels (no bit at or past C)."""
    bits = torch.rand(B, K, C, generator=g) < density
    used = torch.zeros(B, K, pool_words(C), dtype=torch.int64)
    for c in range(C):
        used[:, :, c // 64] |= bits[:, :, c].long() << (c % 64)
    return used


def random_step_inputs(seed: int, B: int, K: int, C: int, dtype: torch.dtype, ties: bool):
    """A step's inputs in any state a search can reach or a caller can build: empty slots (-inf
    and NaN scores), finished beams, full and partial pools, NaN and -inf log-probs, and (ties)
    values from a small set so that scores tie across beams and labels."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        log_probs = -torch.randint(0, 4, (B, K, C), generator=g).double() / 2
        scores = -torch.randint(0, 3, (B, K), generator=g).float() / 2
    else:
        log_probs = torch.randn(B, K, C, generator=g, dtype=torch.float64).log_softmax(-1)
        scores = -torch.rand(B, K, generator=g) * 5
    odd = torch.rand(B, K, C, generator=g)
    log_probs[odd < 0.05] = math.nan
    log_probs[(odd >= 0.05) & (odd < 0.1)] = -INF
    kind = torch.rand(B, K, generator=g)
    scores[kind < 0.1] = -INF
    scores[(kind >= 0.1) & (kind < 0.15)] = math.nan
    scores[(kind >= 0.15) & (kind < 0.2)] = -0.0
    finished = torch.rand(B, K, generator=g) < 0.2
    used = random_pools(g, B, K, C, float(torch.rand(1, generator=g)))
    return log_probs.to(dtype), scores, used, finished


def step_args(inputs, log_threshold: float, max_length: int):
    return (*inputs, log_threshold, max_length)


def call_step(impl, log_probs, scores, used, finished, log_threshold=-INF, max_length=None):
    """The raw op of impl (CPU tensors in and out)."""
    if max_length is None:
        max_length = max(log_probs.shape[-1], 1)
    op = impl.ops.beam_search_step
    out = op(
        *impl.to(log_probs, scores, used, finished),
        log_threshold=log_threshold,
        max_length=max_length,
    )
    return ops.BeamStep(*(t.cpu() for t in out))


def assert_steps_equal(got, want, what=""):
    for name, a, b in zip(ops.BeamStep._fields, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name, a, b)
        if a.is_floating_point():
            # to the bit, -0.0 and NaN included (the bits of the float32 scores)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (what, name, a, b)
        else:
            assert torch.equal(a, b), (what, name, a, b)


sizes = st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(0, 70))


# ---- the step: every implementation against the reference, to the bit ----


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    shape=sizes,
    dtype=st.sampled_from(LOG_DTYPES),
    ties=st.booleans(),
    threshold=st.sampled_from([-INF, -1.5, -0.5, 0.0]),
    max_length=st.integers(1, 8),
)
def test_step_matches_reference(impl, seed, shape, dtype, ties, threshold, max_length):
    inputs = random_step_inputs(seed, *shape, dtype, ties)
    got = call_step(impl, *inputs, threshold, max_length)
    want = reference.beam_search_step(*inputs, log_threshold=threshold, max_length=max_length)
    assert_steps_equal(got, want)
    if impl.name != "cpu":
        assert_steps_equal(got, call_step(IMPLS["cpu"], *inputs, threshold, max_length))


@pytest.mark.parametrize("impl", impl_params("cpu", "emulated"))
@given(seed=st.integers(0, 2**31), C=st.sampled_from([1, 63, 64, 65, 130]), ties=st.booleans())
def test_step_matches_reference_across_pool_words(impl, seed, C, ties):
    """Pools of one, two and three words; labels at word boundaries."""
    inputs = random_step_inputs(seed, 2, 3, C, torch.float32, ties)
    got = call_step(impl, *inputs, -INF, C)
    assert_steps_equal(got, reference.beam_search_step(*inputs, max_length=C))


@ALL_IMPLS
@pytest.mark.parametrize("ties", [False, True])
def test_step_matches_reference_with_many_beams(impl, ties):
    """Rows of 40 x 131 candidates: the CUDA kernel's full block of threads, many radix rounds."""
    inputs = random_step_inputs(11, 3, 40, 130, torch.float32, ties)
    for threshold in (-INF, -3.0):
        got = call_step(impl, *inputs, threshold, 6)
        want = reference.beam_search_step(*inputs, log_threshold=threshold, max_length=6)
        assert_steps_equal(got, want)


@ALL_IMPLS
def test_ties_follow_score_then_beam_then_label(impl):
    # Every candidate of beams 0 and 1 scores -1: the order is beam 0's labels, then beam 1's;
    # beam 2 (finished, -1) is carried and ties too, after them; beam 3 is empty.
    log_probs = torch.full((1, 4, 3), -1.0)
    log_probs[0, 0, 1] = -0.5  # the one better candidate comes first
    scores = torch.tensor([[0.0, 0.0, -1.0, -INF]])
    used = torch.tensor([[[0b010], [0b001], [0], [0]]])  # beam 0 used label 1, beam 1 label 0
    finished = torch.tensor([[False, False, True, False]])
    out = call_step(impl, log_probs, scores, used, finished)
    assert out.scores.tolist() == [[-1.0, -1.0, -1.0, -1.0]]
    assert out.parents.tolist() == [[0, 0, 1, 1]]
    assert out.labels.tolist() == [[0, 2, 1, 2]]
    assert out.used.tolist() == [[[0b011], [0b110], [0b011], [0b101]]]
    assert out.finished.tolist() == [[False, False, False, False]]
    # -0.0 ties +0.0: beam order decides.
    out = call_step(
        impl, torch.zeros(1, 2, 1), torch.tensor([[-0.0, 0.0]]), *initial_state(1, 2, 1)[1:]
    )
    assert out.parents.tolist() == [[0, 1]] and out.labels.tolist() == [[0, 0]]


@ALL_IMPLS
def test_carry_pad_and_finish(impl):
    """A live beam with no candidate above the threshold is carried and finished; too few
    candidates pad with empty slots; reaching max_length finishes a beam at once."""
    log_probs = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]]))
    scores = torch.tensor([[math.log(0.5), math.log(0.01), -INF]])
    used = torch.tensor([[[0b100], [0b001], [0]]])
    finished = torch.zeros(1, 3, dtype=torch.bool)
    out = call_step(impl, log_probs, scores, used, finished, math.log(0.1), 2)
    # beam 0: labels 0 (0.25) and 1 (0.15) pass 0.1; beam 1: nothing passes -> carried
    assert out.parents.tolist() == [[0, 0, 1]]
    assert out.labels.tolist() == [[0, 1, -1]]
    assert out.finished.tolist() == [[True, True, True]]  # length 2 == max_length, carried
    torch.testing.assert_close(out.scores[0, :2], torch.log(torch.tensor([0.25, 0.15])))
    assert out.scores[0, 2] == scores[0, 1]
    # One live beam, one label: one candidate, then padding.
    out = call_step(impl, torch.zeros(1, 3, 1), *initial_state(1, 3, 1))
    assert out.labels.tolist() == [[0, -1, -1]] and out.parents.tolist() == [[0, -1, -1]]
    assert out.scores.tolist() == [[0.0, -INF, -INF]]
    assert out.used.tolist() == [[[1], [0], [0]]] and out.finished.tolist() == [[True] * 3]


# ---- the step's properties ----


@ALL_IMPLS
@given(seed=st.integers(0, 2**31), shape=sizes, dtype=st.sampled_from(LOG_DTYPES))
def test_used_labels_are_irrelevant(impl, seed, shape, dtype):
    inputs = random_step_inputs(seed, *shape, dtype, ties=False)
    log_probs, scores, used, finished = inputs
    B, K, C = log_probs.shape
    labels = torch.arange(C)
    in_pool = ((used[:, :, labels // 64] >> (labels % 64)) & 1) == 1
    changed = log_probs.clone()
    changed[in_pool] = torch.tensor([0.0, math.nan, 1e4, -INF])[seed % 4].to(dtype)
    assert_steps_equal(
        call_step(impl, changed, scores, used, finished, -1.0, 5),
        call_step(impl, log_probs, scores, used, finished, -1.0, 5),
    )


@ALL_IMPLS
@given(seed=st.integers(0, 2**31), shape=sizes, ties=st.booleans())
def test_batch_permutation_permutes_the_output(impl, seed, shape, ties):
    inputs = random_step_inputs(seed, *shape, torch.float32, ties)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
    permuted = [t[perm] for t in inputs]
    out = call_step(impl, *inputs, -2.0, 4)
    assert_steps_equal(call_step(impl, *permuted, -2.0, 4), [t[perm] for t in out])


@DEVICE_IMPLS
def test_bitwise_repeatable_at_any_thread_count(impl):
    inputs = random_step_inputs(7, 64, 8, 300, torch.float32, ties=True)
    first = call_step(impl, *inputs, -INF, 10)
    threads = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            for _ in range(2):
                assert_steps_equal(call_step(impl, *inputs, -INF, 10), first)
    finally:
        torch.set_num_threads(threads)


@ALL_IMPLS
@given(seed=st.integers(0, 2**31), shape=sizes, steps=st.integers(1, 6))
def test_pools_scores_and_lengths_along_steps(impl, seed, shape, steps):
    """Run steps from the initial state: no label repeats, popcount(used) is the length, scores
    never increase (log-probs <= 0) and equal the float32 sum of the chosen log-probs."""
    B, K, C = shape
    g = torch.Generator().manual_seed(seed)
    scores, used, finished = initial_state(B, K, C)
    paths = [[[] for _ in range(K)] for _ in range(B)]
    sums = np.zeros((B, K), dtype=np.float32)
    for _ in range(steps):
        log_probs = torch.randn(B, K, C, generator=g).log_softmax(-1)
        out = call_step(impl, log_probs, scores, used, finished, -6.0, 4)
        new_paths, new_sums = [], np.full((B, K), -np.inf, dtype=np.float32)
        for b in range(B):
            row = []
            for j in range(K):
                parent, label = out.parents[b, j].item(), out.labels[b, j].item()
                if parent < 0:
                    assert out.scores[b, j] == -INF and label == -1 and out.finished[b, j]
                    row.append(None)
                    continue
                path = list(paths[b][parent])
                new_sums[b, j] = sums[b, parent]
                if label >= 0:
                    assert label not in path
                    new_sums[b, j] = np.float32(
                        sums[b, parent] + log_probs[b, parent, label].item()
                    )
                    path.append(label)
                else:
                    assert out.finished[b, j]
                assert out.scores[b, j].item() <= scores[b, parent].item()
                assert out.scores[b, j].item() == new_sums[b, j]
                bits = sum(bin(w & (2**64 - 1)).count("1") for w in out.used[b, j].tolist())
                assert bits == len(path) <= 4
                assert set(path) == {
                    c for c in range(C) if (out.used[b, j, c // 64] >> (c % 64)) & 1
                }
                row.append(path)
            new_paths.append(row)
        paths, sums = new_paths, new_sums
        scores, used, finished = out.scores, out.used, out.finished


# ---- the decoder against exhaustive enumeration and greedy decoding ----


class TableModel:
    """A step function whose log-probs are a fixed random function of the whole prefix (the
    labels chosen so far, in order) and the batch row; its state is the prefix."""

    def __init__(self, seed: int, B: int, C: int, T: int, ties: bool):
        g = torch.Generator().manual_seed(seed)
        self.B, self.C, self.T = B, C, T
        n = B * (C + 1) ** T
        if ties:
            self.table = -torch.randint(0, 3, (n, C), generator=g).float() / 2
        else:
            self.table = torch.randn(n, C, generator=g).log_softmax(-1)
        self.table[torch.rand(n, C, generator=g) < 0.1] = -INF

    def code(self, b: int, prefix: list[int]) -> int:
        code = b
        for label in prefix:
            code = code * (self.C + 1) + label + 1
        return code * (self.C + 1) ** (self.T - len(prefix))

    def log_probs(self, b: int, prefix: list[int]) -> torch.Tensor:
        return self.table[self.code(b, prefix)]

    def state(self, K: int):
        """Nested, with a value that is not a tensor: the driver reorders every tensor."""
        rows = self.B * K
        return {"prefix": torch.full((rows, self.T), -1), "more": [torch.zeros(rows).long(), 7]}

    def __call__(self, last, state):
        prefix, length = state["prefix"].clone(), state["more"][0].clone()
        added = last >= 0
        prefix[added, length[added]] = last[added]
        length = length + added.long()
        K = prefix.shape[0] // self.B
        rows = [
            self.log_probs(r // K, [c for c in prefix[r].tolist() if c >= 0])
            for r in range(prefix.shape[0])
        ]
        return torch.stack(rows), {"prefix": prefix, "more": [length, state["more"][1]]}


def exhaustive(model: TableModel, b: int, T: int, log_threshold: float):
    """Every terminal path (one no label can extend, or of length T) with its float32 score."""
    out = []
    log_threshold = np.float32(log_threshold)  # compared in float32, as the op

    def walk(prefix, score):
        if len(prefix) < T:
            lp = model.log_probs(b, prefix)
            extended = False
            for c in range(model.C):
                if c in prefix:
                    continue
                s = np.float32(score + np.float32(lp[c].item()))
                if s > -np.inf and s >= log_threshold:
                    extended = True
                    walk([*prefix, c], s)
            if extended:
                return
        out.append((tuple(prefix), float(score)))

    walk([], np.float32(0.0))
    return out


def result_paths(result, b: int):
    paths = []
    for j in range(result.labels.shape[1]):
        if result.scores[b, j] == -INF:
            assert (result.labels[b, j] == -1).all() and result.lengths[b, j] == 0
            continue
        n = result.lengths[b, j].item()
        labels = result.labels[b, j].tolist()
        assert all(c >= 0 for c in labels[:n]) and all(c == -1 for c in labels[n:])
        assert len(set(labels[:n])) == n  # no label repeats
        paths.append((tuple(labels[:n]), result.scores[b, j].item()))
    return paths


SEARCHES = {"ops": ops.beam_search, "reference": reference.beam_search}


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@given(
    seed=st.integers(0, 2**31),
    B=st.integers(1, 2),
    C=st.integers(1, 4),
    T=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    ties=st.booleans(),
)
def test_search_equals_exhaustive_enumeration(search, seed, B, C, T, threshold, ties):
    assume(T <= C)
    model = TableModel(seed, B, C, T, ties)
    log_threshold = math.log(threshold) if threshold else -INF
    K = sum(math.perm(C, n) for n in range(T + 1))  # every path of every length: nothing pruned
    result = search(
        model,
        model.state(K),
        batch_size=B,
        num_labels=C,
        beam_size=K,
        max_length=T,
        threshold=threshold,
    )
    assert result.labels.shape == (B, K, T)
    for b in range(B):
        want = exhaustive(model, b, T, log_threshold)
        got = result_paths(result, b)
        assert sorted(got) == sorted(want)
        # best first, by the total order (score descending)
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)
    # Small beams: every returned path is a terminal path with its exact score; the best is
    # never better than the best there is.
    for k in (1, 2):
        small = search(
            model,
            model.state(k),
            batch_size=B,
            num_labels=C,
            beam_size=k,
            max_length=T,
            threshold=threshold,
        )
        for b in range(B):
            want = exhaustive(model, b, T, log_threshold)
            got = result_paths(small, b)
            assert set(got) <= set(want)
            assert got and got[0][1] <= max(s for _, s in want)


def greedy(model: TableModel, b: int, T: int, log_threshold: float):
    prefix, score = [], np.float32(0.0)
    log_threshold = np.float32(log_threshold)
    while len(prefix) < T:
        lp = model.log_probs(b, prefix)
        best = None
        for c in range(model.C):
            s = np.float32(score + np.float32(lp[c].item()))
            if (
                c not in prefix
                and s > -np.inf
                and s >= log_threshold
                and (best is None or s > best[1])
            ):
                best = (c, s)
        if best is None:
            break
        prefix.append(best[0])
        score = best[1]
    return tuple(prefix), float(score)


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
@given(
    seed=st.integers(0, 2**31),
    C=st.integers(1, 6),
    T=st.integers(1, 3),
    threshold=st.sampled_from([0.0, 0.05, 0.2]),
    ties=st.booleans(),
)
def test_beam_size_one_is_greedy_decoding_with_the_pool(search, seed, C, T, threshold, ties):
    model = TableModel(seed, 2, C, T, ties)
    result = search(
        model,
        model.state(1),
        batch_size=2,
        num_labels=C,
        beam_size=1,
        max_length=T,
        threshold=threshold,
    )
    for b in range(2):
        want = greedy(model, b, min(T, C), math.log(threshold) if threshold else -INF)
        assert result_paths(result, b) == [want]


@pytest.mark.parametrize("search", SEARCHES.values(), ids=SEARCHES.keys())
def test_search_is_bitwise_repeatable(search):
    model = TableModel(3, 3, 6, 4, ties=True)
    runs = [
        search(model, model.state(4), batch_size=3, num_labels=6, beam_size=4, max_length=4)
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- the driver ----


def lstm_step(C: int, hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(C + 1, hidden)
    cell = torch.nn.LSTMCell(hidden, hidden)
    head = torch.nn.Linear(hidden, C)

    @torch.no_grad()
    def step(last, state):
        h, c = cell(embed(last + 1), (state["h"], state["c"]))
        return head(h).log_softmax(-1), {"h": h, "c": c, "tag": state["tag"]}

    return step


def test_ops_and_reference_decoders_agree_with_an_lstm():
    B, K, C, H = 3, 4, 10, 16
    step = lstm_step(C, H)
    state = {"h": torch.randn(B, H).repeat_interleave(K, 0), "c": torch.zeros(B * K, H), "tag": 1}
    args = {"batch_size": B, "num_labels": C, "beam_size": K, "max_length": 5, "threshold": 0.01}
    ours = ops.beam_search(step, state, **args)
    want = reference.beam_search(step, state, **args)
    layer = nn.LabelBeamSearch(K, 5, 0.01)
    assert "beam_size=4, max_length=5, threshold=0.01" in repr(layer)
    for a, b, c in zip(ours, want, layer(step, state, B, C), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert ours.labels.shape == (B, K, 5) and ours.lengths.max() <= 5
    assert (ours.scores[:, 1:] <= ours.scores[:, :-1]).all()


def test_decoder_errors():
    step = lstm_step(4)
    good = {"h": torch.zeros(2, 16), "c": torch.zeros(2, 16), "tag": 0}
    args = {"batch_size": 1, "num_labels": 4, "beam_size": 2}
    cases = [
        ({"beam_size": 0}, ValueError, "beam_search: beam_size must be >= 1, got 0"),
        ({"max_length": 0}, ValueError, "beam_search: max_length must be >= 1 or None, got 0"),
        (
            {"threshold": 1.5},
            ValueError,
            r"beam_search: threshold must be a probability in \[0, 1\]",
        ),
        ({"threshold": -0.1}, ValueError, r"threshold must be a probability in \[0, 1\]"),
        ({"threshold": math.nan}, ValueError, r"threshold must be a probability"),
        ({"num_labels": 0}, ValueError, "beam_search: num_labels must be >= 1, got 0"),
        ({"batch_size": -1}, ValueError, "beam_search: batch_size must be >= 0, got -1"),
        ({"beam_size": "2"}, TypeError, "beam_search: beam_size must be an int"),
        ({"batch_size": 3}, ValueError, r"state tensors must have leading dimension B \* K = 6"),
        (
            {"num_labels": 5},
            ValueError,
            r"step_fn must return log_probs Tensor\[batch_size \* beam_size, num_labels\]",
        ),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            ops.beam_search(step, good, **(args | extra))
    with pytest.raises(TypeError, match="beam_search: step_fn must be callable"):
        ops.beam_search(None, good, **args)

    def shrinking(last, state):  # returns one state row too few
        log_probs, state = step(last, state)
        return log_probs, {**state, "c": state["c"][1:]}

    for search in (ops.beam_search, reference.beam_search):
        with pytest.raises(
            ValueError,
            match=r"beam_search: the state tensors step_fn returns must have leading dimension "
            r"B \* K = 2, got Tensor\[1, 16\]",
        ):
            search(shrinking, good, **args)
    with pytest.raises(ValueError, match="LabelBeamSearch: beam_size must be >= 1, got 0"):
        nn.LabelBeamSearch(0)
    with pytest.raises(ValueError, match=r"LabelBeamSearch: threshold must be a probability"):
        nn.LabelBeamSearch(2, None, 2.0)


def test_empty_batch_one_label_one_beam():
    calls = []

    def step(last, state):
        calls.append(last)
        return torch.zeros(last.shape[0], 1), state

    empty = ops.beam_search(step, torch.zeros(0, 3), batch_size=0, num_labels=1, beam_size=3)
    assert not calls and empty.labels.shape == (0, 3, 1) and empty.scores.shape == (0, 3)
    # One label: one path of it, then empty slots.
    result = ops.beam_search(step, torch.zeros(6, 3), batch_size=2, num_labels=1, beam_size=3)
    assert result.labels.tolist() == [[[0], [-1], [-1]]] * 2
    assert result.lengths.tolist() == [[1, 0, 0]] * 2
    assert result.scores.tolist() == [[0.0, -INF, -INF]] * 2
    assert len(calls) == 1 and calls[0].tolist() == [-1] * 6
    # Step op on B = 0, C = 0, K = 1
    for B, K, C in [(0, 3, 5), (2, 2, 0), (2, 1, 3)]:
        inputs = (torch.zeros(B, K, C), *initial_state(B, K, C))
        got = ops.beam_search_step(*inputs, max_length=3)
        assert_steps_equal(got, reference.beam_search_step(*inputs, max_length=3))


# ---- opcheck, bad input ----


def _opcheck_inputs():
    for seed, (shape, dtype) in enumerate(
        [((2, 3, 7), torch.float32), ((1, 4, 70), torch.bfloat16), ((0, 2, 3), torch.float16)]
    ):
        yield random_step_inputs(seed, *shape, dtype, ties=True)


@DEVICE_IMPLS
@pytest.mark.parametrize("inputs", list(_opcheck_inputs()), ids=["f32", "bf16", "empty"])
def test_opcheck(impl, inputs):
    args = tuple(impl.to(t) for t in inputs)
    torch.library.opcheck(
        torch.ops.mlkernels.beam_search_step,
        args,
        {"log_threshold": -1.0, "max_length": 3},
    )


def test_step_is_not_differentiable():
    log_probs = torch.randn(1, 2, 3, requires_grad=True)
    out = ops.beam_search_step(log_probs, *initial_state(1, 2, 3))
    with pytest.raises(
        RuntimeError, match="derivative for mlkernels::beam_search_step is not impl"
    ):
        out.scores.sum().backward()


def _bad(log_probs=(2, 3, 5), scores=None, used=None, finished=None, **kw):
    B, K, C = log_probs
    lp = torch.zeros(log_probs)
    s, u, f = initial_state(B, K, C)
    return (
        lp,
        scores if scores is not None else s,
        used if used is not None else u,
        finished if finished is not None else f,
    ), kw


BAD = [
    (
        ((torch.zeros(2, 3), *initial_state(2, 3, 3)), {}),
        RuntimeError,
        r"beam_search_step: log_probs must be Tensor\[B, K, C\], got Tensor\[2, 3\]",
    ),
    (
        (
            (torch.zeros(2, 3, 5, dtype=torch.int32), *initial_state(2, 3, 5)),
            {},
        ),
        RuntimeError,
        "beam_search_step: log_probs must be float16, bfloat16, float32 or float64, got int32",
    ),
    (
        _bad(scores=torch.zeros(3, 2)),
        RuntimeError,
        r"beam_search_step: scores must be Tensor\[2, 3\] \(B and K of log_probs\), "
        r"got Tensor\[3, 2\]",
    ),
    (
        _bad(scores=torch.zeros(2, 3, dtype=torch.float64)),
        RuntimeError,
        "beam_search_step: scores must be float32, got float64",
    ),
    (
        _bad(used=torch.zeros(2, 3, 2, dtype=torch.int64)),
        RuntimeError,
        r"beam_search_step: used must be Tensor\[2, 3, 1\] \(B and K of log_probs, ceil\(C / 64\) "
        r"words\), got Tensor\[2, 3, 2\]",
    ),
    (
        _bad((2, 3, 65), used=torch.zeros(2, 3, 1, dtype=torch.int64)),
        RuntimeError,
        r"used must be Tensor\[2, 3, 2\]",
    ),
    (
        _bad(used=torch.zeros(2, 3, 1, dtype=torch.int32)),
        RuntimeError,
        "beam_search_step: used must be int64, got int32",
    ),
    (
        _bad(finished=torch.zeros(2, 3, dtype=torch.uint8)),
        RuntimeError,
        "beam_search_step: finished must be bool, got uint8",
    ),
    (
        _bad(finished=torch.zeros(2, 4, dtype=torch.bool)),
        RuntimeError,
        r"beam_search_step: finished must be Tensor\[2, 3\]",
    ),
    (
        _bad(scores=torch.zeros(2, 3, device="meta")),
        RuntimeError,
        r"beam_search_step: scores must be on the device of log_probs \(cpu\), got meta",
    ),
    (
        _bad(log_threshold=0.5),
        ValueError,
        r"beam_search_step: log_threshold must be in \[-inf, 0\] \(the log of a probability\), "
        r"got 0.5",
    ),
    (_bad(log_threshold=math.nan), ValueError, r"log_threshold must be in \[-inf, 0\]"),
    (_bad(max_length=0), ValueError, "beam_search_step: max_length must be >= 1, got 0"),
]


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_messages(case, mode):
    (args, kwargs), error, message = case
    if mode == "fake" and any(t.is_meta for t in args):
        pytest.skip("a meta tensor runs the fake kernel in eager mode already")
    for fn in (ops.beam_search_step, _raw_step):
        assert_raises(functools.partial(fn, **kwargs), args, error, message, mode)


def _raw_step(log_probs, scores, used, finished, log_threshold=-INF, max_length=3):
    return torch.ops.mlkernels.beam_search_step(
        log_probs, scores, used, finished, log_threshold=log_threshold, max_length=max_length
    )


def test_wrapper_argument_types():
    args, _ = _bad()
    with pytest.raises(TypeError, match="beam_search_step: log_probs must be a Tensor, got list"):
        ops.beam_search_step([1.0], *args[1:])
    with pytest.raises(TypeError, match="beam_search_step: max_length must be an int"):
        ops.beam_search_step(*args, max_length=2.5)
    with pytest.raises(TypeError, match="beam_search_step: log_threshold must be a number"):
        ops.beam_search_step(*args, log_threshold="low")


@pytest.mark.parametrize("impl", impl_params("emulated"))
def test_cuda_kernel_refuses_beams_beyond_shared_memory(impl):
    inputs = (torch.zeros(1, 5000, 1), *initial_state(1, 5000, 1))
    with pytest.raises(
        RuntimeError, match=r"beam_search_step: the CUDA kernel .* takes K up to \d+"
    ):
        call_step(impl, *inputs)


def test_non_contiguous_inputs():
    inputs = random_step_inputs(5, 3, 4, 9, torch.float32, ties=True)
    strided = [torch.stack([t, t], -1)[..., 0] for t in inputs]
    assert not strided[0].is_contiguous()
    assert_steps_equal(
        ops.beam_search_step(*strided, max_length=3), ops.beam_search_step(*inputs, max_length=3)
    )


@pytest.mark.cuda
def test_search_on_cuda_equals_cpu():
    B, K, C, H = 3, 4, 10, 16
    step = lstm_step(C, H)
    state = {"h": torch.randn(B, H).repeat_interleave(K, 0), "c": torch.zeros(B * K, H), "tag": 1}
    args = {"batch_size": B, "num_labels": C, "beam_size": K, "max_length": 5, "threshold": 0.01}
    want = ops.beam_search(step, state, **args)
    cuda_step = lstm_step(C, H)  # the same weights (seeded), moved to the GPU
    for module in cuda_step.__closure__:
        if isinstance(module.cell_contents, torch.nn.Module):
            module.cell_contents.cuda()
    cuda_state = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    got = ops.beam_search(cuda_step, cuda_state, **args)
    # The LSTM's float32 products round differently on a GPU, so the scores agree to rounding
    # (and the paths, unless two of them score within that rounding of each other).
    torch.testing.assert_close(got.scores.cpu(), want.scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.labels.cpu(), want.labels)
    assert got.labels.device.type == "cuda" and got.lengths.device.type == "cuda"


# ---- the backtrack at the search's end: every implementation against the reference ----


def random_backtrack_inputs(seed: int, B: int, K: int, T: int, C: int = 9):
    """Sources in range (except step 0's, which is never read), labels in [-1, C), final scores
    with empty slots (-inf, NaN)."""
    g = torch.Generator().manual_seed(seed)
    R = B * K
    sources = torch.randint(0, max(R, 1), (T, R), generator=g)
    if T:
        sources[0] = torch.randint(-5, 3 * R + 5, (R,), generator=g)  # never read
    labels = torch.randint(-1, C, (T, R), generator=g)
    scores = -torch.rand(B, K, generator=g) * 3
    kind = torch.rand(B, K, generator=g)
    scores[kind < 0.15] = -INF
    scores[(kind >= 0.15) & (kind < 0.25)] = math.nan
    return sources, labels, scores


def call_backtrack(impl, sources, labels, scores, width):
    out = impl.ops.beam_search_backtrack(*impl.to(sources, labels, scores), width)
    return tuple(t.cpu() for t in out)


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    B=st.integers(0, 4),
    K=st.integers(1, 6),
    T=st.integers(0, 7),
    extra=st.integers(0, 3),
)
def test_backtrack_matches_reference(impl, seed, B, K, T, extra):
    sources, labels, scores = random_backtrack_inputs(seed, B, K, T)
    paths, lengths = call_backtrack(impl, sources, labels, scores, T + extra)
    want_paths, want_lengths = reference.beam_search_backtrack(sources, labels, scores, T + extra)
    assert paths.dtype == lengths.dtype == torch.int64
    assert torch.equal(paths, want_paths) and torch.equal(lengths, want_lengths)


@ALL_IMPLS
def test_backtrack_by_hand(impl):
    # B = 1, K = 2, 3 steps. Final beam 0 came from row 1 of step 1, which came from row 0 of
    # step 0; final beam 1 from row 0 of step 1, from row 1 of step 0; it carried at step 1.
    sources = torch.tensor([[0, 0], [1, 0], [1, 0]])
    labels = torch.tensor([[4, 7], [-1, 2], [5, 6]])
    scores = torch.tensor([[-1.0, -2.0]])
    paths, lengths = call_backtrack(impl, sources, labels, scores, 4)
    assert paths.tolist() == [[[4, 2, 5, -1], [7, -1, 6, -1]]]
    assert lengths.tolist() == [[3, 2]]
    scores[0, 1] = -INF  # an empty slot: no path
    paths, lengths = call_backtrack(impl, sources, labels, scores, 3)
    assert paths.tolist() == [[[4, 2, 5], [-1, -1, -1]]] and lengths.tolist() == [[3, 0]]


@pytest.mark.parametrize("impl", impl_params("cpu", "emulated"))
def test_backtrack_refuses_a_source_out_of_range(impl):
    sources = torch.tensor([[0, 0], [0, 1], [2, 0]])  # final beam 0 comes from row 2 of 2
    labels = torch.zeros(3, 2, dtype=torch.int64)
    scores = torch.tensor([[-1.0, -2.0]])
    for backtrack in (impl.ops.beam_search_backtrack, reference.beam_search_backtrack):
        with pytest.raises(IndexError, match=r"sources must hold rows in \[0, R = 2\)"):
            backtrack(sources, labels, scores, 3)
    scores[0, 0] = -INF  # an empty slot is not followed: its source is not read
    paths, _ = call_backtrack(impl, sources, labels, scores, 3)
    assert paths[0, 0].tolist() == [-1, -1, -1]


@DEVICE_IMPLS
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 1), (0, 2, 3), (3, 2, 0)])
def test_backtrack_opcheck(impl, shape):
    B, K, T = shape
    args = impl.to(*random_backtrack_inputs(0, B, K, T))
    torch.library.opcheck(torch.ops.mlkernels.beam_search_backtrack, (*args, T + 1))


BAD_BACKTRACK = [
    ((torch.zeros(2, dtype=torch.int64),), RuntimeError, "sources must be Tensor\\[T, R\\]"),
    ((torch.zeros(2, 2),), RuntimeError, "sources must be int64, got float32"),
    ((None, torch.zeros(2, 3, dtype=torch.int64)), RuntimeError, "labels must be Tensor\\[2, 2\\]"),
    ((None, torch.zeros(2, 2)), RuntimeError, "labels must be int64"),
    ((None, None, torch.zeros(1, 3)), RuntimeError, "scores must be Tensor\\[B, K\\] with B \\* K"),
    ((None, None, torch.zeros(1, 2, dtype=torch.float64)), RuntimeError, "scores must be float32"),
    ((None, None, None, 1), ValueError, "width must be at least the number of steps T = 2, got 1"),
]


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", BAD_BACKTRACK, ids=[str(i) for i in range(len(BAD_BACKTRACK))])
def test_backtrack_bad_input_messages(case, mode):
    changes, error, message = case
    args = [torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)]
    args += [torch.zeros(1, 2), 2]
    for i, value in enumerate(changes):
        if value is not None:
            args[i] = value
    assert_raises(
        ops.beam_search_backtrack, tuple(args), error, f"beam_search_backtrack: {message}", mode
    )


# ---- the driver's step, beam_search_advance: every implementation against the reference ----


def random_state(seed: int, rows: int) -> list[torch.Tensor]:
    """State tensors of several dtypes and ranks, with rows = B * K: contiguous (copied row by row
    on the CPU), non-contiguous, a lazily conjugated complex one and an empty one (index_select)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 3, 2, generator=g)
    return [
        hidden,
        torch.randint(-5, 5, (rows,), generator=g),
        torch.rand(rows, 4, generator=g) < 0.5,
        torch.randn(2, rows, generator=g, dtype=torch.float64).t(),
        torch.randn(rows, 2, generator=g, dtype=torch.complex64).conj(),
        torch.zeros(rows, 0, 3),
    ]


def call_advance(impl, log_probs, scores, used, finished, state, log_threshold, max_length):
    out = impl.ops.beam_search_advance(
        *impl.to(log_probs, scores, used, finished),
        [impl.to(t) for t in state],
        log_threshold=log_threshold,
        max_length=max_length,
    )
    return ops.BeamAdvance(*(t.cpu() for t in out[:5]), [t.cpu() for t in out[5]], out[6].cpu())


def assert_advances_equal(got, want):
    """To the bit, -0.0 and NaN scores included."""
    for name in ops.BeamAdvance._fields[:5]:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a, b)
        bits = (lambda t: t.view(torch.int32)) if a.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(a), bits(b)), (name, a, b)
    assert len(got.state) == len(want.state)
    for a, b in zip(got.state, want.state, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)
    assert (
        got.done.dtype == torch.bool and got.done.shape == () and torch.equal(got.done, want.done)
    )


@ALL_IMPLS
@given(
    seed=st.integers(0, 2**31),
    shape=sizes,
    dtype=st.sampled_from(LOG_DTYPES),
    threshold=st.sampled_from([-INF, -1.0, 0.0]),
    max_length=st.integers(1, 8),
)
def test_advance_matches_reference(impl, seed, shape, dtype, threshold, max_length):
    inputs = random_step_inputs(seed, *shape, dtype, ties=seed % 2 == 0)
    state = random_state(seed, shape[0] * shape[1])
    got = call_advance(impl, *inputs, state, threshold, max_length)
    want = reference.beam_search_advance(
        *inputs, state, log_threshold=threshold, max_length=max_length
    )
    assert_advances_equal(got, want)


@given(seed=st.integers(0, 2**31), shape=sizes, max_length=st.integers(1, 8))
def test_advance_is_the_step_its_parents_as_rows_and_the_state_reordered(seed, shape, max_length):
    B, K, C = shape
    inputs = random_step_inputs(seed, B, K, C, torch.float32, ties=True)
    state = random_state(seed, B * K)
    got = ops.beam_search_advance(*inputs, state, log_threshold=-1.0, max_length=max_length)
    step = ops.beam_search_step(*inputs, log_threshold=-1.0, max_length=max_length)
    assert_steps_equal(
        (got.scores, step.parents, got.labels.view(B, K), got.used, got.finished), step
    )
    # beam b * K + j came from row b * K + parent; an empty slot "from" its image's first row
    first_row = torch.arange(B)[:, None] * K
    assert torch.equal(got.sources.view(B, K), first_row + step.parents.clamp(min=0))
    for before, after in zip(state, got.state, strict=True):
        for row, source in enumerate(got.sources.tolist()):
            assert torch.equal(after[row], before[source])
        assert after.is_contiguous()
        assert after.numel() == 0 or after.data_ptr() != before.data_ptr()  # a new tensor
    assert bool(got.done) == bool(step.finished.all())


@DEVICE_IMPLS
@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 4, 70), (0, 2, 3), (2, 1, 1)])
def test_advance_opcheck(impl, shape):
    B, K, C = shape
    inputs = impl.to(*random_step_inputs(0, B, K, C, torch.float32, ties=True))
    for state in ([], [impl.to(t) for t in random_state(0, B * K)]):
        torch.library.opcheck(
            torch.ops.mlkernels.beam_search_advance,
            (*inputs, state),
            {"log_threshold": -1.0, "max_length": 3},
        )


def test_advance_is_not_differentiable():
    hidden = torch.randn(2, 3, requires_grad=True)
    out = ops.beam_search_advance(torch.zeros(1, 2, 3), *initial_state(1, 2, 3), [hidden])
    with pytest.raises(
        RuntimeError, match="derivative for mlkernels::beam_search_advance is not impl"
    ):
        out.state[0].sum().backward()


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_advance_bad_input_messages(case, mode):
    """The step's checks, in the advance's name."""
    (args, kwargs), error, message = case
    if mode == "fake" and any(t.is_meta for t in args):
        pytest.skip("a meta tensor runs the fake kernel in eager mode already")
    message = message.replace("beam_search_step", "beam_search_advance")
    for fn in (ops.beam_search_advance, torch.ops.mlkernels.beam_search_advance):
        kwargs = {"log_threshold": -INF, "max_length": 3, **kwargs}
        assert_raises(functools.partial(fn, **kwargs), (*args, []), error, message, mode)


@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_advance_state_must_have_a_row_per_beam(mode):
    args, _ = _bad()  # B = 2, K = 3
    for state in ([torch.zeros(6), torch.zeros(5, 2)], [torch.zeros(6), torch.tensor(1.0)]):
        got = "Tensor\\[5, 2\\]" if state[1].dim() else "Tensor\\[\\]"
        message = (
            f"beam_search_advance: state\\[1\\] must have leading dimension B \\* K = 6, got {got}"
        )
        for fn in (ops.beam_search_advance, reference.beam_search_advance):
            if mode == "fake" and fn is reference.beam_search_advance:
                continue
            assert_raises(fn, (*args, state), RuntimeError, message, mode)


def test_advance_meta_state_beside_real_log_probs():
    # One meta tensor sends the call to the fake kernel, which computes nothing: it must refuse,
    # not return uninitialized scores and rows for the real tensors (the bad-input sweep found it).
    args, _ = _bad()
    state = [torch.zeros(6, 4), torch.empty(6, device="meta")]
    message = (
        r"beam_search_advance: state\[1\] must be on the meta device exactly when log_probs is "
        r".*got state\[1\] on meta and log_probs on cpu"
    )
    for fn in (ops.beam_search_advance, torch.ops.mlkernels.beam_search_advance):
        with pytest.raises(RuntimeError, match=message):
            fn(*args, state, log_threshold=-INF, max_length=3)


def test_advance_wrapper_argument_types():
    args, _ = _bad()
    with pytest.raises(TypeError, match="beam_search_advance: state must be a list of tensors"):
        ops.beam_search_advance(*args, torch.zeros(6))
    with pytest.raises(TypeError, match=r"beam_search_advance: state\[1\] must be a Tensor"):
        ops.beam_search_advance(*args, [torch.zeros(6), 3])


def test_advance_state_too_large_to_copy():
    args, _ = _bad()
    huge = torch.zeros(6, 1).expand(6, 2**40)  # free to build, 6 TB to copy
    with pytest.raises(
        RuntimeError,
        match=r"beam_search_advance: state\[0\] reordered, Tensor\[6, 1099511627776\], could not "
        r"be allocated",
    ):
        ops.beam_search_advance(*args, [huge])


@pytest.mark.parametrize("impl", impl_params("cuda"))
def test_advance_reorders_a_state_on_another_device(impl):
    inputs = impl.to(*random_step_inputs(3, 2, 3, 5, torch.float32, ties=False))
    state = [torch.arange(6.0)]  # on the CPU while the search runs on the GPU
    got = ops.beam_search_advance(*inputs, state, max_length=3)
    assert got.state[0].device.type == "cpu"
    assert torch.equal(got.state[0], state[0][got.sources.cpu()])
