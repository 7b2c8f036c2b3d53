"""The CUDA suite runs end to end at a tiny size on the CPU; its FLOP counts and targets hold."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cuda_suite.py"


@pytest.fixture(scope="module")
def suite():
    """benchmarks/cuda_suite.py as a module; sys.path and sys.modules restored afterwards.

    Only the modules loaded from ``benchmarks/`` are forgotten (``cuda_suite``, ``_common``,
    ``blocks``): dropping library modules imported meanwhile (numpy, torch._dynamo) would make
    later imports run them twice, which C extensions and torch's op registry refuse.
    """
    path, modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location("cuda_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cuda_suite"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if name == "cuda_suite" or Path(origin).parent == SCRIPT.parent:
                del sys.modules[name]


def test_quick_suite_writes_every_section_with_a_fingerprint(tmp_path):
    out = tmp_path / "suite.json"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["quick"] is True
    assert {"torch", "threads", "devices"} <= set(result["fingerprint"])
    records = result["records"]
    assert {r["section"] for r in records} == {"blocks", "tarflow", "sampling", "training"}
    blocks = [r for r in records if r["section"] == "blocks"]
    kinds, precisions = ("affine", "spline", "conv"), ("float32", "bf16")
    assert {(r["block"], r["precision"]) for r in blocks} == {
        (kind, precision) for kind in kinds for precision in precisions
    }
    for record in blocks:
        assert record["seconds"] > 0
        if record["library"] == "floor":
            assert record["ratio_to_floor"] == pytest.approx(1.0)
    methods = {(r["precision"], r["method"]) for r in records if r["section"] == "tarflow"}
    assert {("float32", "kv_cache"), ("float32", "jacobi"), ("bf16", "jacobi")} <= methods
    sampling = {r["sampler"]: r for r in records if r["section"] == "sampling"}
    assert sampling["ntm"]["steps"] == 4 and sampling["fm_euler"]["steps"] == 50
    assert sampling["fm_euler"]["speedup_vs_fm"] == pytest.approx(1.0)
    training = [r for r in records if r["section"] == "training"]
    assert {r["stage"]: r["levels"] for r in training} == {"fm": None, "ntm": 4}  # tiny: T=4
    for record in training:
        assert record["flops_per_step"] > 0 and record["peak_flops_per_s"] > 0
        assert record["mfu"] == pytest.approx(
            record["flops_per_step"] / record["seconds"] / record["peak_flops_per_s"]
        )
    assert result["peak"]["precision"] == "float32"
    names = [target["name"] for target in result["targets"]]
    assert any(name.startswith("tarflow Jacobi") for name in names)
    assert any(name.startswith("eager spline forward time / floor") for name in names)
    assert any(name.startswith("sampling speedup per image, tiny") for name in names)
    # On a CPU every target says it is a GPU target measured elsewhere.
    assert all("GPU" in target["note"] for target in result["targets"])
    assert "| block" in done.stdout and "| preset" in done.stdout
    assert out.with_suffix(".png").exists() or importlib.util.find_spec("matplotlib") is None


def test_count_flops_counts_matmuls_and_cpu_attention_forward_and_backward(suite):
    assert suite.count_flops(lambda: torch.ones(2, 3) @ torch.ones(3, 4)) == 2 * 2 * 3 * 4
    b, h, s, d = 1, 2, 8, 4
    q = torch.randn(b, h, s, d, requires_grad=True)
    # Two (s × d) @ (d × s)-sized products per head: 4·b·h·s²·d.
    forward = suite.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert forward == 4 * b * h * s * s * d
    both = suite.count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert both == forward + 5 * 2 * b * h * s * s * d  # the backward: five such products


def test_training_step_updates_weights_and_counts_forward_and_backward(suite):
    fm, _ = suite.build_pair("tiny", torch.device("cpu"))
    config = fm.config
    split = suite.make_split("shapes", "train", n=4, seed=0, size=config.data.image_size)
    ids, mask = fm.text_encoder.tokenize(split.captions)
    step, forward_backward = suite.training_step(fm, config.train.fm, (split.images, ids, mask))
    flops = suite.count_flops(forward_backward)
    # Forward + backward of a transformer is about 6 FLOPs per weight per token; the prompt,
    # the text encoder and attention add some. Forward alone would be a third of it.
    weights = sum(p.numel() for p in fm.generator.net.parameters() if p.dim() == 2)
    tokens = config.model.tokens(config.data)
    assert 1.0 <= flops / (6 * weights * tokens * 4) <= 3.0
    before = [p.detach().clone() for p in fm.parameters()]
    step()
    moved = max((a - p).abs().max().item() for a, p in zip(before, fm.parameters(), strict=True))
    assert moved > 0


def _record(section: str, **fields) -> dict:
    return {"section": section, **fields}


def test_targets_prefer_compiled_spline_and_note_cpu_measurements(suite):
    records = [
        _record("tarflow", method="jacobi", precision="float32", block_size=16,
                speedup_vs_kv_cache=2.0, tokens=256),
        _record("tarflow", method="jacobi", precision="float32", block_size=64,
                speedup_vs_kv_cache=3.5, tokens=256),
        _record("tarflow", method="jacobi", precision="bf16", block_size=64,
                speedup_vs_kv_cache=9.0, tokens=256),
        _record("blocks", block="spline", library="trajflow", op="forward", mode="eager",
                precision="bf16", ratio_to_floor=2.0),
        _record("blocks", block="spline", library="trajflow", op="forward", mode="compile",
                precision="bf16", ratio_to_floor=1.2),
        _record("training", preset="base", stage="fm", precision="bf16", mfu=0.3),
        _record("sampling", preset="base", sampler="ntm", speedup_vs_fm=6.0),
    ]  # fmt: skip
    targets = {
        t.name.split(",")[0]: t for t in suite.evaluate_targets(records, torch.device("cuda"))
    }
    jacobi = targets["tarflow Jacobi (best block: 64) speedup vs KV cache"]
    assert jacobi.value == 3.5 and jacobi.passed and not jacobi.at_most  # float32, best block
    spline = targets["compile spline forward time / floor"]
    assert spline.value == 1.2 and spline.passed and spline.note is None
    mfu = targets["training MFU"]
    assert mfu.value == 0.3 and not mfu.passed
    assert targets["sampling speedup per image"].passed
    on_cpu = suite.evaluate_targets(records, torch.device("cpu"))
    assert all(target.note and "GPU" in target.note for target in on_cpu)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--device", "tpu"], "invalid choice"),
        (["--compile-kinds", "glow"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(suite, tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        suite.parse_args(["--out", str(tmp_path / "x.json"), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_folder(suite, tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", str(tmp_path)])
    assert "must be a JSON file path" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_a_gpu_says_so_and_writes_nothing(suite, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        suite.main(["--out", str(tmp_path / "x.json"), "--device", "cuda"])
    assert not (tmp_path / "x.json").exists()
