"""Captioned datasets: determinism, held-out guarantee, scene ground truth, captions, digits."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trajflow_t2i.check import parse_prompt, spec_of
from trajflow_t2i.data import (
    COLOURS,
    DIGIT_WORDS,
    HELDOUT_COLOUR_PAIRS,
    HELDOUT_PAIRS,
    KINDS,
    OBJECT_SIZES,
    PALETTE,
    RELATIONS,
    SHAPES,
    T2I_DATASETS,
    CaptionedImages,
    Scene,
    ShapeObject,
    dequantize,
    heldout_combinations,
    make_split,
    paraphrases,
    render,
    split_words,
    to_float,
    to_uint8,
    vocabulary,
)

# The issue fixes these values; the test restates them rather than reading them back.
EXPECTED_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}


@pytest.fixture(scope="module", params=[16, 32])
def train(request) -> CaptionedImages:
    return make_split("shapes", "train", n=1500, seed=3, size=request.param)


@pytest.fixture(scope="module")
def heldout() -> CaptionedImages:
    return make_split("shapes", "heldout", n=600, seed=3, size=16)


def test_palette_is_exact_and_images_use_only_it(train):
    assert PALETTE == EXPECTED_PALETTE
    rgb = train.images.long()
    codes = (rgb[:, 0] * 256 + rgb[:, 1]) * 256 + rgb[:, 2]
    allowed = {(r * 256 + g) * 256 + b for r, g, b in [(0, 0, 0), *EXPECTED_PALETTE.values()]}
    assert set(codes.unique().tolist()) == allowed


def test_same_seed_same_images_other_seed_or_split_other_images():
    a = make_split("shapes", "train", n=200, seed=7, size=16)
    b = make_split("shapes", "train", n=200, seed=7, size=16)
    assert (a.images == b.images).all() and a.captions == b.captions and a.scenes == b.scenes
    # Item i depends only on (seed, split, i): a shorter draw is a prefix of a longer one.
    prefix = make_split("shapes", "train", n=50, seed=7, size=16)
    assert (prefix.images == a.images[:50]).all() and prefix.scenes == a.scenes[:50]
    for other in (
        make_split("shapes", "train", n=200, seed=8, size=16),
        make_split("shapes", "test", n=200, seed=7, size=16),
    ):
        same = (other.images == a.images).flatten(1).all(dim=1).float().mean()
        assert same < 0.1


def _pairs(scene):
    return {(o.colour, o.shape) for o in scene.objects}


def test_train_and_test_never_contain_heldout_combinations(train):
    test = make_split("shapes", "test", n=1500, seed=3, size=train.scenes[0].image_size)
    for scene in [*train.scenes, *test.scenes]:
        assert not _pairs(scene) & HELDOUT_PAIRS, scene
        if scene.kind == "relation":
            assert frozenset(o.colour for o in scene.objects) not in HELDOUT_COLOUR_PAIRS
    # Everything else stays: every colour, shape and non-held-out pair appears in training.
    seen = set().union(*(_pairs(s) for s in train.scenes))
    assert seen == set(itertools.product(COLOURS, SHAPES)) - HELDOUT_PAIRS


def test_heldout_split_holds_only_and_all_heldout_combinations(heldout):
    found = Counter()
    for scene in heldout.scenes:
        pairs = _pairs(scene) & HELDOUT_PAIRS
        colours = frozenset(o.colour for o in scene.objects)
        colour_pair = scene.kind == "relation" and colours in HELDOUT_COLOUR_PAIRS
        assert pairs or colour_pair, scene
        assert heldout_combinations(scene)
        found.update(pairs)
        found[colours] += colour_pair
    assert set(HELDOUT_PAIRS) | set(HELDOUT_COLOUR_PAIRS) <= {k for k, v in found.items() if v}
    assert set(Counter(s.kind for s in heldout.scenes)) == set(KINDS)


def test_kinds_counts_relations_and_sizes_are_all_drawn(train):
    size = train.scenes[0].image_size
    kinds = Counter(s.kind for s in train.scenes)
    # Equally likely kinds (the held-out rejection must not favour any): 1/3 ± 3 sd.
    assert set(kinds) == set(KINDS) and min(kinds.values()) > 0.3 * len(train)
    assert {s.count for s in train.scenes if s.kind == "count"} == {1, 2, 3}
    assert {s.relation for s in train.scenes if s.kind == "relation"} == set(RELATIONS)
    sizes = {o.size for s in train.scenes for o in s.objects}
    low, high = OBJECT_SIZES[size]
    assert sizes == set(range(low, high + 1))


def test_scene_ground_truth_matches_the_pixels(train):
    for image, scene in zip(train.images[:300], train.scenes[:300], strict=True):
        assert scene.count == len(scene.objects)
        assert (1 if scene.kind == "single" else 2 if scene.kind == "relation" else 0) in (
            0,
            scene.count,
        )
        covered = torch.zeros(image.shape[1:], dtype=torch.bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= scene.image_size and 0 <= y0 < y1 <= scene.image_size
            assert x1 - x0 == y1 - y0 == obj.size
            assert obj.centre == ((x0 + x1) / 2, (y0 + y1) / 2)
            patch = image[:, y0:y1, x0:x1]
            coloured = (patch == torch.tensor(PALETTE[obj.colour])[:, None, None]).all(dim=0)
            # Crisp: a sizeable part of the box in the object's colour, the rest black.
            assert coloured.float().mean() >= 0.5
            assert (patch[:, ~coloured] == 0).all()
            covered[y0:y1, x0:x1] = True
        assert (image[:, ~covered] == 0).all()  # nothing outside the objects
        # Non-overlapping, with a background pixel between any two boxes.
        for a, b in itertools.combinations(scene.objects, 2):
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


@pytest.mark.parametrize("size", [5, 6, 7, 9, 14])
def test_shapes_look_like_their_names(size):
    masks = {}
    for shape in SHAPES:
        obj = ShapeObject(shape, "white", (size / 2, size / 2), size, (0, 0, size, size))
        masks[shape] = render([Scene("single", (obj,), None, 1, 16 if size < 9 else 32)])[
            0, 0, :size, :size
        ].bool()
    square, circle, triangle, diamond = (
        masks[s] for s in ("square", "circle", "triangle", "diamond")
    )
    assert square.all()
    for mask in (circle, diamond):  # symmetric, corners empty, full middle row and column
        assert torch.equal(mask, mask.flip(0)) and torch.equal(mask, mask.flip(1))
        assert torch.equal(mask, mask.T) and not mask[0, 0] and not mask[-1, -1]
        assert mask[size // 2].all() and mask[:, size // 2].all()
    assert circle.sum() > diamond.sum()
    # Apex up: a narrow top row, a full bottom row, rows never narrower going down.
    widths = triangle.sum(dim=1)
    assert widths[0] <= 2 and widths[-1] == size and (widths.diff() >= 0).all()
    assert torch.equal(triangle, triangle.flip(1))


def test_relations_are_unambiguous(train):
    axes = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
    for scene in train.scenes:
        if scene.kind != "relation":
            continue
        first, second = scene.objects
        assert first.colour != second.colour
        axis, sign = axes[scene.relation]
        along = sign * (second.centre[axis] - first.centre[axis])
        across = abs(second.centre[1 - axis] - first.centre[1 - axis])
        assert along > 0 and across <= along / 2
        if sign > 0:  # the boxes are apart along the axis
            assert first.bbox[axis + 2] < second.bbox[axis]
        else:
            assert second.bbox[axis + 2] < first.bbox[axis]


def test_captions_are_paraphrases_that_parse_to_the_scene(train):
    templates = Counter()
    for caption, scene in zip(train.captions, train.scenes, strict=True):
        assert caption in paraphrases(scene)
        templates[scene.kind, paraphrases(scene).index(caption)] += 1
        for paraphrase in paraphrases(scene):
            assert parse_prompt(paraphrase).canonical() == spec_of(scene).canonical(), paraphrase
    for kind in KINDS:  # several templates in use for every kind
        assert sum(1 for k, _ in templates if k == kind) >= 4


def test_articles_and_plurals():
    data = make_split("shapes", "train", n=400, seed=0, size=16)
    for caption in data.captions:
        words = split_words(caption)
        for before, after in itertools.pairwise(words):
            if before in ("a", "an"):
                assert (before == "an") == (after[0] in "aeiou"), caption
        if any(w in ("two", "three") for w in words):
            assert any(w.endswith("s") and w[:-1] in SHAPES for w in words), caption


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    assert vocabulary() == sorted(words)
    for name, split in (("shapes", "train"), ("shapes", "heldout"), ("digits", "test")):
        for caption in make_split(name, split, n=200 if name == "shapes" else None).captions:
            assert set(split_words(caption)) <= words, caption
    assert {*COLOURS, *SHAPES, *DIGIT_WORDS, "left", "above", "below", "right"} <= words


def test_levels_mapping_and_dequantisation():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_float(levels)
    assert torch.allclose(x.double(), (2 * levels.double() + 1) / 256 - 1, atol=1e-6)
    assert (to_uint8(x) == levels).all()
    k = torch.randint(0, 17, (20000,), generator=torch.Generator().manual_seed(0))
    u = dequantize(k, torch.Generator().manual_seed(1), levels=17)
    assert u.dtype == torch.float32 and u.min() >= -1 and u.max() < 1
    assert (to_uint8(u, levels=17) == k).all()  # each sample stays in its level's cell
    residual = (u + 1) * 17 / 2 - k  # = u ~ U[0, 1)
    assert abs(residual.mean() - 0.5) < 0.01 and abs(residual.var() - 1 / 12) < 0.005
    again = dequantize(k, torch.Generator().manual_seed(1), levels=17)
    assert torch.equal(u, again)  # same call, same seed, same machine
    with pytest.raises(ValueError, match="levels k in"):
        dequantize(torch.tensor([17]), levels=17)
    with pytest.raises(TypeError, match="integer levels"):
        dequantize(torch.rand(3))
    with pytest.raises(ValueError, match="levels"):
        to_float(levels, levels=1)


def test_dataset_items_and_loader(train):
    image, caption, scene = train[5]
    assert image.dtype == torch.float32 and image.shape == train.images.shape[1:]
    assert torch.allclose(image, to_float(train.images[5]))
    assert image.min() > -1 and image.max() < 1
    assert caption == train.captions[5] and scene is train.scenes[5]
    loader = DataLoader(train, batch_size=8, collate_fn=CaptionedImages.collate)
    images, captions, scenes = next(iter(loader))
    assert images.shape == (8, *train.images.shape[1:]) and len(captions) == len(scenes) == 8


def test_digits_split_levels_and_captions():
    from sklearn.datasets import load_digits

    reference = load_digits()
    train, test = make_split("digits", "train"), make_split("digits", "test")
    assert len(train) == 1500 and len(test) == 297 and train.levels == test.levels == 17
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    both = torch.cat([train.images, test.images])[:, 0].numpy()
    assert np.array_equal(both, reference.images.astype(np.uint8))
    assert int(both.max()) == 16
    labels = [s.label for s in [*train.scenes, *test.scenes]]
    assert labels == reference.target.tolist()
    for caption, scene in zip(test.captions, test.scenes, strict=True):
        assert DIGIT_WORDS[scene.label] in split_words(caption) and caption in paraphrases(scene)
    assert len(set(test.captions)) > 20
    assert (make_split("digits", "test", n=10).images == test.images[:10]).all()


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match="shapes"):
        make_split("cifar", "train")
    with pytest.raises(ValueError, match="split"):
        make_split("shapes", "validation", n=4)
    with pytest.raises(ValueError, match="size"):
        make_split("shapes", "train", n=4, size=24)
    with pytest.raises(ValueError, match="positive integer n"):
        make_split("shapes", "train", n=0)
    with pytest.raises(ValueError, match="kinds"):
        make_split("shapes", "train", n=4, kinds=["counting"])
    with pytest.raises(ValueError, match="splits"):
        make_split("digits", "heldout")
    with pytest.raises(ValueError, match="297 images"):
        make_split("digits", "test", n=300)
    with pytest.raises(ValueError, match="8"):
        make_split("digits", "train", size=16)
    assert set(T2I_DATASETS.names()) >= {"shapes", "digits"}


def test_kinds_can_be_restricted():
    data = make_split("shapes", "test", n=60, seed=0, size=16, kinds=["relation"])
    assert {s.kind for s in data.scenes} == {"relation"}
