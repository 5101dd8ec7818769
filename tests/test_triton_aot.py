"""Every Triton kernel compiles for sm_80 and sm_90 on this (GPU-less) machine
(docs/backends.md#testing-without-a-gpu, point 2; the compile itself: tests/support/aot_compile_triton.py)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_ahead_of_time(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "support", "aot_compile_triton.py"), str(arch)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiled" in result.stdout
    # No variant may spill registers to local memory.
    for line in result.stdout.splitlines():
        if "local=" in line:
            assert "local=0" in line, line
