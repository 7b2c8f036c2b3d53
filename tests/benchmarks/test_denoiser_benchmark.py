"""The denoiser benchmark runs end to end at a tiny size and writes its JSON and pictures."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_denoiser_benchmark(tmp_path):
    out = tmp_path / "denoiser.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "denoiser.py"), "--out", str(out),
               "--preset", "tiny", "--denoiser-steps", "3", "--pairs", "16", "--holdout", "8",
               "--batch-size", "8", "--images", "4", "--eval-images", "6", "--repeats", "1",
               "--warmup", "0", "--steps", "2", "--cfg", "1", "0", "--t0", "0.05",
               "--save-denoiser", str(tmp_path / "d")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["cfg"], r["path"]) for r in result["records"]] == [
        (cfg, path) for cfg in (1.0, 0.0) for path in ("none", "score", "learned")
    ]
    for record in result["records"]:
        assert record["ms_per_image"] > 0 and record["denoise_step_ms_per_image"] > 0
        assert math.isclose(record["images_per_s"] * record["ms_per_image"], 1e3, rel_tol=1e-6)
    for score in (r for r in result["records"] if r["path"] == "score"):
        assert score["speedup_vs_score"] == 1 and score["step_speedup_vs_score"] == 1
    assert [d["cfg"] for d in result["distances"]] == [1.0, 0.0]
    for distances in result["distances"]:
        assert distances["images"] == 6 and distances["reference"] == "score"
        for path in ("learned", "none", "identity"):
            rmse = distances[path]["rmse"]
            psnr = distances[path]["psnr_db"]
            assert 0 < rmse < 2 and math.isclose(psnr, 20 * math.log10(2 / rmse))
    # Guidance changes the chains, hence the distances.
    assert result["distances"][0]["learned"] != result["distances"][1]["learned"]
    assert set(result["denoiser"]["metrics"]) == {
        "train_mse",
        "holdout_mse",
        "holdout_identity_mse",
    }
    assert result["model"]["trained"] is False and result["fingerprint"]["devices"]
    assert result["denoiser"]["trained_here"]["t0"] == result["settings"]["t0"] == 0.05
    assert [t["limit"] for t in result["targets"]] == [5.0, 5.0] and "|" in done.stdout
    assert "cfg 1" in result["targets"][0]["name"] and "cfg 0" in result["targets"][1]["name"]
    assert (tmp_path / "denoiser_samples.png").stat().st_size > 0
    assert (tmp_path / "d" / "weights.safetensors").is_file()

    # In process: a saved denoiser is reused instead of trained; a bad size exits with 2.
    spec = importlib.util.spec_from_file_location("denoiser_bench", command[1])
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    again = bench.main(["--out", str(tmp_path / "again.json"), "--denoiser", str(tmp_path / "d"),
                        "--images", "4", "--eval-images", "6", "--repeats", "1", "--warmup",
                        "0", "--steps", "2", "--cfg", "1", "--t0", "0.05"])  # fmt: skip
    assert again["denoiser"]["checkpoint"] == str(tmp_path / "d")
    # The same model, chains and denoiser weights: the same distance to the score output.
    first = result["distances"][0]["learned"]["rmse"]
    assert math.isclose(again["distances"][0]["learned"]["rmse"], first, rel_tol=1e-4)
    assert "trained_here" not in again["denoiser"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "bad.json"), "--images", "0"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad.json").exists()
    for bad in (["--cfg", "-1"], ["--t0", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--out", str(tmp_path / "bad.json"), *bad])
        assert exit_info.value.code == 2 and not (tmp_path / "bad.json").exists()
