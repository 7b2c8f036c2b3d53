"""Checkpoints under damage and crashes: errors that name the file, atomic writes, kill and
resume, and keeping the last K."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from toy_configs import tiny_ntm

from trajflow.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_config,
)
from trajflow.train import TrainConfig, train

# Subprocesses run on one thread: the same kernels in every run, so results can be bitwise equal.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fast(**overrides) -> TrainConfig:
    settings = {"iterations": 4, "batch_size": 32, "lr": 3e-3, "warmup_steps": 1}
    return TrainConfig(**{**settings, **overrides})


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run folder with checkpoints after steps 2 and 4 (model, EMA, optimizer, RNG)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    config = fast(ema_decay=0.5, checkpoint_every=2, out_dir=str(run))
    train(model_config=tiny_ntm(), config=config, progress=False)
    assert names(run) == ["step_00000002", "step_00000004"]
    return run


def damaged_copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "run"))


def flip(file: Path, position: int, mask: int = 0xFF) -> None:
    data = bytearray(file.read_bytes())
    data[position % len(data)] ^= mask
    file.write_bytes(bytes(data))


def edit_config(file: Path, change) -> None:
    file.write_text(json.dumps(change(json.loads(file.read_text())), indent=2))


def same(a, b) -> bool:
    """Nested dicts / lists of JSON values and tensors, compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN == NaN here


def loaded(folder: Path):
    model, state = load_checkpoint(folder)
    return model.state_dict(), vars(state)


# ----------------------------------------------------------------------------- damage
def cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def wrong_weights_checksum(file: Path) -> None:
    file.write_text(re.sub(r'("weights.safetensors": ")[0-9a-f]', r"\g<1>z", file.read_text()))


DAMAGES = {
    # name: (file at fault, how to damage it)
    "weights cut short": (WEIGHTS_FILE, cut),
    "weights empty": (WEIGHTS_FILE, lambda f: f.write_bytes(b"")),
    "weights byte flipped in the data": (WEIGHTS_FILE, lambda f: flip(f, -5, 0x01)),
    "weights header garbled": (WEIGHTS_FILE, lambda f: flip(f, 12)),
    "config cut short": (CONFIG_FILE, cut),
    "config not UTF-8": (CONFIG_FILE, lambda f: f.write_bytes(b"\xff\xfe\x00{")),
    "config a list": (CONFIG_FILE, lambda f: f.write_text("[1, 2]")),
    "config value changed": (CONFIG_FILE, lambda f: edit_config(f, lambda c: {**c, "step": 3})),
    "config checksums removed": (
        CONFIG_FILE,
        lambda f: edit_config(f, lambda c: {k: v for k, v in c.items() if k != "checksums"}),
    ),
    "config weights checksum wrong": (CONFIG_FILE, wrong_weights_checksum),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_fails_naming_the_file(saved, tmp_path, damage):
    run = damaged_copy(saved, tmp_path)
    name, apply = DAMAGES[damage]
    apply(run / "step_00000004" / name)
    with pytest.raises(CheckpointError, match=re.escape(str(run / "step_00000004" / name))):
        load_checkpoint(run / "step_00000004")
    load_checkpoint(run / "step_00000002")  # the other checkpoint is fine


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_a_missing_file_is_named(saved, tmp_path, name):
    run = damaged_copy(saved, tmp_path)
    (run / "step_00000004" / name).unlink()
    # The incomplete newest checkpoint is still the one to resume from: never a silent step back.
    assert latest_checkpoint(run) == run / "step_00000004"
    for read in (load_checkpoint, read_checkpoint_config):
        with pytest.raises(FileNotFoundError, match=re.escape(str(run / "step_00000004" / name))):
            read(run / "step_00000004")


@pytest.mark.parametrize("damage", ["weights cut short", "config value changed", "no config"])
def test_resuming_from_a_damaged_newest_checkpoint_fails_and_writes_nothing(
    saved, tmp_path, damage
):
    run = damaged_copy(saved, tmp_path)
    newest = run / "step_00000004"
    if damage == "no config":
        (newest / CONFIG_FILE).unlink()
        error, file = FileNotFoundError, newest / CONFIG_FILE
    else:
        name, apply = DAMAGES[damage]
        apply(newest / name)
        error, file = CheckpointError, newest / name
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    config = fast(iterations=6, ema_decay=0.5, checkpoint_every=2, out_dir=str(run))
    with pytest.raises(error, match=re.escape(str(file))):
        train(config=config, resume=run, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from([CONFIG_FILE, WEIGHTS_FILE]),
    where=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_a_flipped_byte_is_caught_or_harmless(saved, name, where, mask):
    """Any one changed byte anywhere: a CheckpointError, or exactly the saved state loads."""
    original = loaded(saved / "step_00000004")
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(shutil.copytree(saved / "step_00000004", Path(folder) / "step_00000004"))
        size = (copy / name).stat().st_size
        flip(copy / name, int(where * size), mask)
        try:
            result = loaded(copy)
        except CheckpointError as error:
            assert str(copy / name) in str(error)
        else:  # e.g. a newline turned into a space: the same JSON
            assert name == CONFIG_FILE and same(result, original)


def test_checkpoints_of_version_1_still_load(saved, tmp_path):
    run = damaged_copy(saved, tmp_path)
    edit_config(
        run / "step_00000004" / CONFIG_FILE,
        lambda c: {**{k: v for k, v in c.items() if k != "checksums"}, "version": 1},
    )
    assert same(loaded(run / "step_00000004"), loaded(saved / "step_00000004"))
    edit_config(run / "step_00000004" / CONFIG_FILE, lambda c: {**c, "version": 7})
    with pytest.raises(
        CheckpointError, match="version 1 or 2, got 'trajflow-checkpoint' version 7"
    ):
        load_checkpoint(run / "step_00000004")


# ----------------------------------------------------------------------------- crashes
KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import safetensors.torch
    from trajflow.checkpoint import save_checkpoint
    from trajflow.config import ModelConfig

    run, stage = Path(sys.argv[1]), sys.argv[2]
    config = ModelConfig.model_validate_json(sys.argv[3])
    model = config.build()
    save_checkpoint(run / "step_00000001", model, config, step=1)

    def die(*args, **kwargs):
        if stage == "weights":  # half a file on disk, then the process dies
            Path(args[1]).write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "weights":
        safetensors.torch.save_file = die
    else:  # everything written and synced, killed just before the rename
        os.replace = die
    save_checkpoint(run / "step_00000002", model, config, step=2)
    """
)


@pytest.mark.parametrize("stage", ["weights", "rename"])
def test_a_save_killed_midway_leaves_no_checkpoint_that_looks_complete(tmp_path, stage):
    command = [
        sys.executable,
        "-c",
        KILLED_SAVE,
        str(tmp_path),
        stage,
        tiny_ntm().model_dump_json(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    visible = [name for name in names(tmp_path) if not name.startswith(".")]
    assert visible == ["step_00000001"]
    assert any(name.startswith(".step_00000002.tmp-") for name in names(tmp_path))
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert load_checkpoint(tmp_path / "step_00000001")[1].step == 1
    # The next successful save cleans the leftovers up.
    prune_checkpoints(tmp_path, keep_last=None, step=2)
    assert names(tmp_path) == ["step_00000001"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "trajflow", "train", *args]


def test_training_killed_with_sigkill_resumes_to_the_same_parameters(tmp_path):
    model_json = tmp_path / "model.json"
    model_json.write_text(tiny_ntm().model_dump_json())
    train_json = tmp_path / "train.json"
    settings = {"iterations": 200, "batch_size": 32, "warmup_steps": 5, "ema_decay": 0.9,
                "checkpoint_every": 20, "keep_last": 3, "log_every": 5}  # fmt: skip
    train_json.write_text(json.dumps(settings))
    common = ["--config", str(model_json), "--train-config", str(train_json), "--eval-samples", "0"]
    whole_dir, run_dir = tmp_path / "whole", tmp_path / "run"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": ENV}
    # The uninterrupted run shows progress into a pipe: plain lines, no carriage returns.
    whole = subprocess.Popen(cli(*common, "--out", str(whole_dir)), **pipes)
    killed = subprocess.Popen(cli(*common, "--out", str(run_dir), "--no-progress"), **pipes)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(run_dir) is None and killed.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
        _, whole_err = whole.communicate(timeout=300)
    finally:
        for process in (whole, killed):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert whole.returncode == 0, whole_err[-3000:]
    reached = latest_checkpoint(run_dir)
    assert reached is not None and load_checkpoint(reached)[1].step < 200
    for checkpoint in run_dir.glob("step_*"):  # whatever the kill interrupted, nothing is torn
        load_checkpoint(checkpoint)

    resumed = subprocess.run(
        cli("--resume", str(run_dir), "--no-progress", "--eval-samples", "0"),
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = "step_00000200"
    assert json.loads(resumed.stdout)["checkpoint"] == str(run_dir / final)
    expected = safetensors.torch.load_file(whole_dir / final / WEIGHTS_FILE)
    got = safetensors.torch.load_file(run_dir / final / WEIGHTS_FILE)
    assert expected.keys() == got.keys() and any(key.startswith("ema/") for key in got)
    for key in expected:  # model, EMA and optimizer moments: bitwise
        assert torch.equal(expected[key], got[key]), key
    assert names(run_dir) == ["step_00000160", "step_00000180", final, "train_report.json"]

    assert "\r" not in whole_err
    lines = whole_err.splitlines()
    assert 10 <= len(lines) <= 12, whole_err
    assert lines[-1].startswith("train NTM: 200/200 (100%)")


# ----------------------------------------------------------------------------- keep_last
def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    with pytest.raises(ValidationError, match="keep_last"):
        TrainConfig(keep_last=0)
    (tmp_path / ".step_00000001.tmp-leftover").mkdir()  # from a save killed earlier
    config = fast(iterations=9, checkpoint_every=2, keep_last=2, out_dir=str(tmp_path))
    result = train(model_config=tiny_ntm(), config=config, progress=False)
    assert [p.name for p in result.checkpoints] == [f"step_0000000{i}" for i in (2, 4, 6, 8, 9)]
    assert names(tmp_path) == ["step_00000008", "step_00000009"]

    everything = tmp_path / "all"
    config = config.model_copy(update={"keep_last": None, "out_dir": str(everything)})
    train(model_config=tiny_ntm(), config=config, progress=False)
    assert names(everything) == [f"step_0000000{i}" for i in (2, 4, 6, 8, 9)]

    # Resumed from step 4 with keep_last=1: step 6 replaces 4; the later checkpoints of the
    # earlier run are not this run's to delete.
    config = config.model_copy(update={"iterations": 6, "keep_last": 1})
    train(config=config, resume=everything / "step_00000004", progress=False)
    assert names(everything) == ["step_00000006", "step_00000008", "step_00000009"]
