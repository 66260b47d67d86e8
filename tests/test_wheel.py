"""The wheel as a user gets it: built (CPU only, no emulator) from a copy of the sources, installed
with pip into a fresh virtual environment that sees torch but not this checkout, then
`python -m mlkernels` there.

MLKERNELS_WHEEL=path/to.whl tests that wheel instead of building one (e.g. `make wheel`'s);
MLKERNELS_SKIP_WHEEL_TEST=1 skips this module (`make sanitize` does). The build goes through
ccache when it is on PATH (see setup.py), which makes a repeated run take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "README.md", "csrc", "mlkernels"]
BUILD_OUTPUTS = shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__", "*.egg-info")

pytestmark = pytest.mark.skipif(
    os.environ.get("MLKERNELS_SKIP_WHEEL_TEST") == "1", reason="MLKERNELS_SKIP_WHEEL_TEST=1"
)


def _run(args, timeout, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, bool]:
    """(the wheel, whether this module built it)."""
    given = os.environ.get("MLKERNELS_WHEEL")
    if given:
        path = Path(given).resolve()
        assert path.is_file(), f"MLKERNELS_WHEEL={given} is not a file"
        return path, False
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=BUILD_OUTPUTS)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = _clean_env(
        MLKERNELS_CUDA="0", MLKERNELS_EMULATOR="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2")
    )
    started = time.monotonic()
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v"]
        + ["--no-cache-dir", "-w", str(tmp / "dist"), str(src)],
        timeout=1800,
        cwd=tmp,
        env=env,
    )
    print(f"wheel built in {time.monotonic() - started:.1f} s")
    output = (build.stdout + build.stderr).splitlines()
    print("\n".join(dict.fromkeys(line for line in output if "[mlkernels build]" in line)))
    (path,) = (tmp / "dist").glob("mlkernels-*.whl")
    return path, True


def test_wheel_contents(wheel):
    path, built_here = wheel
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        config = archive.read("mlkernels/_build_config.py").decode()
    assert len([n for n in names if n.startswith("mlkernels/_C.") and n.endswith(".so")]) == 1
    assert "mlkernels/__main__.py" in names
    assert not [n for n in names if n.startswith(("csrc/", "tests/")) or "__pycache__" in n]
    assert "SANITIZERS = ''" in config
    if built_here:
        assert "WITH_CUDA = False" in config and "WITH_EMULATOR = False" in config


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel, tmp_path):
    path, built_here = wheel
    venv = tmp_path / "venv"
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(path)],
        timeout=300,
        env=_clean_env(),
    )
    # torch (5 GB) from this environment, without reinstalling it: a plain path entry, so the
    # .pth files there (the editable mlkernels' finder among them) are not run.
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            timeout=60,
        ).stdout.strip()
    )
    (site / "zz_torch_from_dev_venv.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")

    run_dir = tmp_path / "run"  # not the checkout: nothing of it on sys.path
    run_dir.mkdir()
    probe = (
        "import json, sys, mlkernels; "
        "print(json.dumps({'file': mlkernels.__file__, 'c': mlkernels._C.__file__, "
        "'finders': [type(f).__name__ for f in sys.meta_path], 'path': sys.path, "
        "'info': mlkernels.build_info()}))"
    )
    facts = json.loads(
        _run([str(python), "-c", probe], timeout=300, cwd=run_dir, env=_clean_env()).stdout
    )
    venv_real = venv.resolve()
    assert venv_real in Path(facts["file"]).resolve().parents, facts["file"]
    assert venv_real in Path(facts["c"]).resolve().parents, facts["c"]
    assert not [f for f in facts["finders"] if "editable" in f.lower()], facts["finders"]
    assert not [p for p in facts["path"] if p and Path(p).resolve() == ROOT], facts["path"]
    if built_here:
        assert facts["info"]["cuda_compiled"] is False
        assert facts["info"]["emulator_compiled"] is False

    result = _run([str(python), "-m", "mlkernels"], timeout=300, cwd=run_dir, env=_clean_env())
    print(f"venv + install + checks in {time.monotonic() - started:.1f} s")
    assert "emulator_compiled:" in result.stdout
    assert "boxes on cpu: ok" in result.stdout
    assert "FAILED" not in result.stdout
