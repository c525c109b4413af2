"""benchmarks/kernels.py --time, its Mac code path run with the kernels under mslsim."""

import subprocess
import sys
from pathlib import Path

from mslsim.testing import require_clang

ROOT = Path(__file__).resolve().parents[1]


def test_time_mode_runs_under_mslsim():
    require_clang()
    run = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--time", "--factory", "mslsim", "--contexts", "64"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SIMULATOR TIMINGS" in run.stdout
    assert "K/V format  context    kernel      sdpa  k/sdpa     q-ops k/q-ops" in run.stdout
    rows = {cells[0]: cells[2:] for cells in map(str.split, run.stdout.splitlines()) if cells[1:2] == ["64"]}
    assert sorted(rows) == ["float16", "q4g64", "q8g64"], run.stdout
    assert rows["float16"][3:] == ["-", "-"], run.stdout  # no quantized ops path for float K/V
    for fmt in ("q4g64", "q8g64"):
        assert all(float(x) > 0 for x in rows[fmt]), run.stdout  # kernel, sdpa, ratio, q-ops, ratio
    assert all(float(x) > 0 for x in rows["float16"][:3]), run.stdout
