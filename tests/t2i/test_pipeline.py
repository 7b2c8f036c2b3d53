"""Exported models, the pipeline, image grids and the ``trajflow-t2i`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trajflow_t2i import cli
from trajflow_t2i.model import TextToImage
from trajflow_t2i.pipeline import Pipeline, image_grid, save_png, to_uint8
from trajflow_t2i.presets import preset
from trajflow_t2i.weights import CONFIG_FILE, WEIGHTS_FILE, export_model, load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = TextToImage(preset("tiny"), stage="ntm")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("model")
    export_model(model, folder, extra={"note": "test"})
    return model, folder


def test_export_round_trip_keeps_weights_and_vocabulary(exported):
    model, folder = exported
    again = load_model(folder)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["stage"] == "ntm" and meta["extra"] == {"note": "test"}
    assert meta["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    # The vocabulary travels with the checkpoint, so a later change of the templates
    # cannot silently re-map the words of a shipped model.
    vocabulary = meta["config"]["model"]["text_encoder"]["kwargs"]["vocabulary"]
    assert vocabulary == model.text_encoder.vocabulary


def _damaged_copy(folder, tmp_path, damage):
    copy = tmp_path / "damaged"
    copy.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (copy / name).write_bytes((folder / name).read_bytes())
    damage(copy)
    return copy


def _flip_a_byte(folder):
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))


def _truncate(folder):
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda f: (f / CONFIG_FILE).unlink(), FileNotFoundError, "config.json not found"),
        (lambda f: (f / WEIGHTS_FILE).unlink(), FileNotFoundError, "model.safetensors not found"),
        (lambda f: (f / CONFIG_FILE).write_text("{not json"), ValueError, "not valid JSON"),
        (lambda f: (f / CONFIG_FILE).write_text('{"format": "x"}'), ValueError, "format"),
        (_flip_a_byte, ValueError, "sha256 differs"),
        (_truncate, ValueError, "corrupt"),
    ],
)
def test_damaged_exports_fail_naming_the_file(exported, tmp_path, damage, error, message):
    _, folder = exported
    damaged = _damaged_copy(folder, tmp_path, damage)
    with pytest.raises(error, match=message):
        load_model(damaged)


def test_pipeline_shapes_seeds_and_grid(exported):
    model, _ = exported
    pipe = Pipeline(model)
    images = pipe(["a red circle", "two blue squares"], n=2, steps=2, cfg=1.0, seed=5)
    assert images.shape == (2, 2, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(
        images, pipe(["a red circle", "two blue squares"], n=2, steps=2, cfg=1.0, seed=5)
    )
    assert not torch.equal(images, pipe(["a red circle", "two blue squares"], n=2, steps=2, seed=6))
    grid = image_grid(images, scale=2, gap=1)
    assert grid.shape == ((2 * 17 + 1) * 2, (2 * 17 + 1) * 2, 3)
    # The first image sits right after the gap, pixel-for-pixel (scaled by 2).
    first = images[0, 0].permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:34:2, 2:34:2], first)
    with pytest.raises(ValueError, match="positive integer"):
        pipe("a red circle", n=0)
    with pytest.raises(ValueError, match="uint8 images"):
        image_grid(images.float())


def test_to_uint8_inverts_the_data_mapping():
    levels = torch.arange(256, dtype=torch.uint8)
    centres = (2 * levels.float() + 1) / 256 - 1
    assert torch.equal(to_uint8(centres), levels)


def test_save_png_is_atomic_and_checks_the_path(tmp_path):
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    out = save_png(array, tmp_path / "x.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"\.png"):
        save_png(array, tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_png(array, tmp_path / "missing" / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_cli_sample_writes_a_grid(exported, tmp_path, capsys):
    _, folder = exported
    out = tmp_path / "grid.png"
    cli.main(
        [
            "sample",
            "a red circle",
            "a blue square left of a red circle",
            "--n",
            "3",
            "--steps",
            "2",
            "--checkpoint",
            str(folder),
            "--out",
            str(out),
        ]
    )
    assert out.is_file() and "2 prompt(s) × 3 image(s)" in capsys.readouterr().out
    from PIL import Image

    width, height = Image.open(out).size
    assert (width, height) == ((3 * 17 + 1) * 4, (2 * 17 + 1) * 4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "a red zebra"], "bad prompt: .*zebra"),
        (["sample", "   "], "bad prompt"),
        (["sample", " ".join(["red"] * 40)], "bad prompt"),
        (["sample", "a red circle", "--n", "0"], "--n and --steps must be positive"),
        (["sample", "a red circle", "--cfg", "-2"], "--cfg must be a weight >= 0"),
        (["sample", "a red circle", "--checkpoint", "/nonexistent"], "cannot load /nonexistent"),
    ],
)
def test_cli_bad_input_exits_2_without_output(exported, tmp_path, capsys, argv, message):
    _, folder = exported
    out = tmp_path / "grid.png"
    if "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", str(folder)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("trajflow-t2i sample: error:") and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_other_suffixes_and_missing_folders(exported, tmp_path, capsys):
    _, folder = exported
    for out, message in [
        (tmp_path / "x.jpg", "must name a .png"),
        (tmp_path / "no" / "x.png", "does not exist"),
    ]:
        with pytest.raises(SystemExit):
            cli.main(["sample", "a red circle", "--checkpoint", str(folder), "--out", str(out)])
        assert message in capsys.readouterr().err


def test_cli_info_lists_presets_and_reads_a_checkpoint(exported, capsys):
    _, folder = exported
    cli.main(["info", "--presets"])
    table = capsys.readouterr().out
    for name in ("tiny", "small", "base", "paper"):
        assert f"\n{name} " in table
    cli.main(["info", "--checkpoint", str(folder)])
    meta = json.loads(capsys.readouterr().out)
    assert meta["config"]["name"] == "tiny" and meta["stage"] == "ntm"


def test_console_script_runs_in_a_subprocess(exported, tmp_path):
    _, folder = exported
    out = tmp_path / "x.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trajflow_t2i.cli",
            "sample",
            "a red circle",
            "--n",
            "2",
            "--steps",
            "2",
            "--checkpoint",
            str(folder),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
