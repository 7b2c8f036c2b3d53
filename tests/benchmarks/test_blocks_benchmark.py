"""The blocks benchmark runs end to end (tiny sizes) and writes a well-formed JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_blocks_benchmark_writes_records_and_targets(tmp_path):
    out = tmp_path / "blocks.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "blocks.py"), "--out", str(out),
               "--quick", "--device", "cpu", "--repeats", "1", "--warmup", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"torch", "threads"} <= set(result["fingerprint"])
    libraries = {record["library"] for record in result["records"]}
    assert {"trajflow", "zuko", "nflows", "floor"} <= libraries
    for record in result["records"]:
        assert record["samples_per_s"] > 0 and {"flow", "op"} <= set(record)
    assert {target["name"].split(" (")[0] for target in result["targets"]} >= {
        "trajflow spline forward time / floor",
        "trajflow affine inverse time / floor",
    }
    assert "|" in done.stdout  # the markdown table
