"""Evaluation: the verifier, compositional accuracy, Fréchet distance, ``eval``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg
from toy_configs import tiny_digits_t2i

from trajflow_t2i.check import PromptSpec
from trajflow_t2i.cli import main
from trajflow_t2i.data import PALETTE, Scene, ShapeObject, make_split, render
from trajflow_t2i.evaluate import (
    compositional_accuracy,
    digit_of_prompt,
    frechet_distance,
    gaussian_frechet_distance,
    run_eval,
    score_images,
)
from trajflow_t2i.model import TextToImage
from trajflow_t2i.presets import preset
from trajflow_t2i.verifier import (
    META_FILE,
    WEIGHTS_FILE,
    Verifier,
    load_verifier,
    scene_targets,
    train_verifier,
    verifier_for,
)
from trajflow_t2i.weights import export_model

# ------------------------------------------------------------------------------ the verifier


@pytest.fixture(scope="module")
def trained():
    """A shapes verifier on a reduced budget (a few seconds): enough to read most scenes."""
    return train_verifier("shapes", n_train=3000, steps=400, n_eval=200, noise=0.1, blur=0.0)


def test_verifier_reads_renders_and_held_out_combinations_alike(trained):
    _, report = trained
    test, heldout = report["test"], report["heldout"]
    assert test["exact"] >= 0.7 and heldout["exact"] >= 0.7, report
    # Attributes are read separately, so combinations never trained on read as well.
    for head in ("colour", "colour_b", "shape", "shape_b", "count", "relation", "layout"):
        assert test[head] >= 0.8 and heldout[head] >= test[head] - 0.1, (head, report)


def test_geometry_heads_are_blind_to_colour_and_colour_scores_shared_by_colours():
    torch.manual_seed(0)
    verifier = Verifier("shapes", 16, width=8).eval()
    scenes = make_split("shapes", "heldout", n=24, seed=3).scenes
    recoloured = [
        Scene(
            s.kind,
            tuple(
                ShapeObject(
                    o.shape,
                    list(PALETTE)[(list(PALETTE).index(o.colour) + 3) % 7],
                    o.centre,
                    o.size,
                    o.bbox,
                )
                for o in s.objects
            ),
            s.relation,
            s.count,
            s.image_size,
        )
        for s in scenes
    ]
    with torch.no_grad():
        _, before = verifier(render(scenes))
        _, after = verifier(render(recoloured))
    for head in ("count", "shape", "shape_b", "relation"):
        torch.testing.assert_close(before[head], after[head], rtol=0, atol=1e-6)
    assert before["shape"].std(dim=0).max() > 1e-4  # not blind to everything: shapes differ
    # Swapping two colours' rows of the pixel classifier swaps exactly their scores: every
    # colour is scored by the same weights, so no pair of colours is learnt as a unit.
    swapped = Verifier("shapes", 16, width=8).eval()
    swapped.load_state_dict(verifier.state_dict())
    last = swapped.pixel_colour[-1]
    with torch.no_grad():
        for parameter in (last.weight, last.bias):
            parameter[[1, 2]] = parameter[[2, 1]].clone()  # rows 1, 2: colours 0, 1
        _, mixed = swapped(render(scenes))
    for head in ("colour", "colour_b"):
        torch.testing.assert_close(mixed[head][:, [1, 0]], before[head][:, :2], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[head][:, 2:], before[head][:, 2:], atol=1e-5, rtol=0)


def test_scene_targets_use_the_canonical_order():
    a = ShapeObject("circle", "red", (12.5, 8.5), 5, (10, 6, 15, 11))
    b = ShapeObject("square", "blue", (4.5, 8.5), 5, (2, 6, 7, 11))
    right = Scene("relation", (a, b), "right of", 2, 16)  # red circle right of blue square
    left = Scene("relation", (b, a), "left of", 2, 16)  # the same picture, told the other way
    t_right, t_left = scene_targets([right]), scene_targets([left])
    assert {k: v.tolist() for k, v in t_right.items()} == {k: v.tolist() for k, v in t_left.items()}
    assert t_right["colour"].item() == list(PALETTE).index("blue")
    single = scene_targets([Scene("count", (a, a), None, 2, 16)])
    assert single["count"].item() == 1 and single["colour_b"].item() == -100
    with pytest.raises(TypeError, match="only shapes Scenes or only DigitScenes"):
        scene_targets([right, make_split("digits", "test", n=1).scenes[0]])


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, report = train_verifier("digits", steps=3, n_eval=10, width=4, features=8)
    assert torch.equal(state, torch.random.get_rng_state())
    second, _ = train_verifier("digits", steps=3, n_eval=10, width=4, features=8)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert report["steps"] == 3 and "digit" in report["test"]
    with pytest.raises(ValueError, match="steps >= 1"):
        train_verifier("digits", steps=0)
    with pytest.raises(ValueError, match="dataset in"):
        train_verifier("cifar")
    with pytest.raises(ValueError, match="blur <= 1"):
        train_verifier("digits", blur=2.0)


def test_save_load_round_trip_and_damaged_files(tmp_path):
    verifier, report = train_verifier("digits", steps=2, n_eval=10, width=4, features=8)
    verifier.save(tmp_path / "v", report)
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted([WEIGHTS_FILE, META_FILE])
    again, again_report = load_verifier(tmp_path / "v")
    images = make_split("digits", "test", n=16).images
    torch.testing.assert_close(again.embed(images), verifier.embed(images))
    assert again_report == json.loads(json.dumps(report))
    # verifier_for loads what is cached, and refuses a cache made for other images.
    cached, _ = verifier_for("digits", cache=tmp_path / "v")
    torch.testing.assert_close(cached.embed(images), verifier.embed(images))
    with pytest.raises(ValueError, match="reads digits at 8px"):
        verifier_for("shapes", 16, cache=tmp_path / "v")
    (tmp_path / "v" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_verifier(tmp_path / "v")
    (tmp_path / "v" / META_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_verifier(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_verifier(tmp_path / "missing")


def test_bad_images_are_refused_clearly():
    verifier = Verifier("digits", 8, width=4, features=8)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 8, 8\)"):
        verifier.embed(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="finite"):
        verifier.predict(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="image_size in"):
        Verifier("shapes", 8)


# ------------------------------------------------------------------------------ compositional


def test_categories_judge_what_they_say():
    prompts = [
        "a red circle",
        "two green squares",
        "a red circle left of a blue square",
        "there is a yellow diamond",
    ]
    exact = [
        ("count", "red", "circle", 1),
        ("count", "green", "square", 2),
        ("relation", ("red", "circle"), "left of", ("blue", "square")),
        ("count", "yellow", "diamond", 1),
    ]
    table = compositional_accuracy(exact, prompts)
    assert table["exact"] == {"accuracy": 1.0, "n": 4} and table["overall"] == 1.0
    assert {k: table[k]["n"] for k in ("single object", "colour", "count")} == {
        "single object": 2,
        "colour": 3,
        "count": 1,
    }
    wrong = [
        ("count", "blue", "circle", 1),  # right object, wrong colour
        ("count", "green", "square", 3),  # wrong number
        ("relation", ("blue", "square"), "left of", ("red", "circle")),  # places swapped
        ("count", "yellow", "circle", 1),  # right colour, wrong shape
    ]
    table = compositional_accuracy(wrong, prompts)
    assert table["single object"]["accuracy"] == 0.5 and table["colour"][
        "accuracy"
    ] == pytest.approx(1 / 3, abs=1e-4)
    assert table["count"]["accuracy"] == 0.0 and table["two objects"]["accuracy"] == 1.0
    assert table["position"]["accuracy"] == 0.0 and table["exact"]["accuracy"] == 0.0
    # "B right of A" is "A left of B"; spec objects are accepted too.
    mirrored = PromptSpec("relation", (("blue", "square"), ("red", "circle")), 1, "right of")
    assert compositional_accuracy(exact[2:3], [mirrored])["position"]["accuracy"] == 1.0
    assert compositional_accuracy([7, 3], ["a handwritten seven", "the number two"])["digit"] == {
        "accuracy": 0.5,
        "n": 2,
    }
    assert digit_of_prompt("a four, written by hand") == 4
    with pytest.raises(ValueError, match="one digit word"):
        digit_of_prompt("the digit")
    with pytest.raises(ValueError, match="readings but"):
        compositional_accuracy(exact, prompts[:2])


def test_verifier_scores_real_renders_high_and_mismatched_prompts_low(trained):
    verifier, _ = trained
    for split in ("test", "heldout"):
        data = make_split("shapes", split, n=96, seed=7)
        other = make_split("shapes", split, n=96, seed=8)
        report = score_images(verifier, data.images, data.captions, data.images, other.images)
        assert report["verifier"]["exact"]["accuracy"] >= 0.7, report["verifier"]
        assert report["verifier_chance"]["exact"]["accuracy"] <= 0.2
        assert report["rule_check"]["all"]["ok"] == 1.0  # renders pass the rule check
        assert report["rule_check_chance"]["all"]["ok"] <= 0.2
        # Renders of other captions are near in distribution; noise is far.
        noise = torch.rand(96, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        far = score_images(verifier, noise, data.captions, data.images)["frechet_distance"]
        assert report["frechet_distance"] == 0.0
        assert report["frechet_distance_real"] < 0.1 * far, (report, far)


# ------------------------------------------------------------------------------ Fréchet


def _random_covariance(rng, dims):
    a = rng.normal(size=(dims, dims))
    return a @ a.T / dims + 0.1 * np.eye(dims)


def test_gaussian_frechet_distance_matches_closed_forms():
    # Commuting (diagonal) covariances: Σ (√a - √b)² + |Δμ|².
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + 3.0
    got = gaussian_frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)
    # General covariances: tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½), the symmetric form.
    rng = np.random.default_rng(0)
    s1, s2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
    half = linalg.sqrtm(s1).real
    symmetric = np.trace(s1 + s2 - 2 * linalg.sqrtm(half @ s2 @ half).real)
    assert gaussian_frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(symmetric)


def test_sample_frechet_distance_estimates_the_gaussian_one():
    rng = np.random.default_rng(1)
    s1, s2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
    mu = np.array([0.5, 0.0, -0.5, 1.0])
    x = rng.multivariate_normal(np.zeros(4), s1, size=40_000)
    y = rng.multivariate_normal(mu, s2, size=40_000)
    expected = gaussian_frechet_distance(np.zeros(4), s1, mu, s2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0, abs=1e-6)
    # Fewer samples than dimensions: singular covariances still give a finite distance.
    few = frechet_distance(rng.normal(size=(5, 32)), rng.normal(size=(6, 32)))
    assert math.isfinite(few) and few >= 0
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((4, 2)))


# ------------------------------------------------------------------------------ run_eval and CLI


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    export_model(TextToImage.finetune(TextToImage(preset("tiny"), stage="fm")), folder / "m")
    verifier, report = train_verifier("shapes", n_train=128, steps=2, n_eval=8, width=4)
    verifier.save(folder / "verifier", report)
    return folder


def test_eval_command_writes_the_report(exported, tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            "--checkpoint",
            str(exported / "m"),
            "--out",
            str(out),
            "--n",
            "6",
            "--verifier",
            str(exported / "verifier"),
            "--bpd-images",
            "2",
        ]
    )
    report = json.loads(out.read_text())
    assert set(report["splits"]) == {"test", "heldout"}
    for part in report["splits"].values():
        assert {"verifier", "verifier_chance", "rule_check", "frechet_distance"} <= set(part)
        assert part["verifier"]["exact"]["n"] == 6
    assert report["bits_per_dim"]["images"] == 2
    assert "t0 = 0.001" in report["bits_per_dim"]["variable"]
    assert report["verifier"]["steps"] == 2  # the cached verifier's own report
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--checkpoint", "{tmp}/missing"], "cannot load"),
        (["--out", "{tmp}/no/such/eval.json"], "does not exist"),
        (["--out", "{tmp}/eval.txt"], ".json"),
        (["--n", "0"], "must be positive"),
        (["--cfg", "-1"], "--cfg"),
        (["--verifier", "{tmp}/file"], "must name a folder"),
    ],
)
def test_eval_command_errors_exit_2_without_output(exported, tmp_path, capsys, arguments, message):
    (tmp_path / "file").write_text("x")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    if "--checkpoint" not in arguments:
        arguments += ["--checkpoint", str(exported / "m")]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_eval_of_a_verifier_for_other_images_is_a_clear_error(exported, tmp_path, capsys):
    verifier, report = train_verifier("digits", steps=1, n_eval=4, width=4, features=8)
    verifier.save(tmp_path / "digits_verifier", report)
    with pytest.raises(SystemExit):
        main(
            [
                "eval",
                "--checkpoint",
                str(exported / "m"),
                "--n",
                "2",
                "--verifier",
                str(tmp_path / "digits_verifier"),
            ]
        )
    assert "reads digits at 8px" in capsys.readouterr().err


def test_run_eval_on_digits_fm_gives_the_ode_likelihood():
    torch.manual_seed(0)
    fm = TextToImage(tiny_digits_t2i(), stage="fm").eval()
    verifier, report = train_verifier("digits", steps=1, n_eval=4, width=4, features=8)
    result = run_eval(fm, n=5, verifier=verifier, verifier_report=report, bpd_images=2, ode_steps=2)
    assert list(result["splits"]) == ["test"] and "rule_check" not in result["splits"]["test"]
    assert result["splits"]["test"]["verifier"]["digit"]["n"] == 5
    assert "probability-flow ODE" in result["bits_per_dim"]["method"]
