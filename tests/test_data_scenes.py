"""Scene ground truth must agree with the pixels: what a model is scored against is exact."""

from __future__ import annotations

import numpy as np
import pytest

import perception.data.digits as digits
from perception.data import load_digit_pool, make_dataset
from perception.data.dsprites import DSpritesConfig, generate_multi_dsprites
from perception.data.dsprites import _render as dsprites_render
from perception.data.multimnist import PRESETS, MultiMNISTConfig, generate_multi_mnist
from perception.data.tetris import BLOCK, COLOURS, SHAPES, TetrisConfig, generate_tetris
from perception.errors import PerceptionError


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(digits.ENV_DATA_DIR, raising=False)


def check_common(scenes, exact_ids: bool = True):
    """Invariants every Scenes batch must satisfy."""
    n, k = scenes.valid.shape
    assert (scenes.counts == scenes.valid.sum(1)).all()
    assert (scenes.valid == (np.arange(k) < scenes.counts[:, None])).all()  # valid rows come first
    assert (scenes.labels[~scenes.valid] == -1).all() and (scenes.labels[scenes.valid] >= 0).all()
    assert (scenes.boxes[~scenes.valid] == 0).all() and (scenes.centres[~scenes.valid] == 0).all()
    np.testing.assert_allclose(scenes.centres, (scenes.boxes[..., :2] + scenes.boxes[..., 2:]) / 2)
    h, w = scenes.segmentation.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(n):
        seg = scenes.segmentation[i]
        ids = set(np.unique(seg).tolist()) - {0}
        assert ids <= set(range(1, scenes.counts[i] + 1))  # no pixels for absent objects
        if exact_ids:
            assert len(ids) == scenes.counts[i]  # every object is visible somewhere
        for obj in ids:
            x0, y0, x1, y1 = scenes.boxes[i, obj - 1]
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            assert not (seg == obj)[~inside].any(), f"scene {i}: object {obj} has pixels outside its box"
        assert (scenes.images[i][:, seg > 0].max(0) > 0).all()  # objects are never drawn black


def boxes_overlap(boxes):
    a, b = boxes[:, None], boxes[None, :]
    return (np.minimum(a[..., 2], b[..., 2]) > np.maximum(a[..., 0], b[..., 0])) & (
        np.minimum(a[..., 3], b[..., 3]) > np.maximum(a[..., 1], b[..., 1])
    )


# --- multi-mnist -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["sklearn", "mnist"])
@pytest.mark.parametrize("preset", ["canonical", "thesis"])
def test_multi_mnist_pixels_are_the_pasted_digits(preset, source, request):
    config = PRESETS[preset]
    full = load_digit_pool(data_dir=request.getfixturevalue("mnist_dir") if source == "mnist" else None)
    scenes = generate_multi_mnist(config, full.split("train"), 300, seed=0)
    check_common(scenes)
    s, c = config.digit_size, config.canvas
    assert scenes.image_shape == (1, c, c) and scenes.max_objects == config.max_digits
    assert set(np.unique(scenes.counts)) == set(range(config.min_digits, config.max_digits + 1))
    assert scenes.boxes.min() >= 0 and scenes.boxes.max() <= c
    resized = full.resized(s)
    for i in range(len(scenes)):
        k = scenes.counts[i]
        assert not (boxes_overlap(scenes.boxes[i, :k]) & ~np.eye(k, dtype=bool)).any()
        canvas = np.zeros((c, c), np.uint8)
        for j in range(k):
            x0, y0, x1, y1 = scenes.boxes[i, j].astype(int)
            assert (x1 - x0, y1 - y0) == (s, s)
            digit = resized[scenes.extra["digit_index"][i, j]]
            assert scenes.labels[i, j] == full.labels[scenes.extra["digit_index"][i, j]]
            canvas[y0:y1, x0:x1] = digit
            # the box centre is where the digit's mass is (MNIST digits are centred by mass)
            ys, xs = np.nonzero(digit)
            wts = digit[ys, xs].astype(float)
            centroid = np.array([x0, y0]) + 0.5 + np.array([xs @ wts, ys @ wts]) / wts.sum()
            assert np.abs(centroid - scenes.centres[i, j]).max() < 0.2 * s
            own = scenes.segmentation[i] == j + 1
            np.testing.assert_array_equal(own[y0:y1, x0:x1], digit > 0.1 * 255)
        np.testing.assert_array_equal(scenes.images[i, 0], canvas)  # nothing else on the canvas


def test_multi_mnist_overlap_sums_and_segments_by_intensity():
    config = MultiMNISTConfig(digit_size=28, min_digits=3, max_digits=3, overlap=True)
    full = load_digit_pool()
    scenes = generate_multi_mnist(config, full.split("train"), 200, seed=1)
    check_common(scenes, exact_ids=False)
    assert any(boxes_overlap(b).sum() > 3 for b in scenes.boxes)  # overlaps happen
    resized = full.resized(28).astype(np.int64)
    for i in range(0, 200, 7):
        layers = np.zeros((3, 64, 64), np.int64)
        for j in range(3):
            x0, y0 = scenes.boxes[i, j, :2].astype(int)
            layers[j, y0 : y0 + 28, x0 : x0 + 28] = resized[scenes.extra["digit_index"][i, j]]
        np.testing.assert_array_equal(scenes.images[i, 0], np.minimum(layers.sum(0), 255))
        strongest = layers.argmax(0) + 1  # ties go to the first object, like argmax
        expected = np.where(layers.max(0) > 0.1 * 255, strongest, 0)
        np.testing.assert_array_equal(scenes.segmentation[i], expected)


def test_multi_mnist_lavae_is_binary_and_segments_only_lit_pixels():
    scenes = make_dataset("multi-mnist-lavae", size=200)
    check_common(scenes)
    assert set(np.unique(scenes.images)) == {0, 255}
    assert not ((scenes.segmentation > 0) & (scenes.images[:, 0] == 0)).any()
    assert ((scenes.boxes[..., 2] - scenes.boxes[..., 0])[scenes.valid] == 15).all()


def test_crowded_generalisation_set_places_every_digit():
    scenes = make_dataset("multi-mnist", size=300, min_digits=5, max_digits=5)
    check_common(scenes)
    for b in scenes.boxes:
        assert not (boxes_overlap(b) & ~np.eye(5, dtype=bool)).any()


def test_impossible_placement_is_an_error():
    with pytest.raises(PerceptionError, match="fit"):
        MultiMNISTConfig(digit_size=30, max_digits=5)


@pytest.mark.parametrize("name", ["multi-mnist", "multi-dsprites", "tetris"])
def test_seeded_and_deterministic(name):
    a = make_dataset(name, size=50, seed=7)
    b = make_dataset(name, size=50, seed=7)
    c = make_dataset(name, size=50, seed=8)
    for field in ("images", "segmentation", "boxes", "labels", "counts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)


def test_batches_larger_than_a_render_chunk():
    scenes = make_dataset("multi-mnist", size=9000, seed=2)
    check_common(scenes.subset(slice(8180, 8210)))


# --- multi-dsprites ----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_dsprites_pixels_match_colours_and_masks(binary):
    scenes = generate_multi_dsprites(DSpritesConfig(binary_colours=binary), 150, seed=3)
    check_common(scenes)
    assert scenes.image_shape == (3, 64, 64)
    assert set(np.unique(scenes.counts)) <= {2, 3, 4, 5} and scenes.counts.min() == 2
    assert set(np.unique(scenes.labels[scenes.valid])) == {0, 1, 2}
    colours, background = scenes.extra["colours"], scenes.extra["background"]
    for i in range(len(scenes)):
        img, seg = scenes.images[i], scenes.segmentation[i]
        assert (img[:, seg == 0] == background[i]).all()
        for j in range(scenes.counts[i]):
            assert (img[:, seg == j + 1] == colours[i, j][:, None]).all()
    if binary:
        assert (background == 0).all() and set(np.unique(colours)) == {0, 255}
        assert (colours[scenes.valid].max(1) == 255).all()  # no black-on-black sprites
    else:
        saturated = colours[scenes.valid]
        assert (saturated.max(1) == 255).all() and (saturated.min(1) == 0).all()
        assert len(np.unique(background)) > 50  # gray level varies


def test_dsprites_later_sprites_occlude_earlier_ones():
    def two_squares(halves):
        params = {
            "counts": np.array([2]),
            "shape": np.zeros((1, 2), np.int64),
            "half": np.array([halves], float),
            "angle": np.zeros((1, 2)),
            "cx": np.full((1, 2), 32.0),
            "cy": np.full((1, 2), 32.0),
            "colours": np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8),
            "background": np.array([128], np.uint8),
        }
        return dsprites_render(params, 64)

    small_on_top = two_squares([8.0, 4.0])
    seg = small_on_top["segmentation"][0]
    assert (seg == 2).sum() == 8 * 8 and (seg == 1).sum() == 16 * 16 - 8 * 8
    assert (seg[28:36, 28:36] == 2).all() and small_on_top["ok"][0]
    assert (small_on_top["images"][0][:, seg == 2] == np.array([[0], [0], [255]])).all()
    big_on_top = two_squares([4.0, 8.0])
    assert (big_on_top["segmentation"][0] == 2).sum() == 16 * 16
    assert not (big_on_top["segmentation"][0] == 1).any()
    assert not big_on_top["ok"][0]  # a fully hidden sprite makes the scene be redrawn


# --- tetris ------------------------------------------------------------------------------------


def test_tetris_pieces_are_whole_tetrominoes():
    scenes = generate_tetris(TetrisConfig(), 300, seed=5)
    check_common(scenes)
    assert scenes.image_shape == (3, 35, 35) and (scenes.counts == 3).all()
    assert len(SHAPES) == 19 and len({tuple(map(tuple, s)) for s in SHAPES.tolist()}) == 19
    assert set(np.unique(scenes.labels)) == set(range(19))
    colour_id = scenes.extra["colour_id"]
    for i in range(len(scenes)):
        img, seg = scenes.images[i], scenes.segmentation[i]
        assert (img[:, seg == 0] == 0).all()
        assert len(set(colour_id[i].tolist())) == 3  # distinct colours: touching pieces stay apart
        for j in range(3):
            own = seg == j + 1
            assert own.sum() == 4 * BLOCK * BLOCK
            assert (img[:, own] == COLOURS[colour_id[i, j]][:, None]).all()
            cells = np.argwhere(own[::BLOCK, ::BLOCK])  # (row, col) of the piece's blocks
            drawn = {tuple(cell) for cell in (cells - cells.min(0)).tolist()}
            assert drawn == {tuple(cell) for cell in SHAPES[scenes.labels[i, j]].tolist()}
            ys, xs = np.nonzero(own)
            assert scenes.boxes[i, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_tetris_block_grid():
    scenes = make_dataset("tetris", size=20)
    blocks = scenes.images.reshape(20, 3, 7, BLOCK, 7, BLOCK)
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()  # each 5x5 block is one colour
