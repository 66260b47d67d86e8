"""A small harness over torch.utils.benchmark: each family's bench_<family>.py lists Cases (ours
and the anchor on the same inputs), run.py times them all in one process and reports ratios."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
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


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run_cases(cases: list[Case], min_run_time: float) -> list[dict]:
    rows = []
    for case in cases:
        if case.check is not None:
            case.check(case.ours(), case.anchor())
        ours = median_seconds(case.ours, min_run_time)
        anchor = median_seconds(case.anchor, min_run_time)
        rows.append(
            {
                "family": case.family,
                "case": case.name,
                "shape": case.shape,
                "anchor": case.anchor_name,
                "anchor_ms": anchor * 1e3,
                "ours_ms": ours * 1e3,
                "ratio": anchor / ours,
                "target_ratio": case.target_ratio,
            }
        )
        print(
            f"  {case.family}/{case.name} [{case.shape}]: ours {ours * 1e3:.3f} ms, "
            f"{case.anchor_name} {anchor * 1e3:.3f} ms, ratio {anchor / ours:.2f}x",
            flush=True,
        )
    return rows


def markdown_table(rows: list[dict], info: dict) -> str:
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


def save(rows: list[dict], info: dict, directory: Path, name: str = "latest.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "rows": rows}
    path = directory / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
