"""The command line: ``trajflow sample`` and ``eval`` from checkpoints, and every user mistake
(missing files, invalid JSON, unknown names, bad values, unwritable outputs) ending in a clear
message, exit status 2, no traceback and no partial file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_configs import tiny_ntm

from trajflow.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from trajflow.cli import SAMPLE_FORMATS, main
from trajflow.config import ModelConfig
from trajflow.data import DATASETS, sample_dataset
from trajflow.train import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def tiny_fm() -> ModelConfig:
    kwargs = {"features": 2, "hidden_features": [16], "time_features": 8, "target": "velocity"}
    return ModelConfig(kind="flow_matching", predictor={"name": "mlp", "kwargs": kwargs})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of a tiny NTM with an EMA and of a tiny flow-matching model without one."""
    folders = {}
    for name, model_config, ema in (("ntm", tiny_ntm(), 0.5), ("fm", tiny_fm(), None)):
        out = tmp_path_factory.mktemp(name)
        config = TrainConfig(iterations=6, batch_size=32, lr=3e-3, warmup_steps=1,
                             ema_decay=ema, dataset="two_moons", out_dir=str(out))  # fmt: skip
        train(model_config=model_config, config=config, progress=False)
        folders[name] = out / "step_00000006"
    return folders


def files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


def run_cli(capsys, *args) -> dict:
    main([str(arg) for arg in args])
    return json.loads(capsys.readouterr().out)


def fails(capsys, *args) -> str:
    """Runs the command expecting a clean failure; returns its message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert f"trajflow {args[0]}: error:" in error and "Traceback" not in error
    return error


def model_from(checkpoint: Path, weights: str):
    model, state = load_checkpoint(checkpoint)
    if weights == "ema":
        model.load_state_dict(state.ema)
    return model.eval()


# ----------------------------------------------------------------------------- sample
@pytest.mark.parametrize("suffix", SAMPLE_FORMATS)
def test_sample_writes_each_format(runs, tmp_path, capsys, suffix):
    out = tmp_path / "deep" / f"points{suffix}"
    report = run_cli(capsys, "sample", "--checkpoint", runs["ntm"], "--n", 64, "--steps", 2,
                     "--seed", 3, "--out", out)  # fmt: skip
    assert report["weights"] == "ema" and report["steps"] == 2 and report["out"] == str(out)
    assert files(tmp_path) == {tmp_path / "deep", out}  # no temporary file left
    expected = model_from(runs["ntm"], "ema").sample(
        64, steps=2, generator=torch.Generator().manual_seed(3)
    )
    if suffix == ".png":
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return
    points = torch.from_numpy(np.load(out)) if suffix == ".npy" else torch.load(out)
    assert points.shape == (64, 2) and points.dtype == torch.float32
    torch.testing.assert_close(points, expected)  # the EMA weights, the given seed


def test_sample_live_weights_and_flow_matching(runs, tmp_path, capsys):
    out = tmp_path / "live.npy"
    run_cli(capsys, "sample", "--checkpoint", runs["ntm"].parent, "--n", 20, "--weights", "model",
            "--out", out)  # fmt: skip
    live = model_from(runs["ntm"], "model").sample(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.from_numpy(np.load(out)), live)
    ema = model_from(runs["ntm"], "ema").sample(20, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(live, ema)

    report = run_cli(capsys, "sample", "--checkpoint", runs["fm"], "--n", 20, "--steps", 3,
                     "--out", tmp_path / "fm.pt")  # fmt: skip
    assert report["model"] == "FlowMatching" and report["weights"] == "model"
    euler = model_from(runs["fm"], "model").sample(
        20, steps=3, method="euler", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(torch.load(tmp_path / "fm.pt"), euler)


# ----------------------------------------------------------------------------- eval
def test_eval_matches_the_train_report(tmp_path, capsys):
    """``eval`` of the last checkpoint reproduces the distance ``train`` reported at its end."""
    model_json = tmp_path / "model.json"
    model_json.write_text(tiny_ntm().model_dump_json())
    run_dir = tmp_path / "run"
    trained = run_cli(capsys, "train", "--config", model_json, "--iterations", 5, "--batch-size",
                      32, "--dataset", "pinwheel", "--seed", 4, "--out", run_dir, "--no-progress",
                      "--eval-samples", 300)  # fmt: skip
    out = tmp_path / "eval.json"
    report = run_cli(capsys, "eval", "--checkpoint", run_dir, "--n", 300, "--out", out)
    assert json.loads(out.read_text()) == report
    assert report["dataset"] == "pinwheel" and report["seed"] == 4 and report["step"] == 5
    assert report["sliced_wasserstein"] == pytest.approx(trained["sliced_wasserstein"], rel=1e-6)
    assert report["model"] == "NTM" and report["weights"] == "model" and report["steps"] == 4
    assert "t0 = 0.001, T = 4" in report["bound_variable"]
    # The bound is on held-out points of the training dataset (seed 10 000 + training seed).
    model = model_from(run_dir / "step_00000005", "model")
    held_out = sample_dataset("pinwheel", 300, seed=10_004)
    bound = model.data_bound(held_out, steps=4, generator=torch.Generator().manual_seed(5))
    assert report["bits_per_dim_bound"] == pytest.approx(bound.bits_per_dim.mean().item())

    fewer = run_cli(capsys, "eval", "--checkpoint", run_dir, "--n", 300, "--steps", 2)
    assert "T = 2" in fewer["bound_variable"]
    assert fewer["bits_per_dim_bound"] != report["bits_per_dim_bound"]


def test_eval_of_ema_and_flow_matching_checkpoints(runs, capsys):
    ema = run_cli(capsys, "eval", "--checkpoint", runs["ntm"], "--n", 200)
    live = run_cli(capsys, "eval", "--checkpoint", runs["ntm"], "--n", 200, "--weights", "model")
    assert ema["weights"] == "ema" and live["weights"] == "model"
    assert ema["bits_per_dim_bound"] != live["bits_per_dim_bound"]
    assert ema["dataset"] == "two_moons"

    fm = run_cli(capsys, "eval", "--checkpoint", runs["fm"], "--n", 200, "--steps", 5)
    assert fm["bits_per_dim_bound"] is None and "no likelihood bound" in fm["bound_variable"]
    assert fm["sliced_wasserstein"] > 0 and fm["steps"] == 5


# ----------------------------------------------------------------------------- mistakes
def damage(checkpoint: Path, how: str, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    if how == "no config":
        (copy / CONFIG_FILE).unlink()
    elif how == "bad JSON":
        (copy / CONFIG_FILE).write_text('{"format": "trajflow-checkpoint", ')
    elif how == "cut weights":
        weights = copy / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "unknown predictor":  # a version-1 checkpoint (no checksums) naming a bad net
        config = json.loads((copy / CONFIG_FILE).read_text())
        del config["checksums"]
        config["version"] = 1
        config["model_config"]["predictor"]["name"] = "no_such_net"
        (copy / CONFIG_FILE).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no config", "config.json is missing"),
        ("bad JSON", "config.json is not valid JSON"),
        ("cut weights", "weights.safetensors does not match the SHA-256"),
        ("unknown predictor", "no_such_net"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval", "train"])
def test_damaged_checkpoints_are_named(runs, tmp_path, capsys, how, message, command):
    checkpoint = damage(runs["ntm"], how, tmp_path)
    before = files(tmp_path)
    args = {
        "sample": ["--checkpoint", checkpoint, "--out", tmp_path / "x.npy"],
        "eval": ["--checkpoint", checkpoint, "--out", tmp_path / "x.json"],
        "train": ["--resume", checkpoint, "--iterations", 8, "--out", tmp_path / "more"],
    }[command]
    error = fails(capsys, command, *args)
    assert message in error
    if how != "unknown predictor":
        assert str(checkpoint) in error
    assert files(tmp_path) == before  # nothing written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "{tmp}/nowhere"], "no checkpoint in"),
        (["--out", "{tmp}/points.jpg"], "expected a file ending in .png, .npy, .pt"),
        (["--out", "{tmp}/points"], "got 'no suffix'"),
        (["--out", "{tmp}/folder.npy"], "is a folder; expected a file name"),
        (["--out", "{tmp}/a_file/points.npy"], "is not a folder"),
        (["--n", "0"], "argument --n: expected a positive integer, got 0"),
        (["--n", "-3"], "argument --n: expected a positive integer"),
        (["--n", "many"], "argument --n: expected a positive integer, got 'many'"),
        (["--steps", "0"], "argument --steps: expected a positive integer"),
        (["--steps", "1.5"], "argument --steps: expected a positive integer"),
        (["--weights", "best"], "argument --weights: invalid choice"),
        (["--device", "gpu7"], "--device: expected cpu, cuda, cuda:N or auto"),
        (["--checkpoint", "{fm}", "--weights", "ema"], "has no EMA weights"),
    ],
)
def test_sample_mistakes(runs, tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "folder.npy").mkdir()
    defaults = {"--checkpoint": str(runs["ntm"]), "--out": str(tmp_path / "points.npy")}
    args = [arg.format(tmp=tmp_path, fm=runs["fm"]) for arg in args]
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    before = files(tmp_path)
    assert message in fails(capsys, "sample", *args)
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/report.txt"], "--out {tmp}/report.txt: expected a file ending in .json"),
        (["--dataset", "no_such_data"], "unknown dataset 'no_such_data'; known: "),
        (["--projections", "0"], "argument --projections: expected a positive integer"),
        (["--n", "0"], "argument --n: expected a positive integer"),
    ],
)
def test_eval_mistakes(runs, tmp_path, capsys, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert message.format(tmp=tmp_path) in fails(capsys, "eval", "--checkpoint", runs["ntm"], *args)
    assert files(tmp_path) == set()


@pytest.mark.parametrize(("suffix", "writer"), [(".npy", "numpy.save"), (".pt", "torch.save")])
def test_a_failed_write_leaves_no_partial_file(runs, tmp_path, capsys, monkeypatch, suffix, writer):
    def half_then_fail(*args, **kwargs):
        target = args[1] if writer == "torch.save" else args[0]
        if hasattr(target, "write"):
            target.write(b"half a file")
        else:
            Path(target).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    module, name = writer.split(".")
    monkeypatch.setattr(sys.modules[module], name, half_then_fail)
    out = tmp_path / f"points{suffix}"
    error = fails(capsys, "sample", "--checkpoint", runs["ntm"], "--n", 10, "--out", out)
    assert f"cannot write --out {out}: No space left on device" in error
    assert files(tmp_path) == set()


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--iterations", "0"], "iterations"),
        (["--batch-size", "-2"], "batch_size"),
        (["--lr", "-0.1"], "lr"),
        (["--keep-last", "0"], "keep_last"),
        (["--checkpoint-every", "0"], "checkpoint_every"),
        (["--device", "tpu:x"], "device"),
        (["--config", "{tmp}/missing.json"], "cannot read the model config"),
        (["--train-config", "{tmp}/missing.json"], "cannot read the train config"),
        (["--out", "{tmp}/a_file/run"], "is not a folder"),
        (["--resume", "{tmp}/nowhere"], "no checkpoint to resume from"),
    ],
)
def test_train_mistakes(tmp_path, capsys, flags, field):
    (tmp_path / "a_file").write_text("not a folder")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "run")]
    before = files(tmp_path)
    assert field in fails(capsys, "train", "--no-progress", "--iterations", "3", *flags)
    assert files(tmp_path) == before


INVALID = {
    "iterations": st.one_of(
        st.integers(max_value=0), st.text("abc ", max_size=5), st.floats(0.1, 0.9)
    ),
    "batch_size": st.one_of(st.integers(max_value=0), st.lists(st.integers(), max_size=2)),
    "lr": st.one_of(st.floats(max_value=0), st.just("fast"), st.none()),
    "ema_decay": st.one_of(st.floats(min_value=1), st.floats(max_value=0)),
    "keep_last": st.integers(max_value=0),
    "warmup_steps": st.integers(max_value=-1),
    "betas": st.one_of(st.just([0.9, 1.5]), st.just([0.9]), st.just("b")),
    "dataset": st.text(max_size=8).filter(lambda name: name not in DATASETS),
    "no_such_field": st.integers(),
}


@FUZZ
@given(field=st.sampled_from(sorted(INVALID)), data=st.data())
def test_fuzzed_invalid_train_configs_name_the_field(tmp_path, capsys, field, data):
    value = data.draw(INVALID[field], label="value")
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    config = folder / "train.json"
    config.write_text(json.dumps({"iterations": 3, field: value}))
    error = fails(capsys, "train", "--train-config", config, "--out", folder / "run")
    assert f"train config {config}" in error and field in error
    assert files(folder) == {config}


# File-name characters a shell can pass (no NUL, no lone surrogates), "/" aside.
NAME = st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="/")
SUFFIX = st.one_of(st.sampled_from([*SAMPLE_FORMATS, ".PNG", ".Npy", ".jpg", ".npz", ""]),
                   st.text(NAME, max_size=5).map(lambda text: "." + text))  # fmt: skip


@FUZZ
@given(suffix=SUFFIX, n=st.one_of(st.integers(-3, 3), st.text("ab -", max_size=3)))
def test_fuzzed_sample_arguments_either_work_or_fail_cleanly(runs, tmp_path, capsys, suffix, n):
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    out = folder / f"points{suffix}"
    args = ["sample", "--checkpoint", runs["ntm"], "--n", n, "--steps", 1, "--out", out]
    if isinstance(n, int) and n >= 1 and out.suffix.lower() in SAMPLE_FORMATS:
        run_cli(capsys, *args)
        assert files(folder) == {out}
        return
    error = fails(capsys, *args)
    assert "expected" in error or "error" in error
    assert not out.exists() and not any(p.name.startswith(".") for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- real processes
def test_real_processes_exit_cleanly(runs, tmp_path):
    def start(*args):
        command = [sys.executable, "-m", "trajflow", *map(str, args)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)  # fmt: skip

    out = tmp_path / "points.npy"
    processes = {
        "ok": start("sample", "--checkpoint", runs["ntm"], "--n", 10, "--out", out),
        "suffix": start("sample", "--checkpoint", runs["ntm"], "--out", tmp_path / "p.gif"),
        "missing": start("eval", "--checkpoint", tmp_path / "nowhere"),
        "flag": start("eval", "--checkpoint", runs["ntm"], "--n", "x"),
    }
    results = {name: (*p.communicate(timeout=300), p.returncode) for name, p in processes.items()}
    stdout, stderr, code = results["ok"]
    assert code == 0, stderr[-2000:]
    assert json.loads(stdout)["n"] == 10 and np.load(out).shape == (10, 2)
    for name, expected in (("suffix", ".gif"), ("missing", "nowhere"), ("flag", "'x'")):
        _, stderr, code = results[name]
        assert code == 2 and "Traceback" not in stderr and expected in stderr, stderr[-2000:]
    assert files(tmp_path) == {out}
