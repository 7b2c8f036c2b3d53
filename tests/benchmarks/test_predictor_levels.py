"""The predictor-levels benchmark runs end to end at a tiny size and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_predictor_levels_benchmark(tmp_path):
    out = tmp_path / "levels.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "predictor_levels.py"), "--out", str(out),
               "--levels", "1", "2", "--batch", "2", "--tokens", "4", "--features", "3",
               "--dim", "16", "--layers", "1", "--prompt", "2", "--repeats", "1",
               "--warmup", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {(r["attention"], r["levels"]) for r in result["records"]} == {
        ("markov", 1),
        ("markov", 2),
        ("causal", 1),
        ("causal", 2),
    }
    assert all(r["ms"] > 0 for r in result["records"])
    assert result["targets"][0]["name"].startswith("markov time(K=2)")
    assert "|" in done.stdout
