"""Smoke test of bench.py --quick: every benchmark runs and lands in the table and bench.json."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench.py"


def test_bench_quick_produces_the_table(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(BENCH), "all", "--quick", "--device", "cpu", "--cache",
                          str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"backbone", "pretrain", "read", "sample_path"}
    for header in ("slices_per_s", "images_per_s", "mem_ratio", "samples_per_s_per_core"):
        assert header in run.stdout  # each table printed its figure
    assert all(r["slices_per_s"] > 0 for r in rows if r["bench"] == "backbone" and "slices_per_s" in r)
