"""What setup.py's switches recorded (MLKERNELS_EMULATOR, MLKERNELS_SANITIZE) matches what was
built, and `python -m mlkernels` reports it."""

from __future__ import annotations

import json
import subprocess
import sys

import mlkernels

# A fresh interpreter: conftest.py gives schema-only emulated ops placeholder kernels when the
# emulator is not compiled, which would blur the dispatcher's answer in this process.
PROBE = """
import json, torch, mlkernels
names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mlkernels_emulated::")]
has = torch._C._dispatch_has_kernel_for_dispatch_key
# A CPU kernel, or for atomic_adds (no tensor argument to dispatch on) a composite one
cpu = [n for n in names if has(n, "CPU") or has(n, "CompositeExplicitAutograd")]
print(json.dumps({"names": sorted(names), "cpu": sorted(cpu), "info": mlkernels.build_info()}))
"""


def _probe() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_emulator_flag_matches_the_dispatcher():
    facts = _probe()
    if facts["info"]["emulator_compiled"]:
        assert facts["names"] and facts["cpu"] == facts["names"], facts
    else:
        assert facts["cpu"] == [], facts


def test_build_info_records_emulator_and_sanitizers():
    info = mlkernels.build_info()
    assert isinstance(info["emulator_compiled"], bool)
    assert info["sanitizers"] in ([], ["address", "undefined"])
    assert info["emulator_compiled"] == mlkernels.EMULATOR_COMPILED


def test_python_dash_m_prints_the_emulator_state():
    result = subprocess.run(
        [sys.executable, "-m", "mlkernels"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"emulator_compiled: {mlkernels.EMULATOR_COMPILED}" in result.stdout
