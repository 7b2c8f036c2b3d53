"""The ``tiny`` text-to-image model at scale on CPU: two gloo processes, FSDP2, bf16.

Both training stages (flow-matching pretraining, NTM finetuning with its frozen teacher) on
two processes must train the parameters one process trains on the concatenated batch (the
same global micro-batches, each with its own random stream), under DDP and under FSDP2 with
every transformer layer sharded. One ``torchrun`` launch runs the two-process jobs (see
``tests/distributed_worker.py``); the single-process references run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from trajflow.train import TrainConfig, train
from trajflow_t2i.data import dequantize
from trajflow_t2i.model import TextToImage
from trajflow_t2i.presets import preset
from trajflow_t2i.training import caption_batches, stage_train_config, train_t2i

WORKER = Path(__file__).parents[1] / "distributed_worker.py"
spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

SETTINGS = {
    "iterations": 3,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_steps": 1,
    "ema_decay": 0.8,
    "grad_clip": 1e4,  # the gradient's scale must show in the parameters
    "log_every": 1,
}


def job(name: str, kind: str, **train_settings) -> dict:
    return {"name": name, "kind": kind, "train": {**SETTINGS, **train_settings}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    worker.run_jobs(
        [
            job("fm", "t2i_fm", micro_batches=2),
            job("ntm", "t2i_ntm", micro_batches=2),
            job("ntm4", "t2i_ntm", micro_batches=4),
            job("fm_long", "t2i_fm", micro_batches=2, iterations=4),
        ],
        one,
    )
    checkpointed = {"fsdp": True, "iterations": 4, "checkpoint_every": 2}
    jobs = [
        job("fm_ddp", "t2i_fm"),
        job("fm_fsdp", "t2i_fm", fsdp=True),
        job("ntm_ddp", "t2i_ntm"),
        job("ntm_fsdp", "t2i_ntm", micro_batches=2, fsdp=True),
        # The FM stage has parameters without gradients (hence without optimizer state).
        job("fm_ckpt", "t2i_fm", **checkpointed, out_dir=str(two / "fm")),
        job("fm_resume", "t2i_fm", **checkpointed, out_dir=str(two / "fm_resumed"))
        | {"resume": str(two / "fm" / "step_00000002")},
    ]
    (two / "jobs.json").write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(WORKER), str(two / "jobs.json"), str(two)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return one, two


def load(folder: Path, name: str, rank: int = 0) -> tuple[dict, dict]:
    stem = folder / f"{name}.rank{rank}"
    return safetensors.torch.load_file(f"{stem}.safetensors"), json.loads(
        Path(f"{stem}.json").read_text()
    )


def comparable(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without the key part of attention biases.

    Adding a bias to every key adds the same ``q · b`` to all of a query's scores, which the
    softmax ignores: its gradient is zero in exact arithmetic, so what it gets is rounding
    noise, which Adam normalises into steps of about ``lr`` in whatever direction the noise
    points. Every other entry must agree to float tolerance.
    """
    if key.endswith("qkv.bias"):
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor


@pytest.mark.parametrize(
    ("single", "double"),
    [
        ("fm", "fm_ddp"),
        ("fm", "fm_fsdp"),
        ("ntm", "ntm_ddp"),
        ("ntm4", "ntm_fsdp"),
        ("fm_long", "fm_ckpt"),
        ("fm_long", "fm_resume"),
    ],
)
def test_two_processes_train_the_tiny_model_like_one(runs, single, double):
    one, two = runs
    tensors, report = load(one, single)
    assert report["skipped_at"] == [] and len(report["losses"]) in (3, 4)
    if double == "fm_resume":  # it ran steps 3 and 4 only
        report = {key: report[key][2:] for key in ("losses", "history")}
    assert any(key.startswith("ema/") for key in tensors)
    for rank in (0, 1):
        other, other_report = load(two, double, rank)
        assert other.keys() == tensors.keys()
        for key, value in tensors.items():
            torch.testing.assert_close(
                comparable(key, other[key]), comparable(key, value), rtol=1e-4, atol=1e-5, msg=key
            )
        torch.testing.assert_close(other_report["losses"], report["losses"], rtol=1e-5, atol=0)
        norms = [[h["grad_norm"] for h in r["history"]] for r in (report, other_report)]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-4, atol=0)
        assert other_report["model_device"] == "cpu"


def test_training_moved_the_weights(runs):
    """The equivalence above is not that of two runs that did nothing."""
    one, _ = runs
    for name, kind in (("fm", "t2i_fm"), ("ntm", "t2i_ntm")):
        initial = worker.build_job({"kind": kind})[0].state_dict()
        trained, _ = load(one, name)
        moved = max((trained[f"model/{k}"] - v).abs().max().item() for k, v in initial.items())
        assert moved > 1e-3, name


def test_stage_train_config_passes_the_scaling_flags(tmp_path):
    config = preset("tiny")
    assert stage_train_config(config, config.train.fm, tmp_path).fsdp is False
    config.train.fsdp, config.train.compile = True, True
    settings = stage_train_config(config, config.train.ntm, tmp_path)
    assert settings.fsdp is True and settings.compile is True
    assert stage_train_config(preset("base"), preset("base").train.fm, tmp_path).fsdp is True
    # bf16 autocast only where it pays: CUDA.
    config.train.bf16 = True
    assert stage_train_config(config, config.train.fm, tmp_path, "cpu").precision == "float32"
    assert stage_train_config(config, config.train.fm, tmp_path, "cuda").precision == "bf16"


def test_only_rank_0_exports_the_trained_model(tmp_path, monkeypatch):
    """Under torchrun every rank finishes train_t2i; two writers of final/ would collide."""
    config = preset("tiny")
    config.train.fm.iterations = config.train.ntm.iterations = 1
    monkeypatch.setenv("RANK", "1")
    train_t2i(config, tmp_path / "rank1", progress=False)
    assert not (tmp_path / "rank1" / "final").exists()
    assert (tmp_path / "rank1" / "ntm" / "step_00000001").is_dir()  # rank 1 trained
    monkeypatch.setenv("RANK", "0")
    train_t2i(config, tmp_path / "rank0", progress=False)
    assert (tmp_path / "rank0" / "final" / "model.safetensors").is_file()


def tiny_models() -> tuple[TextToImage, TextToImage]:
    config = preset("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fm = TextToImage(config, stage="fm")
        return fm, TextToImage.finetune(fm)


def test_bf16_autocast_keeps_log_dets_and_losses_in_float32():
    _, ntm = tiny_models()
    images, ids, mask = caption_batches(ntm.config, ntm)(0, 4)
    generator = torch.Generator().manual_seed(0)
    tokens = ntm.to_tokens(dequantize(images, generator, ntm.levels))
    levels = torch.stack([tokens, 0.5 * tokens], dim=1)  # (B, K=2, L, C)
    times = torch.tensor([[0.2, 0.7]]).expand(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = ntm.generator.transporter[0].embed(tokens)  # a bf16 matmul: autocast is on
        u, logdet = ntm.generator.transport(levels, times, 2)
        out = ntm.loss(images, ids, mask, step=0, generator=generator)
    assert hidden.dtype == torch.bfloat16
    assert logdet.dtype == u.dtype == torch.float32
    assert out.loss.dtype == out.nll.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(logdet).all()
    with torch.no_grad():
        exact = ntm.generator.transport(levels, times, 2)[1]
    # bf16 matmuls inside, float32 log-dets out: close to the float32 ones, not equal.
    torch.testing.assert_close(logdet, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


@pytest.mark.parametrize("stage", ["fm", "ntm"])
def test_bf16_training_steps_are_finite_and_close_to_float32(stage):
    index = ("fm", "ntm").index(stage)
    model = tiny_models()[index]
    data_fn = caption_batches(model.config, model)
    settings = TrainConfig(**{**SETTINGS, "ema_decay": None})
    runs = {}
    for precision in ("float32", "bf16"):
        runs[precision] = train(
            tiny_models()[index],  # the same initial weights for both
            settings.model_copy(update={"precision": precision}),
            data_fn,
            progress=False,
        )
    bf16 = runs["bf16"]
    assert bf16.skipped_steps == 0 and all(torch.isfinite(torch.tensor(bf16.losses)))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    # Same data and noise, bf16 matmuls: the first loss agrees with float32 to ~1%.
    first = runs["float32"].losses[0]
    assert abs(bf16.losses[0] - first) < 0.05 * abs(first)
    assert bf16.losses[0] != first  # autocast did run in bf16


def test_fsdp_shards_every_transformer_layer_and_the_root(tmp_path):
    """The units ``train`` makes: one per TransformerLayer (all of them), the rest at the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from trajflow.distributed import LossModule, fully_shard_layers
    from trajflow.nn import TransformerLayer

    _, ntm = tiny_models()
    layers = [m for m in ntm.modules() if isinstance(m, TransformerLayer)]
    # text encoder, 2 TarFlow blocks and the predictor: 1 layer each in the tiny preset
    assert len(layers) == 4
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        root = LossModule(ntm)
        fully_shard_layers(root, init_device_mesh("cpu", (1,)))
        assert isinstance(root, FSDPModule)
        assert all(isinstance(layer, FSDPModule) for layer in layers)
        # The frozen teacher is not a submodule: it is left whole, not sharded.
        teacher = ntm.generator.teacher
        assert not any(isinstance(m, FSDPModule) for m in teacher.modules())
        images, ids, mask = caption_batches(ntm.config, ntm)(0, 4)
        root(images, ids, mask, step=0, generator=torch.Generator().manual_seed(0)).backward()
        assert all(p.grad is not None for p in layers[-1].parameters())
    finally:
        dist.destroy_process_group()
