"""LAVAE: contract, the counting rule, sampling without replacement, estimators, sprite
placement, test-time object counts. Tiny images (16x16) keep the whole file to seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perception.contract import pixels_to_unit
from perception.errors import PerceptionError
from perception.models import build_model
from perception.models.lavae import count_objects, local_maxima, sequential_masks
from perception.nn.sprites import place_by_convolution, place_by_index
from perception.train.optim import make_optimizer

SHAPE = (1, 16, 16)
SMALL = {"sprite_size": 5, "max_objects": 2, "channels": 8, "hidden": 32, "appearance_dim": 4, "peak_window": 5}


def scenes(n: int = 4, seed: int = 0) -> torch.Tensor:
    """n 16x16 images with 1-2 filled 4x4 squares that never touch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, *SHAPE)
    for i in range(n):
        x[i, 0, 2:6, 2 + int(torch.randint(0, 3, (1,), generator=g)) :][:, :4] = 1.0
        if i % 2:
            x[i, 0, 10:14, 9:13] = 1.0
    return x


def model(**options):
    torch.manual_seed(0)
    return build_model("lavae", {**SMALL, **options}, SHAPE)


class FixedMap(nn.Module):
    """Stands in for the encoder network: a hand-made location map (network units)."""

    def __init__(self, raw: torch.Tensor, appearance_dim: int):
        super().__init__()
        self.raw, self.z = raw, appearance_dim

    def forward(self, x):
        raw = self.location_logits(x)
        return raw, torch.zeros(len(x), 2 * self.z, *raw.shape[-2:])

    def features(self, x):
        return x

    def location_logits(self, features):
        return self.raw.expand(len(features), -1, -1)

    def appearance_at(self, features, cell, sub):
        return torch.zeros(*cell.shape, self.z)


def test_contract_shapes_and_layout():
    m = model()
    out = m.encode(scenes(), deterministic=True)
    assert out.slots.shape == (4, 2, 2 + 4) and len(m.slot_layout) == 6
    assert m.slot_layout[:2] == ["where_x", "where_y"]
    assert out.presence.shape == (4, 2) and out.position.shape == (4, 2, 2)
    assert bool(((out.presence >= 0) & (out.presence <= 1)).all())
    assert bool((out.position.abs() < 1).all())
    assert torch.equal(out.slots[..., :2], out.position)
    stochastic = m.encode(scenes(), deterministic=False)
    assert stochastic.slots.shape == out.slots.shape
    assert set(stochastic.presence.unique().tolist()) <= {0.0, 1.0}


def test_deterministic_mode_is_reproducible_and_matches_count():
    m = model().eval()
    a, b = m.encode(scenes()), m.encode(scenes())
    for name in ("slots", "presence", "position"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal((a.presence > 0.5).sum(1), m.count(scenes()))


def test_inference_path_reads_the_same_maps_as_training():
    """encode() computes the location map and K appearances without the full maps; both must
    equal what the training path reads from them at every pixel."""
    m = model().eval()
    torch.nn.init.normal_(m.net.net[-1].bias)  # distinct per sub-pixel and output: checks the layout
    x = scenes()
    with torch.no_grad():
        raw, appearance = m.net(x)
        features = m.net.features(x)
        assert torch.allclose(m.net.location_logits(features), raw, atol=1e-5)
        index = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(0))
        got = m.net.appearance_at(features, m.pixel_cell[index], m.pixel_sub[index])
    expected = appearance.flatten(2).gather(2, index.unsqueeze(1).expand(-1, 8, -1)).transpose(1, 2)[..., :4]
    assert torch.allclose(got, expected, atol=1e-5)


def test_count_from_local_maxima_of_hand_made_map():
    logits = torch.full((1, 12, 12), -5.0)
    logits[0, 2, 2], logits[0, 2, 3] = 4.0, 3.5  # a peak and its (lower) neighbour: one object
    logits[0, 8, 8] = 2.0
    logits[0, 10, 2] = 0.5
    logits[0, 5, 10] = -1.0  # a local maximum below the threshold
    assert count_objects(logits, threshold=0.0, window=3, max_objects=6).item() == 3
    assert count_objects(logits, threshold=1.0, window=3, max_objects=6).item() == 2
    assert count_objects(logits, threshold=0.0, window=3, max_objects=2).item() == 2  # capped
    values, index = local_maxima(logits, window=3, k=3)
    assert values[0].tolist() == [4.0, 2.0, 0.5]
    assert index[0].tolist() == [2 * 12 + 2, 8 * 12 + 8, 10 * 12 + 2]


@pytest.mark.parametrize("window", [1, 3])
def test_sampling_without_replacement_never_repeats(window):
    torch.manual_seed(0)
    logits = torch.zeros(50, 64)  # 8x8, uniform: repeats would be likely with replacement
    logits[:, 9] = 30.0  # a dominant pixel: only masking keeps it from being drawn again
    rows, picks = sequential_masks(logits, torch.rand(50, 6, 64), (8, 8), window)
    assert bool((picks[:, 0] == 9).all())
    y, x = picks // 8, picks % 8
    dist = torch.maximum((y[:, :, None] - y[:, None]).abs(), (x[:, :, None] - x[:, None]).abs())
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert bool((dist[:, off_diagonal] > window // 2).all())
    # row i puts no mass on earlier draws
    probs = rows.softmax(-1)
    for i in range(1, 6):
        assert float(probs[:, i].gather(1, picks[:, :i]).max()) == 0.0


@pytest.mark.parametrize("estimator", ["concrete", "reinforce", "nvil", "rebar", "relax"])
def test_each_estimator_runs_a_training_step(estimator):
    m = model(estimator=estimator)
    opt = make_optimizer(m, 1e-3)
    result = m.loss({"image": scenes()}, step=0)
    assert torch.isfinite(result.loss) and result.metrics["neg_elbo"] > 0
    opt.zero_grad()
    result.loss.backward()
    grad = m.net.net[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()


def test_exact_refuses_large_images_and_enumerates_tiny_ones():
    with pytest.raises(PerceptionError, match="exact estimator would enumerate 256\\^2"):
        model(estimator="exact")
    # a numpy count from a sweep is coerced first: 4096 ** np.int64(6) would wrap to 0 and pass the guard
    from perception.models.lavae import LAVAE

    with pytest.raises(PerceptionError, match="exact estimator would enumerate 4096\\^6"):
        LAVAE(LAVAE.Config(max_objects=np.int64(6), estimator="exact"), (1, 64, 64))
    tiny = build_model("lavae", {**SMALL, "estimator": "exact", "max_objects": 1, "sprite_size": 3}, (1, 4, 4))
    x = torch.zeros(2, 1, 4, 4)
    x[:, 0, 1, 1] = 1.0
    result = tiny.loss({"image": x}, step=0)
    result.loss.backward()
    assert torch.isfinite(result.loss)


def test_single_object_warm_up_forces_one_object_then_lets_go():
    m = model(warmup_single_object=True, warmup_steps=10)
    assert m.loss({"image": scenes()}, step=0).metrics["expected_count"] == pytest.approx(1.0)
    free = model().loss({"image": scenes()}, step=0).metrics["expected_count"]
    assert m.loss({"image": scenes()}, step=20).metrics["expected_count"] == pytest.approx(free)
    assert free != pytest.approx(1.0)


def test_overfits_a_tiny_batch():
    m = model()
    x = scenes(4)
    opt = make_optimizer(m, 3e-3)
    first = m.loss({"image": x}, 0).metrics["neg_elbo"]
    for step in range(200):
        result = m.loss({"image": x}, step)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    m.eval()
    last = sum(m.loss({"image": x}, 10**9).metrics["neg_elbo"] for _ in range(5)) / 5
    assert last < 0.5 * first, (first, last)
    # the strongest peak sits on a square (its pixels are the only foreground)
    index = m.encode(x).position[:, 0]
    cols = ((index[:, 0] + 1) * 8).long().clamp(0, 15)
    rows = ((index[:, 1] + 1) * 8).long().clamp(0, 15)
    assert bool((x[torch.arange(4), 0, rows, cols] == 1).all())


def test_raising_max_objects_at_test_time():
    m = model()
    raw = torch.full((1, 16, 16), -2.0)
    for y, x in [(2, 2), (2, 9), (8, 4), (12, 12), (13, 3)]:
        raw[0, y, x] = 1.0
    m.net = FixedMap(raw, 4)
    big = m.with_max_objects(5)
    assert m.count(scenes(1)).item() == 2 and big.count(scenes(1)).item() == 5
    out = big.encode(scenes(1))
    assert out.slots.shape == (1, 5, 6) and bool((out.presence > 0.5).all())
    assert big.count_prior_logits.shape == (6,) and m.count_prior_logits.shape == (3,)
    assert m.config.max_objects == 2
    assert torch.isfinite(big.importance_weighted_nll(scenes(1), num_samples=3)).all()


def test_sprite_lands_where_position_says():
    m = model().eval()
    sprite = torch.zeros(1, 1, 1, 5, 5)
    sprite[..., 2, 2] = 1.0  # the centre pixel
    sprite[..., 0, 0] = 0.5  # top-left corner: 2 pixels up and left of the centre
    index = torch.tensor([[5 * 16 + 9]])  # pixel row 5, column 9
    placed = place_by_index(index, sprite, 16, 16)[0, 0]
    assert placed[5, 9] == 1.0 and placed[3, 7] == 0.5 and placed.sum() == 1.5
    one_hot = torch.zeros(1, 1, 16, 16)
    one_hot[0, 0, 5, 9] = 1.0
    assert torch.allclose(place_by_convolution(one_hot, sprite)[0, 0, 0], placed, atol=1e-5)
    position = m._position(index)[0, 0]
    assert torch.allclose(position, pixels_to_unit(torch.tensor([9.5, 5.5]), 16))


def test_importance_weighted_bound_is_finite_and_tighter_with_more_samples():
    m = model().eval()
    torch.manual_seed(1)
    one = torch.stack([m.importance_weighted_nll(scenes(), 1) for _ in range(20)]).mean(0)
    many = m.importance_weighted_nll(scenes(), 50)
    assert many.shape == (4,) and torch.isfinite(many).all()
    assert bool((many <= one + 1.0).all())


def test_gaussian_likelihood_for_grayscale():
    m = model(likelihood="gaussian")
    x = scenes() * 0.7
    result = m.loss({"image": x}, step=0)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    assert torch.isfinite(m.importance_weighted_nll(x, num_samples=3)).all()
    with pytest.raises(PerceptionError, match="likelihood"):
        model(likelihood="poisson")
