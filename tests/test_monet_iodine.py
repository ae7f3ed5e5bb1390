"""MONet and IODINE: the contract, inference details, the LDS prior and that they learn."""

from __future__ import annotations

import pytest
import torch

from perception.data import make_dataset
from perception.errors import PerceptionError
from perception.models import build_model, model_class
from perception.models.iodine import IODINE, mixture_gradients, mixture_terms
from perception.models.lds import lds_penalty
from perception.models.monet import MONet

TINY = {
    "monet": {
        "num_slots": 4, "latent_dim": 4, "unet_channels": 8, "unet_depth": 2, "encoder_channels": 8,
        "decoder_channels": 8, "decoder_layers": 2,
    },
    "iodine": {
        "num_slots": 4, "iterations": 2, "test_iterations": 3, "latent_dim": 4, "decoder_channels": 8,
        "decoder_layers": 2, "refine_channels": 8, "refine_layers": 2, "hidden": 16,
    },
}


def images(dataset: str, n: int = 4, **options) -> torch.Tensor:
    return torch.from_numpy(make_dataset(dataset, "train", n, 0, **options).float_images())


def tiny(name: str, shape: tuple[int, int, int], **options):
    torch.manual_seed(0)
    return build_model(name, {**TINY[name], **options}, shape)


@pytest.mark.parametrize("name", ["monet", "iodine"])
@pytest.mark.parametrize("dataset,options", [("tetris", {}), ("multi-dsprites", {"canvas": 32}), ("multi-mnist", {})])
def test_contract(name, dataset, options):
    x = images(dataset, 3, **options)
    model = tiny(name, tuple(x.shape[1:])).eval()
    with torch.no_grad():
        out = model(x)
    k = model.num_slots
    assert out.slots.shape == (3, k, len(model.slot_layout))
    assert out.masks.shape == (3, k, *x.shape[2:])
    torch.testing.assert_close(out.masks.sum(1), torch.ones(3, *x.shape[2:]))
    assert ((out.presence >= 0) & (out.presence <= 1)).all()
    assert out.position.shape == (3, k, 2) and out.position.abs().max() <= 1


@pytest.mark.parametrize("name", ["monet", "iodine"])
def test_deterministic_encode_is_reproducible_and_needs_no_autograd(name):
    x = images("tetris", 2)
    model = tiny(name, tuple(x.shape[1:])).eval()
    with torch.no_grad():
        a, b = model.encode(x), model.encode(x)
    for key, value in a.as_dict().items():
        assert torch.equal(value, b.as_dict()[key]), key
        assert not value.requires_grad


def test_stick_breaking_masks_sum_to_one_even_for_extreme_attention():
    x = images("tetris", 2)
    model = tiny("monet", tuple(x.shape[1:]))
    with torch.no_grad():
        model.attention.out.bias.fill_(30.0)  # alpha ~ 1: the first slot takes (almost) everything
        log_masks = model.attend(x, 4)
    masks = log_masks.exp()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 35, 35))
    assert torch.isfinite(log_masks).all()
    assert masks[:, 0].min() > 0.99


def test_monet_background_is_the_largest_slot_not_always_slot_0():
    x = images("tetris", 2)
    model = tiny("monet", tuple(x.shape[1:])).eval()
    masks = torch.full((2, 4, 35, 35), 0.01)
    masks[:, 0, :5] = 0.97  # slot 0 holds a small "object", slot 2 the rest of the image
    masks[:, 2, 5:] = 0.97
    model.attend = lambda images, slots: masks.log()
    with torch.no_grad():
        out = model.encode(x)
    assert out.presence[:, 2].eq(0).all() and out.presence[:, 0].eq(1).all()


def test_monet_more_slots_at_test_time_only_split_the_last_scope():
    x = images("multi-dsprites", 2, canvas=32)
    model = tiny("monet", tuple(x.shape[1:])).eval()
    with torch.no_grad():
        trained, more = model.encode(x).masks, model.encode(x, slots=7).masks
    assert trained.shape[1] == model.num_slots == 4 and more.shape[1] == 7
    torch.testing.assert_close(more[:, :3], trained[:, :3])  # the same attention steps
    torch.testing.assert_close(more[:, 3:].sum(1), trained[:, 3])  # the rest of the scope, split further
    wider = tiny("monet", tuple(x.shape[1:]), test_slots=7).eval()
    assert wider.num_slots == 7 and wider.encode(x).slots.shape[1] == 7
    with pytest.raises(PerceptionError, match="test_slots"):
        tiny("monet", tuple(x.shape[1:]), test_slots=-1)


def test_iodine_slots_and_iterations_can_change_at_test_time():
    x = images("tetris", 2)
    model = tiny("iodine", tuple(x.shape[1:])).eval()
    with torch.no_grad():
        few = model.encode(x, iterations=1, slots=3)
        many = model.encode(x, iterations=6, slots=7)
    assert few.masks.shape[1] == 3 and many.masks.shape[1] == 7
    assert not torch.equal(model.encode(x, iterations=1).slots, model.encode(x, iterations=3).slots)
    changed = tiny("iodine", tuple(x.shape[1:]), test_slots=5, test_iterations=1).eval()
    assert changed.num_slots == 5 and changed.encode(x).slots.shape[1] == 5


@pytest.mark.parametrize(
    "frequencies,likelihood,kernel_size",
    [(0, "gaussian", 3), (2, "gaussian", 3), (0, "gaussian", 5), (0, "logistic", 3), (1, "logistic", 5)],
)
def test_iodine_analytic_gradient_inputs_match_autograd(frequencies, likelihood, kernel_size):
    torch.manual_seed(0)
    options = {
        **TINY["iodine"], "beta": 0.7, "decoder_frequencies": frequencies, "likelihood": likelihood,
        "kernel_size": kernel_size, "sigma": 0.1 if likelihood == "gaussian" else 0.05,
    }
    model = IODINE(IODINE.Config(**options), (2, 6, 5)).double()
    x = torch.rand(2, 2, 6, 5, dtype=torch.double)
    mu = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    logvar = (0.3 * torch.randn(2, 3, 4, dtype=torch.double)).requires_grad_()
    eps = torch.randn(2, 3, 4, dtype=torch.double)
    from perception.nn.blocks import gaussian_kl

    # posterior gradient: autograd of NLL + beta KL through the decoder
    means, logits, cache = model.decode(mu + eps * (0.5 * logvar).exp())
    terms = mixture_terms(x, means, logits, model.likelihood)
    loss = (terms.nll + model.config.beta * gaussian_kl(mu, logvar).sum(1)).sum()
    g_mu, g_logvar = torch.autograd.grad(loss, (mu, logvar))
    with torch.no_grad():
        d_out = torch.cat([t.flatten(0, 1) for t in _out_grads(x, means, logits, model)], 1)
        d_z = model.decoder.vjp([c.view(-1, 3, *c.shape[1:]) for c in cache], d_out.view(2, 3, *d_out.shape[1:]))
        std = (0.5 * logvar).exp()
        torch.testing.assert_close(d_z + 0.7 * mu, g_mu)
        torch.testing.assert_close(d_z * eps * 0.5 * std + 0.7 * 0.5 * (logvar.exp() - 1), g_logvar)

    # means, masks and logits as free variables
    means = means.detach().requires_grad_()
    logits = logits.detach().requires_grad_()
    masks = torch.softmax(logits, 1)
    masks_free = masks.detach().requires_grad_()
    log_lik = terms.log_lik.detach()
    torch.testing.assert_close(log_lik, _log_density(x.unsqueeze(1), means, model.config))
    nll = -torch.logsumexp(masks.log() + _log_density(x.unsqueeze(1), means, model.config), 1).sum()
    nll_free = -torch.logsumexp(masks_free.log() + log_lik, 1).sum()
    a_means, a_logits = torch.autograd.grad(nll, (means, logits))
    (a_masks,) = torch.autograd.grad(nll_free, masks_free)
    d_means, d_masks, d_logits = _analytic(x, means, logits, model)
    torch.testing.assert_close(d_means, a_means)
    torch.testing.assert_close(d_logits, a_logits)
    torch.testing.assert_close(d_masks, a_masks)

    # and the model's own input builder uses exactly these (runs under no_grad)
    with torch.no_grad():
        images_in, vectors = model.refinement_inputs(
            x, means.detach(), logits.detach(), terms, cache, mu.detach(), logvar.detach(), eps
        )
    assert images_in.shape == (6, 3 * 2 + 8, 6, 5) and vectors.shape == (6, 16)


def _log_density(x, means, config):
    """The pixel densities written independently of PixelLikelihood, through torch.distributions."""
    if config.likelihood == "gaussian":
        return torch.distributions.Normal(means, config.sigma).log_prob(x).sum(-3)
    logistic = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros_like(means), torch.ones_like(means)),
        [torch.distributions.transforms.SigmoidTransform().inv,
         torch.distributions.transforms.AffineTransform(means, config.sigma)],
    )
    return logistic.log_prob(x.expand_as(means)).sum(-3)


def _analytic(x, means, logits, model):
    terms = mixture_terms(x, means.detach(), logits.detach(), model.likelihood)
    return mixture_gradients(x, means.detach(), terms, model.likelihood)


def _out_grads(x, means, logits, model):
    d_means, _, d_logits = _analytic(x, means, logits, model)
    return d_means, d_logits.unsqueeze(2)


def test_lds_penalises_identical_slots_more_than_orthogonal_ones():
    same = torch.ones(1, 3, 4)
    orthogonal = torch.eye(3, 4).unsqueeze(0)
    assert lds_penalty(same).item() > lds_penalty(orthogonal).item() + 100


REFERENCE_TETROMINOES = {"likelihood": "logistic", "sigma": 0.03, "kernel_size": 5, "recurrent": False}


def test_iodine_deepmind_tetrominoes_choices_build_what_they_say():
    """Logistic pixels (scale 0.03), 5x5 kernels and a refinement without LSTM: DeepMind's
    Tetrominoes configuration's choices (that they learn: test_overfits_a_tiny_batch)."""
    model = tiny("iodine", (3, 35, 35), **REFERENCE_TETROMINOES)
    assert model.refine.lstm is None and not any("lstm" in n for n, _ in model.named_parameters())
    assert model.decoder.convs[0].kernel_size == (5, 5) and model.refine.convs[0].kernel_size == (5, 5)
    assert model.likelihood.kind == "logistic" and model.likelihood.scale == 0.03


def test_iodine_refines_non_square_images():
    x = torch.rand(2, 3, 24, 40)
    for recurrent in (True, False):
        model = tiny("iodine", (3, 24, 40), recurrent=recurrent).eval()
        with torch.no_grad():
            out = model.encode(x)
        assert out.masks.shape == (2, 4, 24, 40) and torch.isfinite(out.slots).all()


@pytest.mark.parametrize("name", ["monet", "iodine"])
def test_lds_weight_zero_changes_nothing_and_lds_is_absent_at_eval(name):
    x = images("tetris", 2)
    shape = tuple(x.shape[1:])

    def loss(model, train: bool) -> float:
        model.train(train)
        torch.manual_seed(1)
        return model.loss({"image": x}, 0).loss.item()

    plain = tiny(name, shape)
    zero = tiny(name, shape, lds=True, lds_weight=0.0)
    lds = tiny(name, shape, lds=True, lds_weight=1.0)
    assert loss(zero, True) == loss(plain, True)
    assert loss(lds, True) > loss(plain, True)
    assert loss(lds, False) == loss(plain, False)


@pytest.mark.parametrize("name", ["monet", "iodine"])
def test_lds_on_means_adds_the_prior_of_the_posterior_means_not_of_the_samples(name):
    x = images("tetris", 2)
    shape = tuple(x.shape[1:])
    plain, on_means, on_samples = (tiny(name, shape, **o).train() for o in (
        {}, {"lds": True, "lds_on_means": True}, {"lds": True}))

    def loss(model) -> float:
        torch.manual_seed(1)
        return model.loss({"image": x}, 0).loss.item()

    torch.manual_seed(1)
    with torch.no_grad():
        if name == "monet":
            mu, _ = plain.posterior(x, plain.attend(x, plain.num_slots))
            expected = plain.config.lds_weight * lds_penalty(mu).mean().item()
        else:  # every refinement step t = 1..T, weighted t / T like the rest of its loss
            steps = [mu for _, mu, *_ in plain.infer(x, plain.config.num_slots, plain.config.iterations, False)]
            t_max = len(steps) - 1
            expected = sum(t / t_max * plain.config.lds_weight * lds_penalty(mu).mean().item()
                           for t, mu in enumerate(steps) if t > 0)
    assert loss(on_means) - loss(plain) == pytest.approx(expected, rel=1e-4)
    assert loss(on_samples) - loss(plain) != pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize(
    "name,steps,options", [("monet", 100, {}), ("iodine", 60, {}), ("iodine", 60, REFERENCE_TETROMINOES)]
)
def test_overfits_a_tiny_batch(name, steps, options):
    x = images("tetris", 2)
    model = tiny(name, tuple(x.shape[1:]), **options)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        result = model.loss({"image": x}, step)
        opt.zero_grad()
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(result.metrics["neg_elbo"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("name", ["monet", "iodine"])
def test_trains_with_the_shared_trainer(name, tmp_path):
    from perception.train.config import TrainConfig
    from perception.train.loop import train

    cfg = TrainConfig(model=name, dataset="tetris", steps=2, batch_size=4, train_size=16, eval_size=8, device="cpu",
                      image_every=0, model_options={**TINY[name], "lds": True})
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= metrics["fg_ari"] <= 1.0 and "duplicate_rate" in metrics


@pytest.mark.parametrize("frequencies,kernel_size", [(0, 3), (2, 3), (1, 5)])
def test_broadcast_decoder_equals_its_tiled_convolution_definition(frequencies, kernel_size):
    """The linear first layer and channels-last layers must compute exactly the plain decoder;
    with Fourier features the coordinate channels are x, y, then sin and cos of pi 2^f x, y."""
    from torch.nn import functional as F

    from perception.nn.broadcast_decoder import SpatialBroadcastDecoder, coordinate_grid

    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(4, 3, (6, 5), 8, 3, frequencies, kernel_size).double()
    z = torch.randn(5, 4, dtype=torch.double)
    coords = decoder.coords.double().expand(5, -1, -1, -1)
    assert coords.shape[1] == 2 + 4 * frequencies
    x, y = decoder.coords[0, 0], decoder.coords[0, 1]
    for f in range(frequencies):
        scale = torch.pi * 2**f
        sines, cosines = decoder.coords[0, 2:2 + 2 * frequencies], decoder.coords[0, 2 + 2 * frequencies:]
        torch.testing.assert_close(sines[f], torch.sin(scale * x), atol=1e-6, rtol=0)  # x's, then y's
        torch.testing.assert_close(cosines[frequencies + f], torch.cos(scale * y), atol=1e-6, rtol=0)
    h = torch.cat([z[:, :, None, None].expand(-1, -1, *coords.shape[2:]), coords], 1)
    for conv in decoder.convs:
        h = F.elu(conv(h))
    torch.testing.assert_close(decoder(z), decoder.out(h.contiguous()))
    assert decoder(z).shape == (5, 3, 6, 5) and decoder(z).is_contiguous()
    pad = 3 * (kernel_size // 2)  # the padded grid's centre is the image's pixel-centre grid
    torch.testing.assert_close(decoder.coords[0, :2, pad:pad + 6, pad:pad + 5], coordinate_grid(6, 5).double())


def test_iodine_training_gradient_reaches_the_initial_posterior_and_every_layer():
    """The unscored first decode runs without autograd; the initial posterior must still learn."""
    x = images("tetris", 2)
    model = tiny("iodine", tuple(x.shape[1:]))
    model.loss({"image": x}, 0).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_monet_log_sigmoid_equals_torch_and_stays_finite_where_the_sigmoid_underflows():
    """The exported attention must not produce -inf log scopes (NaN slots in onnxruntime)."""
    from perception.models.monet import log_sigmoid

    x = torch.linspace(-300, 300, 6001, dtype=torch.double)
    torch.testing.assert_close(log_sigmoid(x), torch.nn.functional.logsigmoid(x))
    big = torch.tensor([-1e4, 1e4])
    assert torch.isfinite(log_sigmoid(big)).all()
    assert torch.isinf(torch.sigmoid(big).log()).any()  # what the ONNX exporters write for F.logsigmoid


def test_segmentation_bench_trains_then_rescores_with_more_test_slots(tmp_path):
    """End to end: train and score a tiny MONet, then score the same run again with one more slot
    (no training: the weights and the training results stay as they were); bad requests fail
    before anything is trained or written."""
    import json

    from matplotlib.image import imread

    from perception.bench.segmentation import main

    options = [f"--model-option={k}={v}" for k, v in TINY["monet"].items() if k != "num_slots"]
    common = ["--model", "monet", "--dataset", "tetris", "--seeds", "1", "--batch-size", "4",
              "--train-size", "16", "--eval-size", "8", "--out", str(tmp_path)]
    assert main([*common, "--steps", "2", *options]) == 0
    encoder = tmp_path / "runs" / "tetris-monet-s0" / "encoder.pt"
    trained_json = (tmp_path / "tetris-monet.json").read_text()
    before = encoder.read_bytes()
    assert main([*common, "--score-only", "--eval-option", "test_slots=5"]) == 0
    assert main([*common, "--score-only"]) == 0
    assert encoder.read_bytes() == before and (tmp_path / "tetris-monet.json").read_text() == trained_json
    trained = json.loads(trained_json)
    rescored = json.loads((tmp_path / "tetris-monet-test_slots5.json").read_text())
    again = json.loads((tmp_path / "tetris-monet-rescored.json").read_text())
    assert rescored["eval_options"] == {"test_slots": 5} and trained["eval_options"] == {}
    assert rescored["seeds"][0]["model_options"]["num_slots"] == 4 and "train_seconds" not in rescored["seeds"][0]
    assert "neg_elbo" not in rescored["seeds"][0] and "neg_elbo" in again["seeds"][0]
    assert again["seeds"][0]["fg_ari"] == trained["seeds"][0]["fg_ari"]
    # the figure has one row per slot plus input and reconstruction: the option reached the model
    rows = {k: imread(tmp_path / f"tetris-monet{k}-s0.png").shape[0] for k in ("", "-test_slots5")}
    assert rows["-test_slots5"] / rows[""] == pytest.approx((2 + 5) / (2 + 4), rel=0.05)
    with pytest.raises(PerceptionError, match="encoder.pt or config.json missing"):
        main([*common, "--score-only", "--seeds", "2"])
    assert not (tmp_path / "tetris-monet-rescored-s1.png").exists()
    for bad, message in ((["--eval-option", "latent_dim=8"], "accepts only"),
                         (["--eval-option", "test_slots=-2"], "test_slots"),
                         (["--eval-option", "test_slots=true"], "test_slots must be an integer"),
                         (["--model-option", "gamma=0.1"], "--eval-option")):
        with pytest.raises(PerceptionError, match=message):
            main([*common, "--score-only", *bad])
    with pytest.raises(PerceptionError, match="accepts only"):  # checked before training
        main([*common, "--steps", "2", "--out", str(tmp_path / "new"), "--eval-option", "lds=true"])
    assert not (tmp_path / "new" / "runs").exists()


@pytest.mark.parametrize(
    "name,dataset,card_fg_ari",
    [("monet", "tetris", 0.997), ("monet-multi-dsprites", "multi-dsprites", 0.875), ("iodine", "tetris", 0.368)],
)
def test_bundled_segmentation_checkpoints_still_segment_held_out_scenes(name, dataset, card_fg_ari):
    """Guards the shipped files against model-code drift: the first 100 of the cards' 300 held-out
    scenes (the trainer's evaluation seed) must score near the card's foreground ARI."""
    from perception import load_encoder
    from perception.metrics import adjusted_rand_index
    from perception.pretrained import bundled_path
    from perception.train.loop import EVAL_SEED

    if bundled_path(name) is None:
        pytest.skip(f"no bundled {name}.pt")
    model = load_encoder(name)
    scenes = make_dataset(dataset, "test", 100, EVAL_SEED)
    with torch.no_grad():
        masks = model.encode(torch.from_numpy(scenes.float_images())).masks.numpy()
    assert adjusted_rand_index(scenes.segmentation, masks, ignore_background=True) > card_fg_ari - 0.05


@pytest.mark.parametrize("name,options,message", [
    ("iodine", {"test_slots": -1}, ">= 0"), ("iodine", {"decoder_frequencies": -1}, ">= 0"),
    ("iodine", {"decoder_frequencies": 2.0}, "decoder_frequencies must be an integer, got 2.0"),
    ("iodine", {"test_iterations": True}, "test_iterations must be an integer, got True"),
    ("monet", {"test_slots": 2.0}, "test_slots must be an integer"), ("monet", {"num_slots": 0}, "num_slots >= 1"),
    ("iodine", {"kernel_size": 4}, "kernel_size must be odd"), ("iodine", {"sigma": 0.0}, "sigma must be > 0"),
    ("iodine", {"sigma": float("nan")}, "sigma must be > 0"),
    ("iodine", {"likelihood": "laplace"}, "likelihood must be one of"),
])
def test_bad_count_size_and_likelihood_options_fail_when_built(name, options, message):
    with pytest.raises(PerceptionError, match=message):
        tiny(name, (3, 35, 35), **options)
    cls = model_class(name)  # built directly from its Config, not through build_model: the same checks
    with pytest.raises(PerceptionError, match=message):
        cls(cls.Config(**{**TINY[name], **options}), (3, 35, 35))


def test_every_cost_variant_of_the_segmentation_bench_builds():
    """The bench's named settings are option dictionaries: a misspelt option would only fail in
    a long benchmark run."""
    from perception.bench.segmentation import COST_VARIANTS

    for name, variants in COST_VARIANTS.items():
        for _, options in variants:
            build_model(name, {"num_slots": 4, **options}, (3, 35, 35))
