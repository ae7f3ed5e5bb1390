"""D-VAE, D-VAE-ST and the affine spatial transformer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception.models import build_model
from perception.nn.spatial_transformer import affine_from_params, affine_matrix, crop, identity_matrix, warp

ESTIMATORS = ("reinforce", "nvil", "concrete", "rebar", "relax", "exact")
SHAPE = (1, 28, 28)




def make(name: str, **options):
    torch.manual_seed(0)
    return build_model(name, {"channels": 8, "hidden": 32, **options}, SHAPE)


def blob(size: int = 16, cx: float = 8.0, cy: float = 8.0, sigma: float = 1.5) -> torch.Tensor:
    """A smooth Gaussian blob centred at pixel coordinates (cx, cy) (pixel i covers [i, i+1))."""
    u = torch.arange(size) + 0.5
    img = torch.exp(-((u[None, :] - cx) ** 2 + (u[:, None] - cy) ** 2) / (2 * sigma**2))
    return img[None, None]


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse transform ``[A^-1 | -A^-1 t]`` by ``linalg.inv``: the reference for ``warp``."""
    a, t = matrix[..., :2], matrix[..., 2:]
    a_inv = torch.linalg.inv(a)
    return torch.cat([a_inv, -a_inv @ t], dim=-1)


def centre_of_mass(img: torch.Tensor) -> tuple[float, float]:
    u = torch.arange(img.shape[-1]) + 0.5
    m = img[0, 0]
    return float((m.sum(0) * u).sum() / m.sum()), float((m.sum(1) * u).sum() / m.sum())


# --- spatial transformer ---------------------------------------------------------------------
def test_identity_warp_is_identity():
    x = torch.rand(3, 2, 12, 12)
    assert torch.allclose(warp(x, identity_matrix(3)), x, atol=1e-6)
    assert torch.allclose(crop(x, affine_from_params(torch.zeros(3, 6))), x, atol=1e-6)


def test_positive_translation_moves_content_right_and_down():
    x = blob(16, 8.0, 8.0)
    # t = (0.5, -0.25) in [-1, 1] units is (+4, -2) pixels on a 16-pixel canvas
    y = warp(x, affine_matrix(torch.ones(1, 2), torch.tensor([[0.5, -0.25]])))
    cx, cy = centre_of_mass(y)
    assert cx == pytest.approx(12.0, abs=0.05) and cy == pytest.approx(6.0, abs=0.05)


def test_scale_enlarges_and_crop_inverts_warp():
    x = blob(32, 16.0, 16.0, sigma=3.0)
    m = affine_matrix(torch.full((1, 2), 1.5), torch.tensor([[0.1, -0.1]]), rotation=torch.tensor([0.3]))
    y = warp(x, m)
    assert (y > 0.5).sum() > 1.8 * (x > 0.5).sum()  # area grows by ~1.5^2
    assert torch.allclose(crop(y, m), x, atol=0.03)
    # warping with the inverse matrix is the same as cropping (F.affine_grid's sampling)
    assert torch.allclose(warp(y, invert_affine(m)), crop(y, m), atol=1e-5)
    general = affine_from_params(torch.randn(4, 6) * 0.3)
    objects = torch.rand(4, 1, 20, 20)
    assert torch.allclose(warp(objects, general, (28, 24)), crop(objects, invert_affine(general), (28, 24)), atol=1e-5)


# --- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dvae", "dvaest"])
def test_contract_and_deterministic_mode(name):
    model = make(name, num_classes=7).eval()
    x = torch.rand(5, *SHAPE)
    out = model(x)
    d = len(model.slot_layout)
    assert model.num_slots == 1 and model.num_classes == 7
    assert out.slots.shape == (5, 1, d) and out.presence.shape == (5, 1) and out.position.shape == (5, 1, 2)
    assert out.class_probs.shape == (5, 1, 7)
    assert torch.allclose(out.class_probs.sum(-1), torch.ones(5, 1))
    assert torch.all(out.presence == 1)
    one_hot = out.slots[:, 0, -7:]
    assert torch.equal(one_hot.argmax(-1), out.class_probs[:, 0].argmax(-1)) and torch.all(one_hot.sum(-1) == 1)
    again = model.encode(x, deterministic=True)
    assert torch.equal(out.slots, again.slots) and torch.equal(out.position, again.position)
    names = model.slot_layout
    assert names[-7:] == [f"class_{i}" for i in range(7)]
    for rows in model.visualize(x).values():  # TensorBoard rows: inputs, reconstructions, prototypes
        assert rows.shape == (5, *SHAPE) and rows.min() >= 0 and rows.max() <= 1
    if name == "dvaest":
        assert names[:6] == ["log_scale_x", "log_scale_y", "rotation", "shear", "where_x", "where_y"]
        assert torch.equal(out.position[:, 0], out.slots[:, 0, 4:6])
    else:
        assert d == 7 and torch.all(out.position == 0)


@pytest.mark.parametrize("name", ["dvae", "dvaest"])
def test_prototypes_are_images(name):
    model = make(name, num_classes=4)
    protos = model.prototypes()
    assert protos.shape == (4, *SHAPE)
    assert protos.min() >= 0 and protos.max() <= 1


def test_transform_starts_at_identity():
    model = make("dvaest", num_classes=3).eval()
    x = torch.rand(4, *SHAPE)
    params = model.transform(x, model.hidden(x), deterministic=True)[0]
    assert torch.all(params == 0)
    one_hot = torch.eye(model.num_prototypes)[torch.tensor([0, 1, 2, 1])]  # spares included
    rendered = model.render(one_hot, params)
    assert torch.allclose(rendered, model.prototypes()[[0, 1, 2, 1]], atol=1e-6)


@pytest.mark.parametrize("name", ["dvae", "dvaest"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains(name, estimator):
    model = make(name, num_classes=3, estimator=estimator).train()
    x = torch.rand(6, *SHAPE)
    result = model.loss({"image": x}, step=0)
    assert torch.isfinite(result.loss)
    assert math.isfinite(result.metrics["neg_elbo"])
    result.loss.backward()
    grads = [p.grad for p in model.to_logits.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0  # the estimator reaches the classifier
    assert model.bank.logits.grad is not None and model.bank.logits.grad.abs().sum() > 0


def two_class_batch(count: int = 5) -> tuple[torch.Tensor, np.ndarray]:
    """``count`` 0s and as many 1s from the embedded scikit-learn digits (always available)."""
    from perception.data.digits import load_digit_pool

    pool = load_digit_pool("sklearn-digits").split("train")
    idx = np.concatenate([np.flatnonzero(pool.labels == c)[:count] for c in (0, 1)])
    return torch.from_numpy(pool.images[idx][:, None].astype(np.float32) / 255.0), pool.labels[idx]


@pytest.mark.parametrize("name", ["dvae", "dvaest"])
def test_overfits_two_classes(name):
    from perception.metrics import clustering_accuracy
    from perception.train.optim import make_optimizer

    x, labels = two_class_batch()
    model = make(name, num_classes=2).train()
    optimizer = make_optimizer(model, 3e-3)
    first = None
    for step in range(40):
        result = model.loss({"image": x}, step)
        first = first if first is not None else result.metrics["neg_elbo"]
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    model.eval()
    pred = model(x).class_probs[:, 0].argmax(-1).numpy()
    assert clustering_accuracy(pred, labels, 2) == 1.0
    assert model.loss({"image": x}, step=10**9).metrics["neg_elbo"] < 0.9 * first


def test_split_and_merge_separates_a_merged_pair():
    """Two prototypes on one digit (a duplicate) and no prototype for the other (a merge): the
    move must re-seed one prototype on the unexplained digit and be reported as accepted."""
    from perception.metrics import clustering_accuracy
    from perception.models.dvae import bernoulli_nll_probs

    x, labels = two_class_batch(count=10)
    model = make("dvae", num_classes=2, extra_classes=0, init="random")
    zeros = x[labels == 0].mean(0).clamp(0.02, 0.98)
    with torch.no_grad():
        model.bank.logits[0] = torch.logit(zeros)
        model.bank.logits[1] = torch.logit((0.9 * zeros + 0.05).clamp(0.02, 0.98))  # a worse duplicate
    gain = model.split_and_merge(x)
    assert gain > model.config.split_min_gain and model.moves == 1
    protos = model.prototypes()
    cost = torch.stack([bernoulli_nll_probs(protos[k].expand_as(x), x) for k in range(2)], 1)
    assert clustering_accuracy(cost.argmin(1).numpy(), labels, 2) == 1.0
    before = model.prototypes().clone()
    assert model.split_and_merge(x) == 0.0 and torch.equal(model.prototypes(), before)  # nothing left to fix


def test_spare_prototype_is_pruned_at_split_until():
    """Over-clustering: with one spare prototype, the duplicate is switched off when the moves
    stop; the read-out then has exactly num_classes classes, and the pruned class gets neither
    probability nor gradient."""
    x, labels = two_class_batch(count=10)
    model = make(
        "dvae", num_classes=2, extra_classes=1, init="random", split_every=0, split_until=1, class_inference="posterior"
    ).train()
    zeros, ones = (x[labels == k].mean(0).clamp(0.02, 0.98) for k in (0, 1))
    with torch.no_grad():
        model.bank.logits[0] = torch.logit(zeros)
        model.bank.logits[1] = torch.logit((0.9 * zeros + 0.05).clamp(0.02, 0.98))  # a worse duplicate
        model.bank.logits[2] = torch.logit(ones)
    model.loss({"image": x}, step=0)
    assert model.alive.all()  # nothing pruned before split_until
    result = model.loss({"image": x}, step=1)
    assert model.alive.tolist() == [True, False, True] and model.keep.tolist() == [0, 2]
    result.loss.backward()
    assert float(model.bank.logits.grad[1].abs().sum()) == 0.0
    with torch.no_grad():
        assert float(model.classifier_logits(model.hidden(x)).softmax(-1)[:, 1].max()) == 0.0
    model.eval()
    out = model(x)
    assert out.class_probs.shape == (len(x), 1, 2) and model.prototypes().shape == (2, *SHAPE)
    assert (out.class_probs[:, 0].argmax(-1).numpy() == labels).all()


def test_classified_cost_is_the_cost_of_the_classifiers_class_and_skips_pruned_ones():
    """DVAEST.classified_cost (DAIR's alignment score) = costs(...) at the amortised classifier's
    argmax, one warp per image; a pruned prototype is never that class, however large its raw logit."""
    torch.manual_seed(3)
    model = make("dvaest", num_classes=3, extra_classes=2).eval()
    with torch.no_grad():
        model.alive[1] = False
        model.to_logits.bias[1] = 100.0  # the pruned class would win without the mask
        x = torch.rand(6, *SHAPE)
        r = model.read(x)
        chosen = r.logits.argmax(-1)
        expected = model.costs(x, r.params, r.kl, r.placed).gather(1, chosen[:, None])[:, 0]
        torch.testing.assert_close(model.classified_cost(x), expected)
    assert (chosen != 1).all()


def test_read_out_classes_follow_from_alive_and_old_checkpoints_load():
    """``keep`` is not saved: it is alive's first num_classes; checkpoints that stored it still load."""
    model = make("dvaest", num_classes=3, extra_classes=2)
    with torch.no_grad():
        model.alive[[1, 3]] = False
    state = model.state_dict()
    assert "keep" not in state and "alive" in state
    fresh = make("dvaest", num_classes=3, extra_classes=2)
    fresh.load_state_dict({**state, "keep": torch.tensor([0, 2, 4])})  # the format saved until 22 Nov 2026
    assert fresh.keep.tolist() == [0, 2, 4]
    assert torch.equal(fresh.prototypes(), model.bank.probs()[[0, 2, 4]])


def test_bad_init_class_inference_or_extra_classes_is_refused():
    from perception.errors import PerceptionError

    with pytest.raises(PerceptionError, match="prototype init"):
        make("dvae", init="zeros")
    with pytest.raises(PerceptionError, match="class_inference"):
        make("dvaest", class_inference="oracle")
    with pytest.raises(PerceptionError, match="extra_classes"):
        make("dvaest", extra_classes=-1)


def test_posterior_inference_picks_the_best_fitting_prototype():
    """class_inference="posterior" reads the class off the per-class costs, not the classifier."""
    x, labels = two_class_batch(count=4)
    model = make("dvaest", num_classes=2, class_inference="posterior").eval()
    with torch.no_grad():
        for k in (0, 1):
            model.bank.logits[k] = torch.logit(x[labels == k].mean(0).clamp(0.02, 0.98))
    pred = model(x).class_probs[:, 0].argmax(-1).numpy()
    assert (pred == labels).all()


def test_bundled_checkpoint_classifies_held_out_digits():
    import os

    from perception.metrics import clustering_accuracy
    from perception.pretrained import bundled_path
    from perception.train.checkpoint import load_encoder_checkpoint

    path = bundled_path("dvaest")
    if path is None:
        pytest.skip("no bundled perception/pretrained/dvaest.pt")
    model = load_encoder_checkpoint(path)
    assert model.prototypes().shape == (10, *SHAPE)
    data_dir = os.environ.get("PERCEPTION_DATA_DIR", "/work/shared/datasets/mnist")
    if not os.path.isdir(data_dir):
        pytest.skip("MNIST IDX files not found (set PERCEPTION_DATA_DIR)")
    from perception.data import make_dataset

    test = make_dataset("mnist", "test", data_dir=data_dir)  # digits 8000-9999, never trained on
    with torch.no_grad():
        pred = model(torch.from_numpy(test.float_images())).class_probs[:, 0].argmax(-1).numpy()
    assert clustering_accuracy(pred, test.labels[:, 0], 10) > 0.9  # model card: 93.50% (classifier)


def test_sampled_transform_log_ratios_average_to_minus_the_kl():
    """log p(z) - log q(z|x) at sampled transforms (DAIR's importance weights) is an unbiased
    estimate of -KL(q || p)."""
    model = make("dvaest", num_classes=2).eval()
    with torch.no_grad():
        model.to_transform[-1].bias.normal_(0.0, 0.3)  # a posterior away from the prior
        x = torch.rand(2, *SHAPE).repeat(4000, 1, 1, 1)
        _, kl, log_ratio = model.transform(x, model.hidden(x), deterministic=False)
    assert torch.allclose(-log_ratio.view(4000, 2, -1).mean(0), kl[:2], rtol=0.05, atol=0.05)
    assert not torch.allclose(log_ratio[:2], -kl[:2], rtol=0.05)  # single samples do vary
