"""A rule-based prompt-following check for ``shapes`` images (colour, count, position, shape).

The check needs no learned model, so it measures a generator on the same footing at any
training stage. For an image and its prompt (a caption string parsed by :func:`parse_prompt`,
a :class:`~trajflow_t2i.data.Scene` or a :class:`PromptSpec`):

1. **Segment**: each pixel takes the nearest colour among the palette and black; pixels
   nearer black, or farther than ``max_distance`` (RGB, 0–255 units) from every colour, are
   background.
2. **Blobs**: 8-connected components of each colour; components under ``min_pixels`` are specks
   and ignored (default ``max(3, H·W/64)``: 4 pixels at 16×16, 16 at 32×32, while the smallest
   object covers 13 and 41).
3. **Attributes** (:class:`CheckResult`):
   - ``colour_ok``: every colour of the prompt has a blob;
   - ``count_ok``: each prompted colour has exactly the prompted number of blobs (1 for a
     single object and for each object of a relation) and there are no blobs of other colours;
   - ``position_ok`` (relations only): from the centroid of the first object's colour's
     largest blob to the second's, the displacement along the named axis has the right sign
     and exceeds the displacement across it;
   - ``shape_ok`` (reported, not part of ``ok``): each blob of a prompted colour is classified
     by its fill of its bounding box and its vertical centre of mass (triangles are
     bottom-heavy; squares fill ≈ 1, circles ≈ 0.8, diamonds ≈ 0.5–0.67), and must match;
   - ``ok = colour_ok and count_ok and position_ok`` (position where it applies).

On clean renders of the generator the check is exact at 16 and 32 pixels (tested).
:func:`accuracy` tabulates the rates per scene kind; :func:`chance_accuracy` gives the chance
level of each check: the rates when every image is judged against the prompt of another image of
the same kind (a model that draws good scenes but ignores the prompt scores this).

Example:
    >>> from trajflow_t2i.data import make_split
    >>> data = make_split("shapes", "test", n=8, seed=0)
    >>> results = check_images(data.images, data.captions)
    >>> all(r.ok for r in results)
    True
    >>> parse_prompt("a blue square right of an orange circle").canonical()
    ('relation', ('orange', 'circle'), 'left of', ('blue', 'square'))
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from trajflow_t2i.data import (
    COLOURS,
    COUNT_WORDS,
    KINDS,
    PALETTE,
    SHAPES,
    Scene,
    split_words,
    to_uint8,
)

__all__ = [
    "ATTRIBUTES",
    "Blob",
    "CheckResult",
    "PromptSpec",
    "accuracy",
    "chance_accuracy",
    "check_images",
    "find_blobs",
    "parse_prompt",
    "spec_of",
]

_MIRROR = {"right of": "left of", "below": "above"}


@dataclass(frozen=True)
class PromptSpec:
    """What a shapes prompt asks for.

    Attributes:
        kind: ``"single"``, ``"count"`` or ``"relation"``.
        objects: ``(colour, shape)`` pairs: one for single/count, two for a relation.
        count: Number of objects of ``objects[0]`` (single: 1; relation: 1 of each).
        relation: For relations, ``objects[0] <relation> objects[1]``; else None.
    """

    kind: str
    objects: tuple[tuple[str, str], ...]
    count: int
    relation: str | None = None

    def canonical(self) -> tuple:
        """A key equal for prompts of the same meaning.

        "One red circle" and "a red circle" are the same; "B right of A" is "A left of B".
        """
        if self.relation is None:
            return ("count", *self.objects[0], self.count)
        first, second, relation = self.objects[0], self.objects[1], self.relation
        if relation in _MIRROR:
            first, second, relation = second, first, _MIRROR[relation]
        return ("relation", first, relation, second)


def spec_of(scene: Scene) -> PromptSpec:
    """The prompt specification a ground-truth scene satisfies."""
    if scene.kind == "relation":
        objects = tuple((o.colour, o.shape) for o in scene.objects)
        return PromptSpec("relation", objects, 1, scene.relation)
    first = scene.objects[0]
    return PromptSpec(scene.kind, ((first.colour, first.shape),), scene.count)


_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{f"{s}s": (s, True) for s in SHAPES}}
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_RELATION_WORDS["beneath"] = "below"
_FILLER = {"a", "an", "the", "there", "is", "are", "exactly", "single", "on", "black"}
_FILLER |= {"background", "to", "of"}


def _noun_phrase(words: list[str], prompt: str) -> tuple[str, str, bool, int | None]:
    """Colour, shape, plural and count word of a phrase like "there are two red circles"."""
    colours = [w for w in words if w in PALETTE]
    shapes = [w for w in words if w in _SHAPE_WORDS]
    counts = [COUNT_WORDS.index(w) + 1 for w in words if w in COUNT_WORDS]
    for word in words:
        if not (word in PALETTE or word in _SHAPE_WORDS or word in COUNT_WORDS or word in _FILLER):
            close = difflib.get_close_matches(word, [*PALETTE, *_SHAPE_WORDS, *COUNT_WORDS], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown word {word!r} in shapes prompt {prompt!r}{hint}")
    if len(colours) != 1 or len(shapes) != 1 or len(counts) > 1:
        raise ValueError(
            f"expected one colour ({', '.join(COLOURS)}), one shape ({', '.join(SHAPES)}) and at "
            f"most one number per object in shapes prompt {prompt!r}, got {' '.join(words)!r}"
        )
    shape, plural = _SHAPE_WORDS[shapes[0]]
    return colours[0], shape, plural, counts[0] if counts else None


def parse_prompt(text: str) -> PromptSpec:
    """Parses any caption of the shapes templates (and close variants) into a :class:`PromptSpec`.

    Raises:
        ValueError: For a prompt outside the shapes grammar, naming the offending word.

    Example:
        >>> parse_prompt("there are three yellow diamonds")
        PromptSpec(kind='count', objects=(('yellow', 'diamond'),), count=3, relation=None)
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt expected a str, got {type(text).__name__}")
    words = split_words(text)
    if not words:
        raise ValueError("parse_prompt got an empty prompt")
    positions = [i for i, w in enumerate(words) if w in _RELATION_WORDS]
    if len(positions) > 1:
        raise ValueError(f"expected at most one relation in shapes prompt {text!r}")
    if positions:
        at = positions[0]
        first, second = words[:at], words[at + 1 :]
        objects = []
        for part in (first, second):
            colour, shape, plural, count = _noun_phrase(part, text)
            if plural or count not in (None, 1):
                raise ValueError(f"relations are between single objects; got {text!r}")
            objects.append((colour, shape))
        return PromptSpec("relation", tuple(objects), 1, _RELATION_WORDS[words[at]])
    colour, shape, plural, count = _noun_phrase(words, text)
    if count is None and plural:
        raise ValueError(f"how many? a plural needs a number (two, three) in {text!r}")
    if count is not None and plural != (count > 1):
        raise ValueError(f"number and noun disagree in shapes prompt {text!r}")
    kind = "single" if count is None else "count"
    return PromptSpec(kind, ((colour, shape),), count or 1)


# ---------------------------------------------------------------------------------------------
# Segmentation and blobs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A connected component of one palette colour.

    Attributes:
        colour: Palette colour name.
        pixels: Area in pixels.
        centroid: ``(x, y)`` mean of the pixel centres.
        bbox: ``(x0, y0, x1, y1)``, exclusive ends.
        shape: The shape its fill and vertical centre of mass suggest.
    """

    colour: str
    pixels: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    shape: str


def _as_uint8(images: Tensor) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 numpy array of RGB images given as uint8 or floats in [-1, 1]."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected RGB images (3, H, W) or (B, 3, H, W), got shape {tuple(images.shape)}"
        )
    if images.is_floating_point():
        images = to_uint8(images.clamp(-1, 1))
    elif images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 or float images in [-1, 1], got {images.dtype}")
    return images.permute(0, 2, 3, 1).numpy()


# The image analysis runs in numpy: it is many small element-wise steps, which torch's thread
# pool makes many times slower on a busy machine, and it never needs gradients or a GPU.


def _segment(pixels: np.ndarray, max_distance: float) -> np.ndarray:
    """Palette index of every pixel of ``(B, H, W, 3)``, shape ``(B, H, W)``; -1 for background."""
    palette = np.array([(0, 0, 0), *PALETTE.values()], dtype=np.float32)
    pixels = pixels.astype(np.float32)
    # |p - c|² = |p|² - 2 p·c + |c|²: one small matmul instead of a (pixels × colours × 3) array.
    squared = (pixels**2).sum(-1, keepdims=True) - 2 * pixels @ palette.T + (palette**2).sum(-1)
    index = squared.argmin(axis=-1)
    nearest = np.take_along_axis(squared, index[..., None], axis=-1)[..., 0]
    return np.where((index > 0) & (nearest <= max_distance**2), index - 1, -1)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _components(labels: np.ndarray) -> np.ndarray:
    """Connected-component id (> 0) of every labelled pixel, 0 for background; 8-connectivity.

    Every labelled pixel starts with its own id (flat index + 1) and repeatedly takes the
    largest id among itself and its same-colour neighbours, then jumps to the id held by the
    pixel its id names (pointer jumping: the id stays in the component and grows, and the
    distance it has travelled doubles), until nothing changes: each blob ends with its largest
    id, in about log2(diameter) + a few rounds.
    """
    batch, height, width = labels.shape
    labelled = labels >= 0
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    same = [
        (padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == labels) & labelled
        for dy, dx in _NEIGHBOURS
    ]
    start = np.arange(1, batch * height * width + 1, dtype=np.int64).reshape(labels.shape)
    ids = np.where(labelled, start, 0)
    for _ in range(height * width):
        grid = np.pad(ids, ((0, 0), (1, 1), (1, 1)))
        grown = ids.copy()
        for (dy, dx), mask in zip(_NEIGHBOURS, same, strict=True):
            neighbour = grid[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            np.maximum(grown, np.where(mask, neighbour, 0), out=grown)
        lookup = np.concatenate([[0], grown.ravel()])
        grown = np.maximum(grown, lookup[grown])  # index 0 (background) looks up 0
        if np.array_equal(grown, ids):
            break
        ids = grown
    return ids


def _classify(fill: float, centre_of_mass: float) -> str:
    """Shape from the bounding-box fill and the vertical centre of mass (0 top, 1 bottom)."""
    if centre_of_mass > 0.56:
        return "triangle"  # the others are symmetric (0.5); triangles sit at 0.57-0.64
    if fill >= 0.95:
        return "square"
    return "circle" if fill >= 0.72 else "diamond"  # circles 0.75-0.89, diamonds 0.5-0.67


def find_blobs(
    images: Tensor, max_distance: float = 60.0, min_pixels: int | None = None
) -> list[list[Blob]]:
    """Blobs of palette colours in each image, largest first.

    Args:
        images: ``(B, 3, H, W)`` or ``(3, H, W)``, uint8 levels or floats in ``[-1, 1]``.
        max_distance: Farthest RGB distance from a palette colour that still counts as it.
        min_pixels: Smallest blob kept (default ``max(3, H·W/64)``).
    """
    pixels = _as_uint8(images)
    batch, height, width, _ = pixels.shape
    min_pixels = max(3, height * width // 64) if min_pixels is None else min_pixels
    labels = _segment(pixels, max_distance).ravel()
    ids = _components(labels.reshape(batch, height, width)).ravel()
    # Group the labelled pixels by blob: sorted by id, each blob is one run.
    flat = np.flatnonzero(ids)
    blobs: list[list[Blob]] = [[] for _ in range(batch)]
    if not len(flat):
        return blobs
    flat = flat[np.argsort(ids[flat], kind="stable")]
    _, starts, counts = np.unique(ids[flat], return_index=True, return_counts=True)
    rows, cols = (flat // width) % height, flat % width
    sums_x, sums_y = np.add.reduceat(cols + 0.5, starts), np.add.reduceat(rows + 0.5, starts)
    x0, x1 = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts) + 1
    y0, y1 = np.minimum.reduceat(rows, starts), np.maximum.reduceat(rows, starts) + 1
    first = flat[starts]  # any pixel of a blob: they share image and colour
    columns = zip(
        *(a.tolist() for a in (counts, sums_x, sums_y, x0, y0, x1, y1, first, labels[first])),
        strict=True,
    )
    for size, sum_x, sum_y, left, top, right, bottom, pixel, colour in columns:
        if size < min_pixels:
            continue
        cx, cy = sum_x / size, sum_y / size
        shape = _classify(size / ((right - left) * (bottom - top)), (cy - top) / (bottom - top))
        box = (left, top, right, bottom)
        blobs[pixel // (height * width)].append(Blob(COLOURS[colour], size, (cx, cy), box, shape))
    for image_blobs in blobs:
        image_blobs.sort(key=lambda blob: -blob.pixels)
    return blobs


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """Per-attribute outcome of the check for one image (``position_ok`` None if no relation)."""

    colour_ok: bool
    count_ok: bool
    position_ok: bool | None
    shape_ok: bool

    @property
    def ok(self) -> bool:
        """Colour, count and (for relations) position all right."""
        return self.colour_ok and self.count_ok and self.position_ok is not False


def _spec(prompt: str | Scene | PromptSpec) -> PromptSpec:
    if isinstance(prompt, PromptSpec):
        return prompt
    if isinstance(prompt, Scene):
        return spec_of(prompt)
    if isinstance(prompt, str):
        return parse_prompt(prompt)
    raise TypeError(f"expected a prompt str, Scene or PromptSpec, got {type(prompt).__name__}")


def _judge(blobs: list[Blob], spec: PromptSpec) -> CheckResult:
    wanted = {colour: spec.count for colour, _ in spec.objects}
    by_colour = {colour: [b for b in blobs if b.colour == colour] for colour in wanted}
    colour_ok = all(by_colour.values())
    count_ok = all(len(by_colour[c]) == n for c, n in wanted.items()) and len(blobs) == sum(
        wanted.values()
    )
    shape_ok = colour_ok and all(
        blob.shape == shape for colour, shape in spec.objects for blob in by_colour[colour]
    )
    position_ok = None
    if spec.relation is not None:
        position_ok = False
        if colour_ok:
            (ax, ay), (bx, by) = (by_colour[c][0].centroid for c, _ in spec.objects)
            along, across = {
                "left of": (bx - ax, by - ay),
                "right of": (ax - bx, by - ay),
                "above": (by - ay, bx - ax),
                "below": (ay - by, bx - ax),
            }[spec.relation]
            position_ok = along > abs(across)
    return CheckResult(colour_ok, count_ok, position_ok, shape_ok)


def check_images(
    images: Tensor,
    prompts: Sequence[str | Scene | PromptSpec],
    max_distance: float = 60.0,
    min_pixels: int | None = None,
) -> list[CheckResult]:
    """Checks each image against its prompt.

    Args:
        images: ``(B, 3, H, W)`` uint8 or float in ``[-1, 1]``.
        prompts: ``B`` captions, scenes or specs.
        max_distance, min_pixels: See :func:`find_blobs`.

    Raises:
        ValueError: If the numbers of images and prompts differ or a prompt does not parse.
    """
    if isinstance(prompts, (str, Scene, PromptSpec)):
        prompts = [prompts]
    specs = [_spec(prompt) for prompt in prompts]
    blobs = find_blobs(images, max_distance, min_pixels)
    if len(blobs) != len(specs):
        raise ValueError(f"got {len(blobs)} images but {len(specs)} prompts")
    return [_judge(b, s) for b, s in zip(blobs, specs, strict=True)]


ATTRIBUTES = ("colour", "count", "position", "shape", "ok")


def accuracy(results: Sequence[CheckResult], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Rate of each attribute per scene kind and over ``"all"``, with the number of images ``n``.

    ``position`` counts only relation prompts; a kind without any has no ``position`` entry.

    Example:
        >>> r = [CheckResult(True, False, None, True), CheckResult(True, True, True, True)]
        >>> accuracy(r, ["count", "relation"])["all"]
        {'colour': 1.0, 'count': 0.5, 'position': 1.0, 'shape': 1.0, 'ok': 0.5, 'n': 2}
    """
    if len(results) != len(kinds):
        raise ValueError(f"got {len(results)} results but {len(kinds)} kinds")
    table: dict[str, dict[str, float]] = {}
    for group in [*sorted(set(kinds), key=lambda k: (k not in KINDS, k)), "all"]:
        chosen = [r for r, k in zip(results, kinds, strict=True) if group in ("all", k)]
        values = {
            "colour": [r.colour_ok for r in chosen],
            "count": [r.count_ok for r in chosen],
            "position": [r.position_ok for r in chosen if r.position_ok is not None],
            "shape": [r.shape_ok for r in chosen],
            "ok": [r.ok for r in chosen],
        }
        row: dict[str, float] = {k: sum(v) / len(v) for k, v in values.items() if v}
        row["n"] = len(chosen)
        table[group] = row
    return table


def chance_accuracy(
    images: Tensor,
    prompts: Sequence[str | Scene | PromptSpec],
    kinds: Sequence[str],
    generator: torch.Generator | None = None,
    **options,
) -> dict[str, dict[str, float]]:
    """The chance level of every check: :func:`accuracy` with mismatched prompts.

    Each image is judged against the prompt of another image of the same kind (a random
    derangement within each kind), which is what a generator that ignores the prompt but draws
    the right kind of scene scores. A kind with a single image keeps its own prompt.

    Args:
        images, prompts: As for :func:`check_images`.
        kinds: Scene kind of each image.
        generator: Seeds the derangement.
        options: Passed to :func:`check_images`.
    """
    if not len(prompts) == len(kinds):
        raise ValueError(f"got {len(prompts)} prompts but {len(kinds)} kinds")
    order = list(range(len(prompts)))
    for kind in set(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        for j, index in enumerate(shuffled):  # cyclic shift of a random order: no fixed point
            order[index] = shuffled[(j + 1) % len(shuffled)]
    mismatched = [prompts[i] for i in order]
    return accuracy(check_images(images, mismatched, **options), kinds)
