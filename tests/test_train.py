"""Training loop, checkpoints and the ``trajflow train`` command."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from toy_configs import tiny_ntm
from tqdm.std import tqdm

from trajflow import progress
from trajflow.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from trajflow.cli import main
from trajflow.config import ModelConfig
from trajflow.data import sample_dataset
from trajflow.progress import LineProgress, progress_bar
from trajflow.train import TrainConfig, WarmupCosine, train


def tiny_fm() -> ModelConfig:
    return ModelConfig(
        kind="flow_matching",
        predictor={
            "name": "mlp",
            "kwargs": {
                "features": 2,
                "hidden_features": [32, 32],
                "time_features": 8,
                "target": "velocity",
            },
        },
    )


def build(config: ModelConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return config.build()


def fast(**overrides) -> TrainConfig:
    settings = {"iterations": 10, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2}
    return TrainConfig(**{**settings, **overrides})


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


class Faulty(nn.Module):
    """Wraps a model; on chosen steps its loss, or only its gradients, become NaN."""

    def __init__(self, model: nn.Module, nan_loss=(), nan_grad=()):
        super().__init__()
        self.model, self.nan_loss, self.nan_grad = model, set(nan_loss), set(nan_grad)

    def loss(self, x0, step=0, generator=None):
        out = self.model.loss(x0, step=step, generator=generator)
        if step in self.nan_loss:
            out.loss = out.loss * math.nan
        if step in self.nan_grad:  # finite value, NaN gradient: d sqrt(v)/dv at 0 is inf, · 0
            weight = next(self.model.parameters())
            out.loss = out.loss + 0 * torch.sqrt(weight - weight.detach()).sum()
        return out


class WithSpare(nn.Module):
    """Scales a model's loss and adds a parameter whose gradient is exactly zero (not None)."""

    def __init__(self, model: nn.Module, scale: float = 1.0):
        super().__init__()
        self.model, self.scale = model, scale
        self.spare = nn.Parameter(torch.ones(3))

    def loss(self, x0, step=0, generator=None):
        out = self.model.loss(x0, step=step, generator=generator)
        out.loss = self.scale * out.loss + 0.0 * self.spare.sum()
        return out


# ----------------------------------------------------------------------------- schedule, config
def test_warmup_then_cosine_schedule():
    schedule = WarmupCosine(iterations=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [schedule(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)
    assert WarmupCosine(5)(0) == pytest.approx(1.0)  # no warmup

    # The optimizer sees these rates: lr · schedule(step) at each step.
    result = train(
        build(tiny_fm()), fast(iterations=8, warmup_steps=4, log_every=1), progress=False
    )
    expected = WarmupCosine(8, 4, 0.1)
    assert [h["lr"] for h in result.history] == pytest.approx(
        [3e-3 * expected(i) for i in range(8)]
    )


def test_train_config_names_the_bad_field():
    with pytest.raises(ValidationError, match="dataset"):
        TrainConfig(dataset="no_such_dataset")
    with pytest.raises(ValidationError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValidationError, match="betas"):
        TrainConfig(betas=(0.9, 1.5))
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=1e-3)  # extra fields are forbidden
    assert TrainConfig.model_validate_json(TrainConfig().model_dump_json()) == TrainConfig()


# ----------------------------------------------------------------------------- training
def held_out_loss(model: nn.Module) -> float:
    """The loss on a fixed batch with fixed noise: far less noisy than training losses."""
    data = sample_dataset("two_moons", 2048, seed=99)
    with torch.no_grad():
        return model.loss(data, generator=torch.Generator().manual_seed(0)).loss.item()


def test_loss_goes_down_on_a_toy_dataset():
    model = build(tiny_fm())
    before = held_out_loss(model)
    result = train(model, fast(iterations=300, batch_size=128, dataset="two_moons"), progress=False)
    assert held_out_loss(model) < 0.9 * before
    assert result.skipped_steps == 0 and len(result.losses) == 300
    assert math.isfinite(result.final_loss) and result.wall_time > 0

    model = build(tiny_ntm())
    before = held_out_loss(model)
    train(model, fast(iterations=40, dataset="two_moons"), progress=False)
    assert held_out_loss(model) < 0.5 * before


@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad"])
def test_non_finite_steps_are_skipped(fault):
    config = fast(iterations=3, warmup_steps=0, min_lr_ratio=1.0, ema_decay=0.5)  # constant rate
    faulty = Faulty(build(tiny_fm()), **{fault: [2]})
    result = train(faulty, config, progress=False)
    assert result.skipped_steps == 1 and result.skipped_at == [2]
    assert all(torch.isfinite(p).all() for p in faulty.parameters())
    assert math.isnan(result.losses[2]) == (fault == "nan_loss")

    # Step 2 changed nothing, the EMA included: both are as after steps 0 and 1.
    reference = Faulty(build(tiny_fm()))
    expected = train(reference, config.model_copy(update={"iterations": 2}), progress=False)
    assert_same_parameters(faulty, reference)
    assert_same_parameters(result.ema, expected.ema)
    with pytest.raises(AssertionError):  # the EMA lags the model, so an extra update would show
        assert_same_parameters(result.ema, faulty)

    # Training goes on after a skipped step.
    later = Faulty(build(tiny_fm()), **{fault: [0]})
    result = train(later, config.model_copy(update={"iterations": 2}), progress=False)
    assert result.skipped_at == [0]
    with pytest.raises(AssertionError):
        assert_same_parameters(later, build(tiny_fm()))


def test_ema_follows_its_formula():
    model = build(tiny_fm())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, fast(iterations=1, warmup_steps=0, ema_decay=0.9), progress=False)
    changed = False
    for name, average in result.ema.state_dict().items():
        live = model.state_dict()[name]
        torch.testing.assert_close(average, 0.9 * start[name] + 0.1 * live, rtol=0, atol=1e-7)
        changed |= not torch.equal(average, live)
    assert changed  # the EMA lags behind the live weights
    assert not any(p.requires_grad for p in result.ema.parameters())


def test_ema_warmup_ramps_the_decay_by_step():
    model = build(tiny_fm())
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]
    handle = register_optimizer_step_post_hook(
        lambda *_: snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    )
    try:
        config = fast(iterations=2, warmup_steps=0, ema_decay=0.99, ema_warmup=True)
        result = train(model, config, progress=False)
    finally:
        handle.remove()
    start, after_0, after_1 = snapshots
    d0, d1 = 1 / 10, 2 / 11  # (1 + n) / (10 + n), well below 0.99
    for name, average in result.ema.state_dict().items():
        expected = d1 * (d0 * start[name] + (1 - d0) * after_0[name]) + (1 - d1) * after_1[name]
        torch.testing.assert_close(average, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValidationError, match="ema_warmup needs ema_decay"):
        TrainConfig(ema_warmup=True)


def test_weight_decay_reaches_adamw_and_shrinks_weights():
    for decay in (0.0, 2.0):
        model = WithSpare(build(tiny_fm()))
        result = train(model, fast(iterations=6, weight_decay=decay, log_every=1), progress=False)
        # A zero gradient makes Adam's step zero: only the decoupled decay p ← p (1 - lr_i λ) acts.
        expected = math.prod(1 - h["lr"] * decay for h in result.history)
        torch.testing.assert_close(
            model.spare.detach(), torch.full((3,), expected), rtol=1e-6, atol=0
        )
    assert expected < 0.98


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_optimizer_steps_with_the_clipped_gradient(clip):
    seen = []

    def record(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]  # FM leaves its (t_out, T) path out
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    # A loss scaled up so that the gradient norm is far above the clipping threshold.
    model = WithSpare(build(tiny_fm()), scale=1e3)
    hook = register_optimizer_step_pre_hook(record)
    try:
        config = fast(iterations=3, grad_clip=clip, log_every=1)
        result = train(model, config, progress=False)
    finally:
        hook.remove()
    raw = [h["grad_norm"] for h in result.history]  # the norm before clipping
    assert min(raw) > 100
    expected = raw if clip is None else [clip] * len(raw)
    assert seen == pytest.approx(expected, rel=1e-4)


def test_bad_data_and_models_raise():
    with pytest.raises(TypeError, match="data_fn"):
        train(
            build(tiny_fm()),
            fast(iterations=1),
            data_fn=lambda step, size: torch.zeros(size - 1, 2),
            progress=False,
        )
    with pytest.raises(TypeError, match="loss"):
        train(nn.Linear(2, 2), fast(iterations=1), progress=False)
    with pytest.raises(ValueError, match="model"):
        train(None, fast(iterations=1), progress=False)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_without_pickle(tmp_path, monkeypatch):
    config = tiny_ntm()
    result = train(build(config), fast(iterations=3, ema_decay=0.5), progress=False)
    optimizer = torch.optim.AdamW(result.model.parameters(), lr=1e-3)
    result.model.loss(torch.randn(8, 2)).loss.backward()
    optimizer.step()
    folder = save_checkpoint(
        tmp_path / "ckpt",
        result.model,
        config,
        train_config=fast(),
        optimizer=optimizer,
        ema=result.ema,
        step=3,
        extra={"note": "hi"},
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    loaded, state = load_checkpoint(folder)
    assert_same_parameters(loaded, result.model)
    assert state.model_config == config and state.step == 3
    assert TrainConfig.model_validate(state.train_config) == fast()
    assert state.extra == {"note": "hi"}

    ema = build(config, seed=1)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=5.0)
    restore_training_state(state, optimizer=fresh, ema=ema)
    assert_same_parameters(ema, result.ema)
    assert fresh.param_groups[0]["lr"] == 1e-3
    assert fresh.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
    for saved, restored in zip(
        optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values(), strict=True
    ):
        assert all(torch.equal(saved[key], restored[key]) for key in saved)


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    config = tiny_fm()
    model = build(config)
    good = save_checkpoint(tmp_path / "ckpt", model, config, step=1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    for target in ("ckpt", "other"):  # overwriting a checkpoint, and writing a new one
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path / target, model, config, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    monkeypatch.undo()
    assert load_checkpoint(good)[1].step == 1

    save_checkpoint(tmp_path / "ckpt", model, config, step=2)  # a successful overwrite
    assert load_checkpoint(good)[1].step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_checkpoint(tmp_path)
    model = build(tiny_fm())
    folder = save_checkpoint(tmp_path / "nocfg", model, None)
    with pytest.raises(ValueError, match="model config"):
        load_checkpoint(folder)
    assert_same_parameters(load_checkpoint(folder, model=build(tiny_fm(), seed=3))[0], model)
    with pytest.raises(RuntimeError, match="state_dict"):
        load_checkpoint(folder, model=build(tiny_ntm()))
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(tmp_path / "bad", model, None, extra={"x": object()})


@pytest.mark.parametrize("kind", ["ntm", "flow_matching"])
def test_resume_is_exact(tmp_path, kind):
    config = tiny_ntm(mode="pairwise") if kind == "ntm" else tiny_fm()
    settings = fast(iterations=9, ema_decay=0.8, ema_warmup=True)  # the ramp reads the step
    whole = train(build(config), settings, model_config=config, progress=False)

    run = settings.model_copy(update={"out_dir": str(tmp_path), "checkpoint_every": 4})
    first = train(build(config), run, model_config=config, progress=False)
    assert [p.name for p in first.checkpoints] == [
        "step_00000004",
        "step_00000008",
        "step_00000009",
    ]
    assert latest_checkpoint(tmp_path).name == "step_00000009"
    # A fresh, process-like start: a differently initialised global RNG and no model.
    torch.manual_seed(1234)
    resumed = train(None, run, resume=tmp_path / "step_00000004", progress=False)
    assert len(resumed.losses) == 5 and resumed.losses == whole.losses[4:]
    assert_same_parameters(resumed.model, whole.model)
    assert_same_parameters(resumed.ema, whole.ema)


# ----------------------------------------------------------------------------- progress
def test_progress_in_a_log_is_a_few_plain_lines(capsys):
    """Off a terminal, a line every 10% of the run instead of carriage-return redraws."""
    train(build(tiny_fm()), fast(iterations=40, log_every=4), progress=True)
    lines = capsys.readouterr().err.splitlines(keepends=True)
    assert not any("\r" in line for line in lines)
    assert len(lines) == 10, lines
    assert lines[0].startswith("train FlowMatching: 4/40 (10%)")
    assert lines[-1].startswith("train FlowMatching: 40/40 (100%)") and "loss=" in lines[-1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_picks_tqdm_on_a_terminal_only():
    terminal = Terminal()
    bar = progress_bar(5, desc="x", file=terminal)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue()  # what a log must not get
    assert isinstance(progress_bar(5, file=io.StringIO()), LineProgress)
    assert isinstance(progress_bar(5, file=terminal, enabled=False), LineProgress)


def test_line_progress_prints_by_count_and_by_time(monkeypatch):
    log = io.StringIO()
    with LineProgress(95, desc="a", file=log, every=0.25) as bar:  # a line every 24 updates
        for _ in range(95):
            bar.update()
    counts = [line.split()[1] for line in log.getvalue().splitlines()]
    assert counts == ["24/95", "48/95", "72/95", "95/95"]

    clock = itertools.count(0, 10)  # every call: 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = LineProgress(None, desc="b", file=log, seconds=25.0)
    for _ in range(5):
        bar.update()
    bar.set_postfix(loss=0.123456)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3", "5"]  # at 30 s, then at the close
    assert lines[-1].endswith("loss=0.1235")

    silent = io.StringIO()
    with LineProgress(10, file=silent, enabled=False) as bar:
        bar.update(10)
    assert silent.getvalue() == "" and bar.n == 10
    with pytest.raises(ValueError, match="every"):
        LineProgress(10, every=0.0)


# ----------------------------------------------------------------------------- command line
def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_trains_end_to_end_and_resumes(tmp_path, capsys):
    model_json = write_json(tmp_path / "model.json", tiny_ntm().model_dump(mode="json"))
    train_json = write_json(
        tmp_path / "train.json", {"batch_size": 32, "warmup_steps": 1, "checkpoint_every": 3}
    )
    out = tmp_path / "run"
    args = ["train", "--config", model_json, "--train-config", train_json, "--out", str(out)]
    main([*args, "--iterations", "4", "--dataset", "two_moons", "--no-progress",
          "--eval-samples", "200"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and report["skipped_steps"] == 0
    assert math.isfinite(report["final_loss"]) and report["sliced_wasserstein"] > 0
    assert report["checkpoint"] == str(out / "step_00000004")
    assert sorted(p.name for p in out.iterdir()) == [
        "step_00000003",
        "step_00000004",
        "train_report.json",
    ]

    # Resume from the run folder with the checkpoint's configs, for two more steps.
    main(["train", "--resume", str(out), "--iterations", "6", "--no-progress",
          "--eval-samples", "0"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 6 and "sliced_wasserstein" not in report
    state = load_checkpoint(out / "step_00000006")[1]
    assert state.train_config["dataset"] == "two_moons" and state.train_config["iterations"] == 6


@pytest.mark.parametrize(
    ("model", "train_config", "message"),
    [
        ({"predictr": {"name": "mlp"}}, {}, "predictr"),
        ({"predictor": {"name": "no_such_net"}}, {}, "no_such_net"),
        ({"predictor": {"name": "mlp", "kwargs": {"features": 2, "widths": 3}}}, {}, "widths"),
        (None, {"lr": "fast"}, "lr"),
        (None, {"ema_decay": 2.0}, "ema_decay"),
        (None, [1, 2], "JSON object"),
        ("{not json", {}, "not valid JSON"),
    ],
)
def test_cli_reports_bad_configs_without_a_traceback(
    tmp_path, capsys, model, train_config, message
):
    args = ["train", "--out", str(tmp_path / "run"), "--no-progress"]
    if isinstance(model, str):
        (tmp_path / "model.json").write_text(model)
        args += ["--config", str(tmp_path / "model.json")]
    elif model is not None:
        args += ["--config", write_json(tmp_path / "model.json", model)]
    args += ["--train-config", write_json(tmp_path / "train.json", train_config)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("trajflow train: error:") and message in error
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path)])
    assert "no checkpoint" in capsys.readouterr().err


def test_two_process_gloo_smoke_run(tmp_path):
    model_json = write_json(tmp_path / "model.json", tiny_ntm().model_dump(mode="json"))
    train_json = write_json(tmp_path / "train.json", {"warmup_steps": 1, "ema_decay": 0.5})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "trajflow", "train", "--config", model_json,
               "--train-config", train_json, "--iterations", "3", "--batch-size", "16",
               "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress",
               "--eval-samples", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"steps": 3') == 1  # only rank 0 reports
    checkpoint = tmp_path / "run" / "step_00000003"
    _, state = load_checkpoint(checkpoint)
    assert state.step == 3 and state.ema is not None
