"""Training at scale on CPU: micro-batches, two gloo processes (DDP and FSDP2), compile.

Two processes with ``M`` micro-batches each must train the same parameters as one process
with ``2 M`` micro-batches on the same global batch (global micro-batch ``j`` has the random
stream ``model/<j>`` either way), to float rounding. One ``torchrun`` launch runs every
two-process job of this file (see ``tests/distributed_worker.py``); the single-process
references run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from toy_configs import tiny_ntm

from trajflow.checkpoint import load_checkpoint, read_checkpoint_config
from trajflow.config import toy_flow_matching_config
from trajflow.train import TrainConfig, train

WORKER = Path(__file__).parent / "distributed_worker.py"
spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

NTM_CONFIG = tiny_ntm(mode="pairwise").model_dump(mode="json")
SETTINGS = {
    "iterations": 3,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 1,
    "ema_decay": 0.8,
    "grad_clip": 100.0,  # large: the gradient's scale must show in the parameters
    "log_every": 1,
}


def core(name: str, **train_settings) -> dict:
    return {"name": name, "kind": "core", "model_config": NTM_CONFIG,
            "train": {**SETTINGS, **train_settings}}  # fmt: skip


def torchrun(jobs: list[dict], out: Path, timeout: float = 240) -> None:
    """Runs the jobs on two gloo processes; fails with the workers' stderr."""
    (out / "jobs.json").write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(WORKER), str(out / "jobs.json"), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def results(folder: Path, name: str, rank: int = 0) -> tuple[dict, dict]:
    stem = folder / f"{name}.rank{rank}"
    return safetensors.torch.load_file(f"{stem}.safetensors"), json.loads(
        Path(f"{stem}.json").read_text()
    )


def assert_same_training(reference: tuple[dict, dict], other: tuple[dict, dict]) -> None:
    """Same weights, EMA, losses and gradient norms, to float tolerance."""
    (tensors, report), (other_tensors, other_report) = reference, other
    assert tensors.keys() == other_tensors.keys()
    for key, value in tensors.items():
        torch.testing.assert_close(other_tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(other_report["losses"], report["losses"], rtol=1e-5, atol=0)
    norms = [[entry["grad_norm"] for entry in r["history"]] for r in (report, other_report)]
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-4, atol=0)
    assert other_report["skipped_at"] == report["skipped_at"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, the two-process jobs, and resumes of their checkpoints."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    checkpointed = {"iterations": 4, "checkpoint_every": 2}
    worker.run_jobs(
        [
            core("micro2", micro_batches=2),
            core("micro4", micro_batches=4),
            core("micro2_unclipped", micro_batches=2, grad_clip=None),
            core("nan", micro_batches=2) | {"overflow_rows": [1, [12, 13]]},
            core("ckpt", micro_batches=2, **checkpointed, out_dir=str(one / "ckpt")),
        ],
        one,
    )
    torchrun(
        [
            core("ddp1"),
            core("ddp2", micro_batches=2),
            core("fsdp1", fsdp=True),
            core("fsdp2", micro_batches=2, fsdp=True),
            core("fsdp_unclipped", fsdp=True, grad_clip=None),
            # The overflowing rows fall in rank 1's half only: rank 0 must skip the step too.
            core("nan") | {"overflow_rows": [1, [12, 13]]},
            core("ckpt", fsdp=True, **checkpointed, out_dir=str(two / "ckpt")),
            # FSDP resumes its own checkpoint, and a single-process one.
            core("resume_own", fsdp=True, **checkpointed, out_dir=str(two / "own"))
            | {"resume": str(two / "ckpt" / "step_00000002")},
            core("resume_single", fsdp=True, **checkpointed, out_dir=str(two / "single"))
            | {"resume": str(one / "ckpt" / "step_00000002")},
        ],
        two,
    )
    # One process resumes the FSDP checkpoint.
    worker.run_jobs(
        [
            core("resume_fsdp", micro_batches=2, **checkpointed, out_dir=str(one / "fsdp"))
            | {"resume": str(two / "ckpt" / "step_00000002")}
        ],
        one,
    )
    return one, two


@pytest.mark.parametrize(
    ("single", "double"),
    [
        ("micro2", "ddp1"),
        ("micro4", "ddp2"),
        ("micro2", "fsdp1"),
        ("micro4", "fsdp2"),
        ("micro2_unclipped", "fsdp_unclipped"),
    ],
)
def test_two_processes_train_like_one_with_the_micro_batches_concatenated(runs, single, double):
    one, two = runs
    reference = results(one, single)
    assert reference[1]["skipped_at"] == [] and reference[1]["losses"][0] != 0
    for rank in (0, 1):  # every rank returns the full, identical model
        assert_same_training(reference, results(two, double, rank))


def test_a_non_finite_micro_batch_on_one_rank_skips_the_step_everywhere(runs):
    one, two = runs
    reference = results(one, "nan")
    assert reference[1]["skipped_at"] == [1] and not math.isfinite(reference[1]["losses"][1])
    for rank in (0, 1):
        other = results(two, "nan", rank)
        assert other[1]["skipped_at"] == [1] and not math.isfinite(other[1]["losses"][1])
        # Steps 0 and 2 ran as in one process.
        finite = [other[1]["losses"][i] for i in (0, 2)]
        torch.testing.assert_close(finite, [reference[1]["losses"][i] for i in (0, 2)])
        for key, value in reference[0].items():
            torch.testing.assert_close(other[0][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_checkpoints_have_the_single_process_format(runs):
    one, two = runs
    single = one / "ckpt" / "step_00000002"
    sharded = two / "ckpt" / "step_00000002"
    a, b = read_checkpoint_config(single), read_checkpoint_config(sharded)
    assert a.keys() == b.keys()
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"] and a["ema"] is b["ema"] is True
    weights = [safetensors.torch.load_file(c / "weights.safetensors") for c in (single, sharded)]
    assert weights[0].keys() == weights[1].keys()
    assert any(key.startswith("optimizer/") for key in weights[0])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # It loads in one process like any other checkpoint.
    model, state = load_checkpoint(sharded)
    assert state.step == 2 and state.train_config["fsdp"] is True
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in weights[1].items() if k.startswith("model/")
    )


@pytest.mark.parametrize(
    ("folder", "name"),
    [("two", "ckpt"), ("two", "resume_own"), ("two", "resume_single"), ("one", "resume_fsdp")],
)
def test_checkpoints_resume_across_process_counts(runs, folder, name):
    one, two = runs
    reference = results(one, "ckpt")
    other = results(one if folder == "one" else two, name)
    resumed = name.startswith("resume")
    if resumed:  # only steps 3 and 4 ran in the resumed job
        reference = (reference[0], {**reference[1], "losses": reference[1]["losses"][2:],
                                    "history": reference[1]["history"][2:]})  # fmt: skip
    assert len(other[1]["losses"]) == (2 if resumed else 4)
    assert_same_training(reference, other)


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ValueError, match=r"micro_batches \(3\) must divide batch_size \(16\)"):
        TrainConfig(batch_size=16, micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches"):
        TrainConfig(micro_batches=0)


def test_one_micro_batch_keeps_the_model_0_stream():
    """micro_batches=1 in one process is the loop as it was: stream ``model/0`` per step."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def loss(self, x0, step=0, generator=None):
            seen.append((step, x0.shape[0], torch.randint(1 << 30, (), generator=generator).item()))
            return type("Out", (), {"loss": self.weight * x0.mean()})()

    from trajflow.train import step_seed

    config = TrainConfig(iterations=2, batch_size=8, warmup_steps=1, micro_batches=1)
    train(Spy(), config, lambda step, n: torch.ones(n, 2), progress=False)
    expected = [
        (step, 8, torch.randint(1 << 30, (), generator=torch.Generator().manual_seed(
            step_seed(0, step, "model/0"))).item())
        for step in range(2)
    ]  # fmt: skip
    assert seen == expected
    seen.clear()
    train(Spy(), config.model_copy(update={"micro_batches": 4}), lambda s, n: torch.ones(n, 2),
          progress=False)  # fmt: skip
    assert [(s, n) for s, n, _ in seen] == [(s, 2) for s in range(2) for _ in range(4)]
    assert len({draw for _, _, draw in seen}) == 8  # a stream of its own per micro-batch


# ----------------------------------------------------------------------------- compile
def compile_runs(monkeypatch, backend: str | None) -> tuple:
    """Three FM steps with ``compile=True`` (through ``backend``) and without."""
    import torch._dynamo

    compiled_modules = []
    real_compile = torch.compile

    def recording_compile(module, **kwargs):
        compiled_modules.append(module)
        return real_compile(module, **({"backend": backend} if backend else {}), **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model_config = toy_flow_matching_config()
    settings = TrainConfig(iterations=3, batch_size=16, warmup_steps=1)
    runs = [
        train(None, settings.model_copy(update={"compile": flag}), model_config=model_config,
              progress=False)
        for flag in (True, False)
    ]  # fmt: skip
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return runs, compiled_modules, graphs


def assert_compiled_like_eager(runs, compiled_modules, graphs) -> None:
    compiled, eager = runs
    assert len(compiled_modules) == 1 and graphs >= 1  # dynamo traced the loss
    assert compiled.skipped_steps == 0
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=0)
    for a, b in zip(compiled.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_traces_the_loss_and_trains_like_eager(monkeypatch):
    """``compile=True`` through dynamo with its eager backend: the tracing, in seconds."""
    assert_compiled_like_eager(*compile_runs(monkeypatch, "eager"))


@pytest.mark.skipif(
    not os.environ.get("TRAJFLOW_SLOW_TESTS"),
    reason="inductor compiles C++ for about 40 s on 2 CPU cores; set TRAJFLOW_SLOW_TESTS=1",
)
@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler")
def test_compile_with_inductor_trains_like_eager(monkeypatch):
    assert_compiled_like_eager(*compile_runs(monkeypatch, None))
