import time

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from perception import metrics
from perception.contract import Encoder, EncoderOutput, ModelLoss, pixels_to_unit
from perception.data.types import Scenes
from perception.errors import InputError


# --- count accuracy ----------------------------------------------------------------------------
def test_count_accuracy_is_exact_match_fraction():
    assert metrics.count_accuracy([0, 1, 2, 3], [0, 1, 3, 3]) == 0.75
    assert metrics.count_accuracy(torch.tensor([2, 2]), np.array([2, 2])) == 1.0


# --- ARI ---------------------------------------------------------------------------------------
def test_ari_perfect_and_permuted_labels_score_one():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, size=(3, 8, 8))
    perm = np.array([2, 0, 3, 1])
    for ignore in (False, True):
        assert metrics.adjusted_rand_index(true, true, ignore) == pytest.approx(1.0)
        assert metrics.adjusted_rand_index(true, perm[true], ignore) == pytest.approx(1.0)


def test_ari_hand_computed_two_by_two_case():
    # 4 pixels: true (0, 0, 1, 1), pred (0, 0, 0, 1). Contingency [[2, 0], [1, 1]].
    # sum C(nij, 2) = 1; true rows (2, 2) -> 2; pred cols (3, 1) -> 3; C(4, 2) = 6.
    # expected = 2 * 3 / 6 = 1; max = (2 + 3) / 2 = 2.5; ARI = (1 - 1) / (2.5 - 1) = 0.
    true = np.array([[[0, 0], [1, 1]]])
    pred = np.array([[[0, 0], [0, 1]]])
    assert metrics.adjusted_rand_index(true, pred) == pytest.approx(0.0)
    # 6 pixels: true (0,0,0,1,1,1), pred (0,0,1,1,2,2). Contingency [[2,1,0],[0,1,2]].
    # index = 1 + 1 = 2; rows (3, 3) -> 6; cols (2, 2, 2) -> 3; C(6,2) = 15.
    # expected = 6 * 3 / 15 = 1.2; max = 4.5; ARI = 0.8 / 3.3.
    true = np.array([[[0, 0, 0, 1, 1, 1]]])
    pred = np.array([[[0, 0, 1, 1, 2, 2]]])
    assert metrics.adjusted_rand_index(true, pred) == pytest.approx(0.8 / 3.3)


def test_ari_matches_sklearn_on_random_segmentations():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 4, size=(20, 10, 10))
    # Correlated prediction so scores spread over a range, not all ~0.
    pred = np.where(rng.random(true.shape) < 0.6, true, rng.integers(0, 5, size=true.shape))
    all_px = [adjusted_rand_score(t.ravel(), p.ravel()) for t, p in zip(true, pred)]
    fg = [adjusted_rand_score(t[t > 0], p[t > 0]) for t, p in zip(true, pred)]
    assert metrics.adjusted_rand_index(true, pred) == pytest.approx(np.mean(all_px), abs=1e-9)
    assert metrics.adjusted_rand_index(true, pred, ignore_background=True) == pytest.approx(
        np.mean(fg), abs=1e-9
    )
    scores = metrics._ari_scores(true, pred, True)
    np.testing.assert_allclose(scores, fg, atol=1e-9)


def test_ari_soft_masks_are_argmaxed():
    rng = np.random.default_rng(2)
    true = rng.integers(0, 3, size=(4, 6, 6))
    soft = rng.random((4, 5, 6, 6)) * 0.4
    soft += np.eye(5)[(true + 1) % 5].transpose(0, 3, 1, 2)  # the argmax is a relabelling of true
    assert metrics.adjusted_rand_index(
        true, torch.tensor(soft), ignore_background=True
    ) == pytest.approx(1.0)


def test_ari_degenerate_cases():
    true = np.zeros((1, 4, 4), int)
    true[0, :2, :2] = 1  # one object on background
    pred = np.zeros((1, 4, 4), int)
    pred[0, :2, :2] = 3  # its own segment, background another: foreground is a single cluster each
    assert metrics.adjusted_rand_index(true, pred, ignore_background=True) == 1.0
    assert adjusted_rand_score(true[true > 0], pred[true > 0]) == 1.0
    # single true cluster, prediction splits it -> 0 (sklearn agrees)
    split = pred.copy()
    split[0, 0, :2] = 4
    assert metrics.adjusted_rand_index(true, split, ignore_background=True) == pytest.approx(0.0)
    assert adjusted_rand_score(true[true > 0], split[true > 0]) == pytest.approx(0.0)
    # an image without foreground is left out of the mean, not counted as 0 or NaN
    both = np.concatenate([true, np.zeros_like(true)])
    both_pred = np.concatenate([split, pred])
    assert metrics.adjusted_rand_index(both, both_pred, ignore_background=True) == pytest.approx(
        0.0
    )
    assert np.isnan(metrics.adjusted_rand_index(np.zeros_like(true), pred, ignore_background=True))


def test_ari_is_fast_on_1000_images():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 6, size=(1000, 64, 64), dtype=np.uint8)
    soft = rng.random((1000, 6, 64, 64), dtype=np.float32)
    metrics.adjusted_rand_index(true, soft)  # warm-up
    start = time.perf_counter()
    metrics.adjusted_rand_index(true, soft, ignore_background=True)
    assert time.perf_counter() - start < 1.0


def test_ari_rejects_wrong_shapes():
    with pytest.raises(InputError):
        metrics.adjusted_rand_index(np.zeros((2, 4, 4), int), np.zeros((2, 4, 5), int))


# --- Hungarian mIoU ----------------------------------------------------------------------------
def _two_objects():
    true = np.zeros((1, 2, 4, 4), bool)
    true[0, 0, :2, :2] = True
    true[0, 1, 2:, 2:] = True
    return true


def test_miou_permuted_predictions_score_one():
    true = _two_objects()
    background = ~true.any(axis=1, keepdims=True)
    pred = np.concatenate(
        [true[:, 1:], background, true[:, :1]], axis=1
    )  # permuted, plus a bg slot
    assert metrics.mean_iou_hungarian(true, pred) == 1.0
    soft = pred.astype(np.float32) * 0.9 + 0.05
    assert metrics.mean_iou_hungarian(true, torch.tensor(soft)) == 1.0


def test_miou_hand_case_and_unmatched_objects_count_zero():
    true = _two_objects()
    pred = np.zeros((1, 1, 4, 4), bool)
    pred[0, 0, :2, :] = True  # covers object 0 (4 px) plus 4 background px: IoU 0.5
    # one predicted mask, two objects: object 0 gets 0.5, object 1 is unmatched -> 0
    assert metrics.mean_iou_hungarian(true, pred) == pytest.approx(0.25)
    # one-to-one: a single mask covering both objects is credited once
    both = true.any(axis=1, keepdims=True)
    empty = np.zeros_like(both)
    assert metrics.mean_iou_hungarian(true, np.concatenate([both, empty], 1)) == pytest.approx(0.25)


def test_miou_respects_valid_and_skips_images_without_objects():
    true = np.concatenate([_two_objects(), np.zeros_like(_two_objects())])
    pred = true.copy()
    pred[0, 1] = False  # miss object 1 in image 0
    valid = np.array([[True, False], [False, False]])
    assert metrics.mean_iou_hungarian(true, pred, valid) == 1.0  # object 1 is not valid
    assert metrics.mean_iou_hungarian(true, pred) == pytest.approx(0.5)  # image 1 skipped


# --- clustering accuracy -----------------------------------------------------------------------
def test_clustering_accuracy_permuted_ids_score_one():
    labels = np.array([0, 1, 2, 2, 1, 0, 3])
    perm = np.array([3, 0, 2, 1])
    assert metrics.clustering_accuracy(perm[labels], labels) == 1.0
    np.testing.assert_array_equal(metrics.cluster_mapping(perm[labels], labels)[perm], np.arange(4))


def test_clustering_accuracy_one_to_one_hand_case():
    # clusters 0,0,0,1,1,1 ; labels 0,0,1,1,1,1. One-to-one best: 0->0, 1->1: 5/6 correct.
    # (majority would also say 0->0; the difference shows in the next case)
    assert metrics.clustering_accuracy([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(
        5 / 6
    )
    # clusters all lean to class 1: majority would map both to 1 (5/6), one-to-one can't: 4/6
    assert metrics.clustering_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 1, 1, 1]) == pytest.approx(
        4 / 6
    )


def test_clustering_accuracy_overclustering_uses_majority():
    pred = [0, 0, 1, 1, 2, 2, 2]
    labels = [0, 0, 0, 1, 1, 1, 0]
    # 3 clusters, 2 classes: 0->0 (2/2), 1->0 or 1 (tie: 1 correct), 2->1 (2/3): 5/7
    assert metrics.clustering_accuracy(pred, labels) == pytest.approx(5 / 7)
    mapping = metrics.cluster_mapping(pred, labels, num_clusters=4)
    assert mapping[0] == 0 and mapping[2] == 1 and mapping[3] == -1  # cluster 3 never used


# --- positions ---------------------------------------------------------------------------------
def test_position_error_with_permuted_predictions():
    size = 32
    centres = np.array([[[4.0, 8.0], [20.0, 24.0], [0.0, 0.0]]])
    valid = np.array([[True, True, False]])
    offset = np.array([[[3.0, 4.0], [0.0, 1.0]]])  # errors 5 and 1 pixels
    pred_px = centres[:, [1, 0]] + offset[:, [1, 0]]  # slots in the other order
    pred = np.concatenate(
        [pixels_to_unit(torch.tensor(pred_px), size).numpy(), [[[0.9, 0.9]]]], axis=1
    )
    presence = np.array([[0.9, 0.8, 0.1]])  # third slot absent: must not be matched
    err = metrics.position_error(pred, presence, centres, valid, size)
    assert err == pytest.approx({"median": 3.0, "mean": 3.0, "matched": 2.0})
    err = metrics.position_error(
        pred, presence, centres, valid, (size, size), presence_threshold=0.85
    )
    assert err["matched"] == 1.0 and err["mean"] == pytest.approx(1.0)  # slot 0 -> object 1


def test_position_error_uses_width_for_x_and_height_for_y():
    pred = np.array([[[0.0, 0.0]]])  # image centre
    err = metrics.position_error(pred, [[1.0]], [[[16.0, 8.0]]], [[True]], (16, 32))
    assert err["mean"] == pytest.approx(0.0)


# --- duplicates and cosine ---------------------------------------------------------------------
def test_duplicate_rate_one_duplicated_object():
    true = _two_objects()  # object 0 top-left 2x2, object 1 bottom-right 2x2
    bg = ~true.any(axis=1)
    half_a = np.zeros((1, 4, 4), bool)
    half_a[0, 0, :2] = True
    half_b = np.zeros((1, 4, 4), bool)
    half_b[0, 1, :2] = True
    pred = np.stack([bg, half_a, half_b, true[:, 1]], axis=1).astype(np.float32)
    # object 0 is explained by two slots (each half of it), object 1 by one: 1 of 2
    assert metrics.duplicate_rate(true, pred) == 0.5
    # soft duplicate: two slots share object 0's pixels 50/50
    soft = np.stack([bg, true[:, 0], true[:, 0], true[:, 1]], axis=1).astype(np.float32)
    soft[:, 1:3] *= 0.5
    assert metrics.duplicate_rate(true, soft) == 0.5
    # an absent duplicate slot does not count
    assert metrics.duplicate_rate(true, soft, pred_presence=[[1, 1, 0, 1]]) == 0.0
    # perfect segmentation: none
    perfect = np.stack([bg, true[:, 0], true[:, 1]], axis=1)
    assert metrics.duplicate_rate(true, perfect) == 0.0


def test_duplicate_rate_background_slot_never_claims():
    true = _two_objects()
    everything = np.ones((1, 1, 4, 4), np.float32)  # one slot over the whole image
    assert metrics.duplicate_rate(true, np.concatenate([everything, true], 1)) == 0.0


def test_mean_pairwise_cosine():
    same = np.tile(np.array([1.0, 2.0, 3.0]), (2, 4, 1))
    assert metrics.mean_pairwise_cosine(same) == pytest.approx(1.0)
    slots = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-5.0, 0.0]]])
    # pairs among slots 0..2 (slot 3 absent): cos 0, 1/sqrt2, 1/sqrt2
    expected = (0 + 2 / np.sqrt(2)) / 3
    assert metrics.mean_pairwise_cosine(slots, [[0.9, 0.9, 0.9, 0.1]]) == pytest.approx(expected)
    assert np.isnan(metrics.mean_pairwise_cosine(slots, [[0.9, 0.1, 0.1, 0.1]]))


def test_summarise():
    s = metrics.summarise([1.0, 2.0, 3.0])
    assert s == pytest.approx({"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3.0})
    assert metrics.summarise([4.0])["std"] == 0.0


# --- evaluate_encoder --------------------------------------------------------------------------
def _scenes(n=5, size=16, kmax=3, seed=0):
    """Squares in distinct quadrants; counts 0..3."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, size, size), np.uint8)
    centres = np.zeros((n, kmax, 2), np.float32)
    boxes = np.zeros((n, kmax, 4), np.float32)
    labels = np.full((n, kmax), -1, np.int64)
    valid = np.zeros((n, kmax), bool)
    seg = np.zeros((n, size, size), np.uint8)
    counts = np.arange(n) % (kmax + 1)
    half = size // 2
    for i in range(n):
        quads = rng.permutation(4)[: counts[i]]
        for k, q in enumerate(quads):
            x0, y0 = (q % 2) * half + int(rng.integers(0, 3)), (q // 2) * half + int(
                rng.integers(0, 3)
            )
            s = 4 + int(rng.integers(0, 2))
            images[i, 0, y0 : y0 + s, x0 : x0 + s] = 255
            seg[i, y0 : y0 + s, x0 : x0 + s] = k + 1
            centres[i, k] = (x0 + s / 2, y0 + s / 2)
            boxes[i, k] = (x0, y0, x0 + s, y0 + s)
            labels[i, k] = rng.integers(0, 3)
            valid[i, k] = True
    return Scenes(images, counts, centres, boxes, labels, valid, seg)


class _Oracle(Encoder):
    """Returns the ground truth of the scenes it was built with (looked up by call order)."""

    Config = dict  # no options

    def __init__(self, scenes, masks=True, classes=True):
        super().__init__({}, scenes.image_shape)
        self.scenes, self.masks, self.classes, self.seen = scenes, masks, classes, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def num_slots(self):
        return self.scenes.max_objects + 1

    @property
    def slot_layout(self):
        return [f"what_{i}" for i in range(3)]

    @property
    def num_classes(self):
        return 3 if self.classes else None

    def encode(self, images, deterministic=True):
        assert not self.training and not torch.is_grad_enabled() and deterministic
        n = images.shape[0]
        s = self.scenes.subset(slice(self.seen, self.seen + n))
        self.seen += n
        size = s.image_shape[1]
        valid = np.concatenate([np.zeros((n, 1), bool), s.valid], 1)  # slot 0 = background
        centres = np.concatenate([np.zeros((n, 1, 2), np.float32), s.centres], 1)
        labels = np.concatenate([np.zeros((n, 1), np.int64), s.labels.clip(0)], 1)
        probs = np.eye(3, dtype=np.float32)[(labels + 1) % 3]  # class ids permuted
        masks = s.segmentation[:, None] == np.arange(self.num_slots)[None, :, None, None]
        slots = probs + np.random.default_rng(0).normal(size=probs.shape).astype(np.float32)
        return EncoderOutput(
            slots=torch.tensor(slots),
            presence=torch.tensor(valid.astype(np.float32)),
            position=pixels_to_unit(torch.tensor(centres), size),
            class_probs=torch.tensor(probs) if self.classes else None,
            masks=torch.tensor(masks.astype(np.float32)) if self.masks else None,
        )

    def loss(self, batch, step):
        return ModelLoss(self.weight.sum(), {})


def test_evaluate_encoder_oracle_scores_perfectly():
    scenes = _scenes(n=7)
    encoder = _Oracle(scenes)
    encoder.train()
    res = metrics.evaluate_encoder(encoder, scenes, batch_size=3)
    assert encoder.seen == len(scenes) and encoder.training  # all batches seen, mode restored
    assert all(isinstance(v, float) for v in res.values())
    assert res["count_accuracy"] == 1.0
    assert res["position_error_mean_px"] == pytest.approx(0.0, abs=1e-5)
    assert res["position_error_median_px"] == pytest.approx(0.0, abs=1e-5)
    assert res["position_matched"] == float(scenes.valid.sum())
    for key in ("ari", "fg_ari", "miou", "clustering_accuracy"):
        assert res[key] == pytest.approx(1.0), key
    assert res["duplicate_rate"] == 0.0
    assert -1.0 <= res["slot_cosine"] <= 1.0


def test_evaluate_encoder_reports_only_applicable_metrics():
    scenes = _scenes(n=4)
    res = metrics.evaluate_encoder(_Oracle(scenes, masks=False, classes=False), scenes)
    assert set(res) == {
        "count_accuracy",
        "position_error_median_px",
        "position_error_mean_px",
        "position_matched",
        "slot_cosine",
    }
