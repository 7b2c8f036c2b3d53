"""Training jobs shared by the distributed tests: run in-process, or under ``torchrun``.

Not a test module. The tests run the single-process reference with :func:`run_jobs` and the
same jobs on two gloo processes with::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed_worker.py JOBS.json OUT

A job is a dict: ``name``; ``kind`` (``"core"``: a trajflow ``ModelConfig`` given as
``model_config``; ``"t2i_fm"`` / ``"t2i_ntm"``: the ``tiny`` text-to-image preset's FM stage,
or its NTM stage finetuned from it); ``train`` (the :class:`~trajflow.train.TrainConfig`
fields); optionally ``resume`` (a checkpoint folder) and, for ``"core"``,
``overflow_rows`` (``[step, [rows]]``: those rows of that step's batch are so large that the
loss overflows). Every rank writes
``OUT/<name>.rank<r>.safetensors`` (the returned model under ``model/``, its EMA under
``ema/``) and ``OUT/<name>.rank<r>.json`` (losses, skipped steps, checkpoints).

Example:
    >>> job = {"name": "x", "kind": "core", "model_config": {"predictor": {"name": "mlp",
    ...        "kwargs": {"features": 2, "hidden_features": [8], "time_features": 4}}},
    ...        "train": {"iterations": 1, "batch_size": 4, "warmup_steps": 1}}
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> run_jobs([job], out)
    >>> sorted(p.name for p in out.iterdir())
    ['x.rank0.json', 'x.rank0.safetensors']
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from trajflow.config import ModelConfig
from trajflow.data import sample_dataset
from trajflow.train import TrainConfig, step_seed, train


def build_job(job: dict[str, Any]):
    """``(model, model_config, data_fn)`` of a job, built identically in every process."""
    if job["kind"] == "core":
        return None, ModelConfig.model_validate(job["model_config"]), _core_data(job)
    from trajflow_t2i.model import TextToImage
    from trajflow_t2i.presets import preset
    from trajflow_t2i.training import caption_batches

    config = preset("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TextToImage(config, stage="fm")
        if job["kind"] == "t2i_ntm":
            torch.manual_seed(1)
            model = TextToImage.finetune(model)
    return model, config, caption_batches(config, model)


def _core_data(job: dict[str, Any]):
    """The default data of ``train``; the ``overflow_rows`` of a step overflow the loss."""
    config = TrainConfig.model_validate(job["train"])
    overflow_step, overflow_rows = job.get("overflow_rows", (None, []))

    def data_fn(step: int, batch_size: int) -> torch.Tensor:
        x0 = sample_dataset(config.dataset, batch_size, seed=step_seed(config.seed, step))
        if step == overflow_step:
            x0[overflow_rows] = 3e38  # finite data whose loss overflows
        return x0

    return data_fn


def run_jobs(jobs: list[dict[str, Any]], out: Path) -> None:
    """Runs the jobs in order and writes what each rank returned (see the module docstring)."""
    rank = int(os.environ.get("RANK", "0"))
    for job in jobs:
        model, model_config, data_fn = build_job(job)
        result = train(
            model,
            job["train"],
            data_fn,
            model_config=model_config,
            resume=job.get("resume"),
            progress=False,
        )
        tensors = {
            f"model/{k}": v.detach().cpu().clone() for k, v in result.model.state_dict().items()
        }
        if result.ema is not None:
            tensors.update(
                {f"ema/{k}": v.detach().cpu().clone() for k, v in result.ema.state_dict().items()}
            )
        stem = out / f"{job['name']}.rank{rank}"
        safetensors.torch.save_file(tensors, f"{stem}.safetensors")
        report = {
            "losses": result.losses,
            "skipped_at": result.skipped_at,
            "history": result.history,
            "checkpoints": [str(path) for path in result.checkpoints],
            "model_device": str(next(result.model.parameters()).device),
        }
        Path(f"{stem}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    # The first train call sets up the process group, the others reuse it (as the t2i
    # recipe's two stages do), and each returns only once rank 0's checkpoints are written.
    run_jobs(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
