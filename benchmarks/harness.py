"""A small harness over torch.utils.benchmark: each family's bench_<family>.py lists Cases (ours
and the anchor on the same inputs), run.py times them all in one process and reports ratios.

On CUDA (``device="cuda"``) the same cases run on the GPU, and each row also gets the peak extra
GPU memory of one call of each side; a case that fails (its check, or an error) is recorded with
its message and the run goes on, so that one run on a borrowed GPU reports every case. On the CPU
a failure stops the run, as before, and rows and table are unchanged.

A case may ask for extras (Case.peak_memory on the CPU, Case.flops for GFLOP/s and its share of a
reference measured in the same run): its row gets extra keys and extras_table lists them; rows
and the main table of cases that ask for none are as they were."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import timeit
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tbench


@dataclasses.dataclass
class Case:
    """One comparison: ``ours`` and ``anchor`` compute the same thing on the same inputs.

    family/name/shape label the row; ``anchor_name`` says what the anchor is
    (e.g. "torchvision.ops.nms"). ``check`` (optional) asserts the two results agree before
    timing, so a ratio is never reported for different answers."""

    family: str
    name: str
    shape: str
    ours: Callable[[], object]
    anchor: Callable[[], object]
    anchor_name: str
    check: Callable[[object, object], None] | None = None
    target_ratio: float | None = None  # the ratio the family's issue asks for, if any
    # Optional extras; a case that sets none of them gets the row and table line it always had.
    # On the CPU, also measure each side's peak extra memory (on CUDA every case gets it).
    peak_memory: bool = False
    # Floating-point operations of one call: the row gets each side's GFLOP/s.
    flops: float | None = None
    # Measures the machine's practical GFLOP/s (e.g. a fp32 matrix product) in the same run: the
    # row gets it and ours' share of it. Called once per case; it may cache its answer.
    reference_gflops: Callable[[], float] | None = None
    target_share: float | None = None  # the share of reference_gflops the issue asks for
    # Further measurements, each a name -> value (e.g. the share of a decode spent outside the
    # model), called with the row as timed so far (its "anchor_ms" and "ours_ms", None where a
    # CUDA side failed): the row gets them under "measures" and measures_table lists them, with
    # measure_targets' text (name -> e.g. "<= 10%") beside them.
    measures: Callable[[dict], dict[str, float]] | None = None
    measure_targets: dict[str, str] | None = None


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if is_cuda(device):  # CPU results keep their keys as they were
        import torchvision

        info["device"] = str(torch.device(device))
        info["cuda_runtime"] = torch.version.cuda
        info["torchvision"] = torchvision.__version__
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30)
    return info


def _cuda_timer() -> float:
    """What torch.utils.benchmark's default timer does on a machine with a GPU (it synchronizes
    the accelerator, then reads the clock), spelled out so that CUDA timings never depend on it."""
    torch.cuda.synchronize()
    return timeit.default_timer()


def median_seconds(fn: Callable[[], object], min_run_time: float, device: str = "cpu") -> float:
    # The timer brackets each block of calls; on CUDA it synchronizes first, so a block's time
    # includes the kernels it queued.
    extra = {"timer": _cuda_timer} if is_cuda(device) else {}
    timer = tbench.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **extra
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """GPU memory (MiB) that one call of ``fn`` allocates at its peak beyond what was allocated
    before it (its output included): torch.cuda.max_memory_allocated's delta."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


def _result_mb(result: object) -> float:
    """MiB of the tensors in ``result`` (a tensor or a tuple/list of them)."""
    if isinstance(result, torch.Tensor):
        return result.nelement() * result.element_size() / 2**20
    if isinstance(result, (tuple, list)):
        return sum(_result_mb(r) for r in result)
    return 0.0


def cpu_peak_extra_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """CPU memory (MiB) that one call of ``fn`` allocates at its peak beyond what was allocated
    before it (its output included), as peak_extra_mb on CUDA; and the MiB of its output.

    There is no allocator statistic on the CPU (tracemalloc does not see torch's allocations and
    the process RSS high-water is too coarse), so this runs the call under
    torch.profiler.profile(profile_memory=True) and replays its allocation events in time order.
    It sees every tensor allocated through c10's CPU allocator (ours included); memory a kernel
    takes outside it (a std::vector, oneDNN/MKL scratch) is not counted."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto writes start/stop lines (and, without a GPU runtime, an error) to fd 2 on every
    # profile; they are noise here, so fd 2 goes to /dev/null for the call. Python exceptions are
    # raised after it is restored.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                result = fn()
            events = prof.profiler.kineto_results.events()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    output = _result_mb(result)
    del result
    return peak / 2**20, output


def _extras(case: Case, row: dict, ours_s: float | None, anchor_s: float | None) -> None:
    """The GFLOP/s columns of a case with ``flops`` (in place)."""
    if case.flops is None:
        return
    row["ours_gflops"] = case.flops / ours_s / 1e9 if ours_s else None
    row["anchor_gflops"] = case.flops / anchor_s / 1e9 if anchor_s else None
    row["reference_gflops"] = row["share"] = None  # every key is there if the reference fails
    row["target_share"] = case.target_share
    row["reference_gflops"] = case.reference_gflops() if case.reference_gflops else None
    row["share"] = (
        row["ours_gflops"] / row["reference_gflops"]
        if row["ours_gflops"] and row["reference_gflops"]
        else None
    )


def _measures(case: Case, row: dict) -> None:
    """The row's "measures" (in place) for a case that asks for them."""
    if case.measures is None:
        return
    targets = case.measure_targets or {}
    row["measures"] = {
        name: {"value": value, "target": targets.get(name)}
        for name, value in case.measures(row).items()
    }


def _extras_line(row: dict, cuda: bool) -> str:
    """What the per-case progress line adds for a row with extras ("" for others)."""
    text = ""
    if not cuda and "ours_peak_mb" in row:
        text += (
            f", peak MB ours {_mb(row['ours_peak_mb'])} / anchor {_mb(row['anchor_peak_mb'])}"
            f" (results {_mb(row['ours_results_mb'])} / {_mb(row['anchor_results_mb'])})"
        )
    for name, measure in row.get("measures", {}).items():
        text += f", {name} {measure['value']:.3g}"
    if "ours_gflops" in row:
        text += (
            f", ours {_gflops(row['ours_gflops'])} GFLOP/s = {_share(row['share'])} of "
            f"{_gflops(row['reference_gflops'])} GFLOP/s (fp32 matmul)"
        )
    return text


def run_cases(cases: list[Case], min_run_time: float, device: str = "cpu") -> list[dict]:
    if is_cuda(device):
        return [_run_cuda_case(case, min_run_time, device) for case in cases]
    rows = []
    for case in cases:
        if case.check is not None:
            case.check(case.ours(), case.anchor())
        memory = None
        if case.peak_memory:
            memory = cpu_peak_extra_mb(case.ours), cpu_peak_extra_mb(case.anchor)
        ours = median_seconds(case.ours, min_run_time)
        anchor = median_seconds(case.anchor, min_run_time)
        row = {
            "family": case.family,
            "case": case.name,
            "shape": case.shape,
            "anchor": case.anchor_name,
            "anchor_ms": anchor * 1e3,
            "ours_ms": ours * 1e3,
            "ratio": anchor / ours,
            "target_ratio": case.target_ratio,
        }
        if memory is not None:
            (ours_mb, ours_results), (anchor_mb, anchor_results) = memory
            row["anchor_peak_mb"], row["ours_peak_mb"] = anchor_mb, ours_mb
            row["anchor_results_mb"], row["ours_results_mb"] = anchor_results, ours_results
        _extras(case, row, ours, anchor)
        _measures(case, row)
        rows.append(row)
        print(
            f"  {case.family}/{case.name} [{case.shape}]: ours {ours * 1e3:.3f} ms, "
            f"{case.anchor_name} {anchor * 1e3:.3f} ms, ratio {anchor / ours:.2f}x"
            + _extras_line(row, cuda=False),
            flush=True,
        )
    return rows


def _error(error: BaseException) -> str:
    """The exception's type and first lines (assert_close says what differs on lines 2-4)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' / '.join(lines[:4])}"[:400]


def _run_cuda_case(case: Case, min_run_time: float, device: str) -> dict:
    """One case on CUDA: the check, the peak memory of each side, the timings. Each step that
    fails is recorded in the row's "error" and the rest still runs."""
    row = {
        "family": case.family,
        "case": case.name,
        "shape": case.shape,
        "anchor": case.anchor_name,
        "anchor_ms": None,
        "ours_ms": None,
        "ratio": None,
        "target_ratio": case.target_ratio,
        "anchor_peak_mb": None,
        "ours_peak_mb": None,
        "error": None,
    }
    errors = []

    def attempt(what: str, step: Callable[[], object]) -> object:
        try:
            return step()
        except Exception as error:  # recorded; the run goes on
            errors.append(f"{what}: {_error(error)}")
            traceback.print_exc()
            try:
                torch.cuda.synchronize()  # a later step must not inherit queued work
            except Exception:  # a sticky CUDA error: every later step will report it too
                pass
            return None

    if case.check is not None:
        attempt("check", lambda: case.check(case.ours(), case.anchor()))
    row["ours_peak_mb"] = attempt("ours", lambda: peak_extra_mb(case.ours))
    row["anchor_peak_mb"] = attempt("anchor", lambda: peak_extra_mb(case.anchor))
    if row["ours_peak_mb"] is not None:
        ours = attempt("ours", lambda: median_seconds(case.ours, min_run_time, device))
        row["ours_ms"] = ours * 1e3 if ours is not None else None
    if row["anchor_peak_mb"] is not None:
        anchor = attempt("anchor", lambda: median_seconds(case.anchor, min_run_time, device))
        row["anchor_ms"] = anchor * 1e3 if anchor is not None else None
    if row["ours_ms"] and row["anchor_ms"]:
        row["ratio"] = row["anchor_ms"] / row["ours_ms"]
    if case.flops is not None:
        ms = row["ours_ms"], row["anchor_ms"]
        # after the error is recorded, so that a failing reference is a note, not a lost row
        attempt(
            "reference",
            lambda: _extras(case, row, *(m / 1e3 if m else None for m in ms)),
        )
    if case.measures is not None:
        attempt("measures", lambda: _measures(case, row))
    row["error"] = "; ".join(errors) or None
    print(
        f"  {case.family}/{case.name} [{case.shape}]: ours {_ms(row['ours_ms'])} ms, "
        f"{case.anchor_name} {_ms(row['anchor_ms'])} ms, ratio {_ratio(row['ratio'])}, "
        f"peak MB ours {_mb(row['ours_peak_mb'])} / anchor {_mb(row['anchor_peak_mb'])}"
        + _extras_line(row, cuda=True)
        + (f"  FAILED: {row['error']}" if row["error"] else ""),
        flush=True,
    )
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _gflops(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def measures_table(rows: list[dict]) -> str:
    """The measures of the rows that carry them (Case.measures); "" when none does."""
    measured = [r for r in rows if r.get("measures")]
    if not measured:
        return ""
    lines = [
        "Further measurements of ours:",
        "",
        "| family | case | shape | measure | value | target |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in measured:
        for name, m in r["measures"].items():
            lines.append(
                f"| {r['family']} | {r['case']} | {r['shape']} | {name} | {m['value']:.3g} | "
                f"{m['target'] or ''} |"
            )
    return "\n".join(lines)


def extras_table(rows: list[dict], info: dict) -> str:
    """A second table for the rows that carry extras (peak memory on the CPU, GFLOP/s); "" when
    none does, so that a run of the other families prints exactly what it always did. On CUDA the
    peak memory is in the main table already, so only the GFLOP/s columns come here."""
    cuda = info.get("device", "cpu") != "cpu"
    memory = [] if cuda else [r for r in rows if "ours_peak_mb" in r]
    flops = [r for r in rows if "ours_gflops" in r]
    if not memory and not flops:
        return ""
    head = "| family | case | shape |"
    rule = "|---|---|---|"
    if memory:
        head += " anchor peak MB | ours peak MB | results MB (anchor / ours) |"
        rule += "---:|---:|---:|"
    if flops:
        head += " ours GFLOP/s | anchor GFLOP/s | fp32 matmul GFLOP/s | ours share | target |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [
        "Peak extra memory of one call (its results included; CPU: torch.profiler's allocation "
        "events) and GFLOP/s against a fp32 matrix product timed in the same run:",
        "",
        head,
        rule,
    ]
    for r in rows:
        if r not in memory and r not in flops:
            continue
        line = f"| {r['family']} | {r['case']} | {r['shape']} |"
        if memory:
            line += (
                f" {_mb(r['anchor_peak_mb'])} | {_mb(r['ours_peak_mb'])} | "
                f"{_mb(r['anchor_results_mb'])} / {_mb(r['ours_results_mb'])} |"
                if r in memory
                else " | | |"
            )
        if flops:
            if r in flops:
                target = f">= {r['target_share']:.0%}" if r["target_share"] else ""
                line += (
                    f" {_gflops(r['ours_gflops'])} | {_gflops(r['anchor_gflops'])} | "
                    f"{_gflops(r['reference_gflops'])} | {_share(r['share'])} | {target} |"
                )
            else:
                line += " | | | | |"
        lines.append(line)
    return "\n".join(lines)


def markdown_table(rows: list[dict], info: dict) -> str:
    if info.get("device", "cpu") != "cpu":
        return _cuda_markdown_table(rows, info)
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
        f"torch {info['torch']}" + (f", GPU {info['cuda_device']}" if info["cuda_device"] else ""),
        "",
        "| family | case | shape | anchor | anchor ms | ours ms | anchor/ours | target |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = f">= {r['target_ratio']:g}x" if r["target_ratio"] else ""
        lines.append(
            f"| {r['family']} | {r['case']} | {r['shape']} | {r['anchor']} | "
            f"{r['anchor_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.2f}x | {target} |"
        )
    return "\n".join(lines)


def _cuda_markdown_table(rows: list[dict], info: dict) -> str:
    """markdown_table for a CUDA run: the GPU in the header, peak extra GPU memory per side and a
    note column for cases that failed."""
    lines = [
        f"Device: {info['device']}, GPU {info['cuda_device']} ({info['gpu_memory_gb']} GB), "
        f"CUDA {info['cuda_runtime']}, torch {info['torch']}, torchvision {info['torchvision']}; "
        f"host {info['cpu']}, {info['cores']} cores",
        "",
        "| family | case | shape | anchor | anchor ms | ours ms | anchor/ours | target "
        "| anchor peak MB | ours peak MB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = f">= {r['target_ratio']:g}x" if r["target_ratio"] else ""
        note = (r["error"] or "").replace("|", "/")
        lines.append(
            f"| {r['family']} | {r['case']} | {r['shape']} | {r['anchor']} | "
            f"{_ms(r['anchor_ms'])} | {_ms(r['ours_ms'])} | {_ratio(r['ratio'])} | {target} | "
            f"{_mb(r['anchor_peak_mb'])} | {_mb(r['ours_peak_mb'])} | {note} |"
        )
    return "\n".join(lines)


def save(rows: list[dict], info: dict, directory: Path, name: str = "latest.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "rows": rows}
    path = directory / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
