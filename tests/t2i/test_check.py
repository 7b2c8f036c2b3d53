"""The rule-based prompt-following check: exact on clean renders, low on mismatched ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trajflow_t2i.check import (
    CheckResult,
    PromptSpec,
    accuracy,
    chance_accuracy,
    check_images,
    find_blobs,
    parse_prompt,
    spec_of,
)
from trajflow_t2i.data import PALETTE, Scene, ShapeObject, make_split, render, to_float


@pytest.fixture(scope="module", params=[16, 32])
def renders(request):
    train = make_split("shapes", "train", n=300, seed=11, size=request.param)
    heldout = make_split("shapes", "heldout", n=150, seed=11, size=request.param)
    images = torch.cat([train.images, heldout.images])
    return images, [*train.captions, *heldout.captions], [*train.scenes, *heldout.scenes]


def _kinds(scenes):
    return [scene.kind for scene in scenes]


def test_clean_renders_pass_every_check(renders):
    images, captions, scenes = renders
    for prompts in (captions, scenes):
        table = accuracy(check_images(images, prompts), _kinds(scenes))
        for kind in ("single", "count", "relation", "all"):
            row = table[kind]
            assert row["ok"] == row["colour"] == row["count"] == row["shape"] == 1.0, kind
        assert table["relation"]["position"] == 1.0 and "position" not in table["count"]
    # Float images in [-1, 1] (what a sampler returns) are judged the same.
    assert check_images(to_float(images), captions) == check_images(images, captions)


def test_mismatched_prompts_score_low_and_give_the_chance_level(renders):
    images, _, scenes = renders
    chance = chance_accuracy(images, scenes, _kinds(scenes), torch.Generator().manual_seed(0))
    assert chance["all"]["ok"] < 0.2
    assert chance["relation"]["position"] < 0.2  # wrong colours, or right colours wrong place
    assert chance["single"]["colour"] < 0.4 and chance["count"]["count"] < 0.3
    assert chance["all"]["n"] == len(scenes)
    # The chance level of position alone, given the right colours: the same images judged
    # against their own objects in a random relation.
    relations = [s for s in scenes if s.kind == "relation"]
    index = [i for i, s in enumerate(scenes) if s.kind == "relation"]
    wrong = [
        PromptSpec("relation", spec_of(s).objects, 1, rel)
        for s, rel in zip(relations, ["left of", "right of", "above", "below"] * 200, strict=False)
    ]
    position = [r.position_ok for r in check_images(images[index], wrong)]
    truth = [spec_of(s).relation == w.relation for s, w in zip(relations, wrong, strict=True)]
    assert position == truth  # right exactly when the random relation is the true one


def _scene(objects, kind, relation=None, size=16):
    objs = tuple(
        ShapeObject(shape, colour, (x + s / 2, y + s / 2), s, (x, y, x + s, y + s))
        for shape, colour, x, y, s in objects
    )
    return Scene(kind, objs, relation, len(objs), size)


def test_each_attribute_fails_alone():
    three = _scene(
        [("circle", "red", 1, 1, 5), ("circle", "red", 9, 1, 5), ("circle", "red", 1, 9, 5)],
        "count",
    )
    image = render([three])[0]
    assert check_images(image, "three red circles")[0] == CheckResult(True, True, None, True)
    missing = image.clone()
    missing[:, 9:14, 1:6] = 0  # erase one circle
    assert check_images(missing, "three red circles")[0] == CheckResult(True, False, None, True)
    assert check_images(image, "three blue circles")[0] == CheckResult(False, False, None, False)
    assert check_images(image, "three red squares")[0] == CheckResult(True, True, None, False)
    extra = image.clone()
    extra[:, 10:15, 10:15] = torch.tensor(PALETTE["green"])[:, None, None]
    assert not check_images(extra, "three red circles")[0].count_ok  # an object nobody asked for

    pair = _scene(
        [("square", "blue", 1, 5, 5), ("triangle", "yellow", 9, 6, 6)], "relation", "left of"
    )
    image = render([pair])[0]
    good = [
        "a blue square left of a yellow triangle",
        "a yellow triangle to the right of a blue square",
    ]
    for prompt in good:
        assert check_images(image, prompt)[0] == CheckResult(True, True, True, True)
    for prompt in (
        "a blue square right of a yellow triangle",
        "a blue square above a yellow triangle",
    ):
        assert check_images(image, prompt)[0] == CheckResult(True, True, False, True)
    assert not check_images(image.flip(-1), good[0])[0].position_ok  # mirrored scene


def test_specks_and_colour_noise_are_tolerated():
    scene = _scene(
        [("diamond", "orange", 2, 2, 7), ("circle", "purple", 4, 18, 10)], "relation", "above", 32
    )
    image = render([scene])[0]
    noisy = image.float() + 12 * torch.randn(
        image.shape, generator=torch.Generator().manual_seed(0)
    )
    noisy = noisy.clamp(0, 255).round().to(torch.uint8)
    noisy[:, 30, 0] = torch.tensor(PALETTE["white"])  # a one-pixel speck
    noisy[:, 0, 30:32] = torch.tensor(PALETTE["green"])[:, None]  # a two-pixel speck
    assert check_images(noisy, "an orange diamond above a purple circle")[0].ok
    assert check_images(noisy, "an orange diamond above a purple circle")[0].shape_ok


def test_blobs_measure_the_objects():
    scene = _scene(
        [("square", "white", 3, 4, 6), ("triangle", "green", 20, 4, 9)], "relation", "left of", 32
    )
    blobs = find_blobs(render([scene]))[0]
    # Largest first; the 9-pixel triangle's rows are 1, 3, 3, 5, 5, 7, 7, 9, 9 pixels wide.
    assert [(b.colour, b.shape, b.pixels) for b in blobs] == [
        ("green", "triangle", 49),
        ("white", "square", 36),
    ]
    square = next(b for b in blobs if b.colour == "white")
    assert square.pixels == 36 and square.centroid == (6.0, 7.0) and square.bbox == (3, 4, 9, 10)
    # Two touching same-colour squares (diagonally) are one blob: 8-connectivity.
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, 2:6, 2:6] = torch.tensor(PALETTE["red"])[:, None, None]
    image[:, 6:10, 6:10] = torch.tensor(PALETTE["red"])[:, None, None]
    image[:, 2:6, 6:10] = torch.tensor(PALETTE["blue"])[:, None, None]  # touches both, other colour
    blobs = find_blobs(image)[0]
    assert sorted((b.colour, b.pixels) for b in blobs) == [("blue", 16), ("red", 32)]


def test_parse_prompt_meanings():
    same = [
        ("a red circle", "one red circle"),
        ("there is an orange square", "exactly one orange square"),
        ("a red circle left of a blue square", "a blue square to the right of a red circle"),
        ("a red circle above a blue square", "there is a blue square beneath a red circle"),
    ]
    for a, b in same:
        assert parse_prompt(a).canonical() == parse_prompt(b).canonical(), (a, b)
    different = [
        ("a red circle left of a blue square", "a red circle right of a blue square"),
        ("two red circles", "three red circles"),
        ("a red circle above a blue square", "a blue circle above a red square"),
    ]
    for a, b in different:
        assert parse_prompt(a).canonical() != parse_prompt(b).canonical(), (a, b)
    assert parse_prompt("Two GREEN triangles!") == PromptSpec("count", (("green", "triangle"),), 2)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ("a red circel", "circle"),
        ("a red cat", "unknown word 'cat'"),
        ("red circles", "how many"),
        ("two red circle", "disagree"),
        ("a red blue circle", "one colour"),
        ("two red circles left of a blue square", "single objects"),
        ("a red circle left of a blue square above a green diamond", "at most one relation"),
    ],
)
def test_parse_prompt_errors_say_what_is_wrong(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_bad_inputs():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="RGB"):
        check_images(torch.zeros(1, 16, 16, dtype=torch.uint8), "a red circle")
    with pytest.raises(TypeError, match="uint8 or float"):
        check_images(image.long(), "a red circle")
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        check_images(image, ["a red circle", "a blue square"])
    with pytest.raises(TypeError, match="prompt str"):
        check_images(image, [3])
    with pytest.raises(ValueError, match="kinds"):
        accuracy([CheckResult(True, True, None, True)], [])


def test_accuracy_table():
    results = [
        CheckResult(True, True, None, True),
        CheckResult(True, False, None, False),
        CheckResult(True, True, False, True),
        CheckResult(False, False, False, False),
    ]
    table = accuracy(results, ["single", "count", "relation", "relation"])
    assert table["relation"] == {
        "colour": 0.5,
        "count": 0.5,
        "position": 0.0,
        "shape": 0.5,
        "ok": 0.0,
        "n": 2,
    }
    assert table["all"]["ok"] == 0.25 and table["all"]["position"] == 0.0
    assert list(table) == ["count", "relation", "single", "all"]


def test_components_match_scipy_on_random_images():
    ndimage = pytest.importorskip("scipy.ndimage")
    generator = torch.Generator().manual_seed(5)
    # Sparse random pixels of three palette colours: many blobs, long diagonal chains.
    choice = torch.randint(0, 8, (6, 24, 24), generator=generator)
    palette = torch.tensor([(0, 0, 0), PALETTE["red"], PALETTE["blue"], PALETTE["white"]])
    images = palette[torch.where(choice < 4, choice, 0)].permute(0, 3, 1, 2).to(torch.uint8)
    blobs = find_blobs(images, min_pixels=1)
    for image, found in zip(images, blobs, strict=True):
        expected = []
        for name in ("red", "blue", "white"):
            mask = (image == torch.tensor(PALETTE[name])[:, None, None]).all(dim=0).numpy()
            labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for k in range(1, count + 1):
                rows, cols = np.nonzero(labels == k)
                expected.append((name, len(rows), cols.mean() + 0.5, rows.mean() + 0.5))
        got = [(b.colour, b.pixels, *b.centroid) for b in found]
        assert len(got) == len(expected) > 20
        for a, b in zip(sorted(got), sorted(expected), strict=True):
            assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-9)


def test_colours_far_from_the_palette_are_background():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, 2:8, 2:8] = 128  # grey: about 200 from black, white and every colour
    image[:, 9:15, 9:15] = torch.tensor([235, 235, 190])[:, None, None]  # off-white, 45 away
    blobs = find_blobs(image)[0]
    assert [(b.colour, b.pixels) for b in blobs] == [("white", 36)]
    assert find_blobs(image, max_distance=30.0)[0] == []
