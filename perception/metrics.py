"""Evaluation metrics, kept apart from models so every model is scored by the same code.

Functions take numpy arrays (torch tensors are converted) and return floats or flat dicts.
Per-image scores are averaged over images; a score that is undefined for an image (no
objects, no foreground pixels) leaves that image out of the mean rather than counting it as 0
or poisoning the mean with NaN. A metric with no image to average over is NaN.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from perception.contract import Encoder, unit_to_pixels
from perception.data.types import Scenes
from perception.errors import InputError

PRESENCE_THRESHOLD = 0.5  # a slot counts as an object when its presence exceeds this
DUPLICATE_MIN_SHARE = 0.2  # share of an object's area a slot must take to claim it


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _label_map(seg: Any, what: str) -> np.ndarray:
    """int64 [N, P] labels from an int map [N, H, W] or soft masks [N, K, H, W] (argmax)."""
    seg = _np(seg)
    if seg.ndim == 4:
        seg = seg.argmax(axis=1)
    if seg.ndim != 3:
        raise InputError(
            f"expected {what} as int [N, H, W] or masks [N, K, H, W], got {list(seg.shape)}"
        )
    seg = seg.reshape(seg.shape[0], -1).astype(np.int64)
    if seg.size and seg.min() < 0:
        raise InputError(f"expected non-negative integer labels in {what}, got {seg.min()}")
    return seg


def _flat_masks(masks: Any, what: str) -> np.ndarray:
    """float32 [N, K, P] from masks [N, K, H, W]."""
    masks = _np(masks)
    if masks.ndim != 4:
        raise InputError(f"expected {what} as [N, K, H, W], got {list(masks.shape)}")
    return masks.reshape(masks.shape[0], masks.shape[1], -1).astype(np.float32)


def _mask_pair(true_masks: Any, pred_masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 true (binarised) and predicted masks of the same images."""
    t = _flat_masks(_np(true_masks) > 0, "true_masks")
    p = _flat_masks(pred_masks, "pred_masks")
    if t.shape[0] != p.shape[0] or t.shape[2] != p.shape[2]:
        shape = list(_np(pred_masks).shape)
        raise InputError(
            f"expected pred_masks [{t.shape[0]}, K, H, W] like true_masks, got {shape}"
        )
    return t, p


def _partition(masks: Any) -> np.ndarray:
    """Soft masks [N, K, H, W] -> bool one-hot of their per-pixel argmax; bool masks as given."""
    masks = _np(masks)
    if masks.ndim == 4 and masks.dtype != np.bool_:
        masks = masks.argmax(axis=1)[:, None] == np.arange(masks.shape[1])[None, :, None, None]
    return masks


def _true_objects(true_masks: np.ndarray, true_valid: Any) -> np.ndarray:
    """bool [N, T]: valid objects with at least one visible pixel."""
    visible = true_masks.sum(axis=2) > 0
    if true_valid is None:
        return visible
    true_valid = _np(true_valid).astype(bool)
    if true_valid.shape != visible.shape:
        raise InputError(
            f"expected true_valid of shape {list(visible.shape)}, got {list(true_valid.shape)}"
        )
    return visible & true_valid


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# --- counting --------------------------------------------------------------------------------
def count_accuracy(pred_counts: Any, true_counts: Any) -> float:
    """Fraction of images whose predicted object count equals the true count.

    Exact match (not e.g. mean absolute error) because an agent that miscounts by one object
    has the wrong state, however close the number.
    """
    pred, true = _np(pred_counts).reshape(-1), _np(true_counts).reshape(-1)
    if pred.shape != true.shape:
        raise InputError(
            f"expected as many predicted counts as true counts, got {pred.size} and {true.size}"
        )
    return float(np.mean(pred == true)) if pred.size else float("nan")


# --- segmentation ----------------------------------------------------------------------------
def _ari_scores(true_seg: Any, pred_seg: Any, ignore_background: bool) -> np.ndarray:
    """ARI per image, NaN where no pixel is evaluated."""
    t, p = _label_map(true_seg, "true_seg"), _label_map(pred_seg, "pred_seg")
    if t.shape != p.shape:
        raise InputError(
            f"expected pred_seg with {t.shape[1]} pixels per image like true_seg, got {p.shape[1]}"
        )
    n = t.shape[0]
    kt, kp = int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1
    cell = (np.arange(n)[:, None] * kt + t) * kp + p
    if ignore_background:
        cell = cell[t != 0]
    nij = np.bincount(cell.ravel(), minlength=n * kt * kp).reshape(n, kt, kp).astype(np.float64)
    a, b = nij.sum(axis=2), nij.sum(axis=1)
    points = a.sum(axis=1)
    rindex = (nij * (nij - 1)).sum(axis=(1, 2))  # 2 x pairs together in both
    aindex = (a * (a - 1)).sum(axis=1)  # 2 x pairs together in the truth
    bindex = (b * (b - 1)).sum(axis=1)  # 2 x pairs together in the prediction
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = aindex * bindex / (points * (points - 1))
        ari = (rindex - expected) / ((aindex + bindex) / 2 - expected)
    # Identical partitions (this includes "both a single cluster") score 1; these are exactly
    # the cases where the formula is 0/0.
    ari = np.where((rindex == aindex) & (rindex == bindex), 1.0, ari)
    ari[points == 0] = np.nan
    return ari


def adjusted_rand_index(true_seg: Any, pred_seg: Any, ignore_background: bool = False) -> float:
    """Mean over images of the adjusted Rand index between two pixel partitions.

    ARI is the Rand index (fraction of pixel pairs on which the partitions agree about "same
    segment or not") corrected for chance, so a random segmentation scores ~0 and a perfect
    one 1 whatever the label ids. ``true_seg`` int [N, H, W] (0 = background), ``pred_seg``
    int [N, H, W] or soft masks [N, K, H, W] (argmax per pixel).

    ``ignore_background=True`` is the foreground ARI of DeepMind's ``multi_object_datasets``
    ``segmentation_metrics.adjusted_rand_index``: pixels whose true label is 0 are excluded,
    so a model is not rewarded for the (easy, large) background. Same formula; where it is
    0/0, which happens exactly when the two partitions of the evaluated pixels are identical
    (e.g. both a single cluster: a one-object scene segmented perfectly), the score is 1, as
    DeepMind's "both single cluster" case and sklearn's ``adjusted_rand_score`` give. (DeepMind
    tests "single cluster" on the argmax over all pixels, background included, which leaves
    a perfect one-object scene at 0/0 = NaN; we test the evaluated pixels.) Images without
    evaluated pixels (no foreground) are left out of the mean.
    """
    return _nanmean(_ari_scores(true_seg, pred_seg, ignore_background))


def _iou_scores(true_masks: Any, pred_masks: Any, true_valid: Any) -> np.ndarray:
    """Mean matched IoU per image, NaN for images without (visible) objects."""
    t, p = _mask_pair(true_masks, _partition(pred_masks))
    objects = _true_objects(t, true_valid)
    inter = t @ p.transpose(0, 2, 1)  # [N, T, K]
    union = t.sum(axis=2)[:, :, None] + p.sum(axis=2)[:, None, :] - inter
    iou = inter / np.maximum(union, 1.0)
    scores = np.full(t.shape[0], np.nan)
    for i in np.flatnonzero(objects.any(axis=1)):
        m = iou[i, objects[i]]
        rows, cols = linear_sum_assignment(m, maximize=True)
        scores[i] = m[rows, cols].sum() / m.shape[0]  # unmatched objects add 0
    return scores


def mean_iou_hungarian(true_masks: Any, pred_masks: Any, true_valid: Any = None) -> float:
    """Mean over images of the mean IoU of each true object with its matched predicted mask.

    Per image: the IoU matrix between the true instance masks ``[T, H, W]`` (bool) and the
    predicted masks ``[K, H, W]`` (bool, or soft masks turned into a partition by per-pixel
    argmax) is matched one-to-one with the Hungarian algorithm maximising total IoU; the
    image's score is the sum of matched IoUs divided by the number of true objects (objects
    left unmatched when K < T count 0). Objects are the rows with ``true_valid`` (default all)
    and a non-empty mask: a fully occluded object has no pixels any model could recover.
    Images without objects are left out. One-to-one matching is the point: unlike "best IoU
    per object", one predicted mask covering two objects is credited to only one of them.
    """
    return _nanmean(_iou_scores(true_masks, pred_masks, true_valid))


def _duplicate_counts(
    true_masks: Any, pred_masks: Any, true_valid: Any, pred_presence: Any
) -> tuple[int, int]:
    t, p = _mask_pair(true_masks, pred_masks)
    objects = _true_objects(t, true_valid)
    inter = t @ p.transpose(0, 2, 1)  # [N, T, K] slot mass on each object
    with np.errstate(divide="ignore", invalid="ignore"):
        share = inter / t.sum(axis=2)[:, :, None]
        precision = inter / p.sum(axis=2)[:, None, :]
    claims = (share >= DUPLICATE_MIN_SHARE) & (precision > 0.5)
    if pred_presence is not None:
        claims &= (_np(pred_presence) > PRESENCE_THRESHOLD)[:, None, :]
    duplicated = (claims.sum(axis=2) >= 2) & objects
    return int(duplicated.sum()), int(objects.sum())


def duplicate_rate(
    true_masks: Any, pred_masks: Any, true_valid: Any = None, pred_presence: Any = None
) -> float:
    """Fraction of true objects explained by two or more slots (pooled over all objects).

    Duplicates are the failure the LDS paper (Li & Fisher, BMVC 2021) targets: two slots
    encoding the same object, which over-counts objects and wastes capacity. We could not find
    the paper's exact metric, so it is defined here, on masks: slot k *claims* object t when
    (a) its mask mass on the object is at least ``DUPLICATE_MIN_SHARE`` (20%) of the object's
    area and (b) more than half of the slot's total mask mass lies on that object (so a
    background slot never claims, and a slot claims at most one object). An object claimed by
    two or more slots (present ones, if ``pred_presence`` is given) is duplicated. Soft masks
    are used as they are, since a duplicate in a mixture model shows up as two slots sharing
    the object's pixels; splitting an object into two parts counts too, being the same
    "two slots for one object" failure. ``true_masks`` bool [N, T, H, W], ``pred_masks``
    [N, K, H, W] soft or bool; objects as in :func:`mean_iou_hungarian`.
    """
    dup, total = _duplicate_counts(true_masks, pred_masks, true_valid, pred_presence)
    return dup / total if total else float("nan")


# --- slot representations --------------------------------------------------------------------
def _cosine_scores(slots: Any, presence: Any) -> np.ndarray:
    s = _np(slots).astype(np.float64)
    if s.ndim != 3:
        raise InputError(f"expected slots as [N, K, D], got {list(s.shape)}")
    n, k = s.shape[:2]
    present = np.ones((n, k), bool) if presence is None else _np(presence) > PRESENCE_THRESHOLD
    unit = s / np.maximum(np.linalg.norm(s, axis=2, keepdims=True), 1e-12)
    cos = unit @ unit.transpose(0, 2, 1)
    pairs = present[:, :, None] & present[:, None, :] & ~np.eye(k, dtype=bool)[None]
    count = pairs.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (cos * pairs).sum(axis=(1, 2)) / count, np.nan)


def mean_pairwise_cosine(slots: Any, presence: Any = None) -> float:
    """Mean over images of the mean cosine similarity of slot vectors over pairs h != j.

    The LDS paper (Li & Fisher, BMVC 2021) suppresses duplicates by penalising the (squared)
    cosine similarity between pairs of slots; the plain mean cosine reports how similar the
    slots a model produces are (1 = identical directions). Only present slots (presence >
    ``PRESENCE_THRESHOLD``) count when ``presence`` is given; images with fewer than two such
    slots are left out.
    """
    return _nanmean(_cosine_scores(slots, presence))


# --- positions and classes -------------------------------------------------------------------
def _match_positions(
    pred_px: np.ndarray, present: np.ndarray, true_px: np.ndarray, valid: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (pred slot ids, true row ids, distances) of the Hungarian min-distance match."""
    out = []
    for i in range(pred_px.shape[0]):
        ps, ts = np.flatnonzero(present[i]), np.flatnonzero(valid[i])
        d = np.linalg.norm(pred_px[i, ps][:, None, :] - true_px[i, ts][None, :, :], axis=2)
        rows, cols = linear_sum_assignment(d)
        out.append((ps[rows], ts[cols], d[rows, cols]))
    return out


def _positions_to_pixels(position: np.ndarray, image_size: int | tuple[int, int]) -> np.ndarray:
    h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
    return np.stack(
        [unit_to_pixels(position[..., 0], w), unit_to_pixels(position[..., 1], h)], axis=-1
    )


def position_error(
    pred_position: Any,
    pred_presence: Any,
    true_centres: Any,
    true_valid: Any,
    image_size: int | tuple[int, int],
    presence_threshold: float = PRESENCE_THRESHOLD,
) -> dict[str, float]:
    """Localisation error in pixels of the present slots, after one-to-one matching.

    Per image, slots with presence > ``presence_threshold`` (positions in the contract's
    [-1, 1] units, converted with ``unit_to_pixels``; ``image_size`` is S or (H, W)) are
    matched to the valid true centres (pixel units) by the Hungarian algorithm minimising
    total Euclidean distance; min(#present, #true) pairs are matched. Reports the ``median``
    and ``mean`` distance over all matched pairs of all images and ``matched``, their number.
    Missing or extra detections do not enter the error (count accuracy reports them), and the
    median is given because a few wrong matches would dominate the mean.
    """
    pos = _np(pred_position).astype(np.float64)
    present = _np(pred_presence) > presence_threshold
    true_px = _np(true_centres).astype(np.float64)
    valid = _np(true_valid).astype(bool)
    matches = _match_positions(_positions_to_pixels(pos, image_size), present, true_px, valid)
    return _position_summary([m[2] for m in matches])


def _position_summary(distances: list[np.ndarray]) -> dict[str, float]:
    d = np.concatenate(distances) if distances else np.zeros(0)
    if not d.size:
        return {"median": float("nan"), "mean": float("nan"), "matched": 0.0}
    return {"median": float(np.median(d)), "mean": float(d.mean()), "matched": float(d.size)}


def cluster_mapping(pred_clusters: Any, labels: Any, num_clusters: int | None = None) -> np.ndarray:
    """int64 [num_clusters]: the class each cluster id is read as (-1: cluster never used).

    With as many clusters as classes (or fewer) the mapping is one-to-one, chosen by the
    Hungarian algorithm to maximise the number of correctly classified items: the standard
    unsupervised classification accuracy, which cannot be inflated by mapping two clusters to
    one class. With more clusters than classes (overclustering) one-to-one is impossible, and
    each cluster maps to its most frequent class (majority vote). Classes are 0 .. max(labels).
    """
    pred, lab = _np(pred_clusters).reshape(-1).astype(np.int64), _np(labels).reshape(-1).astype(
        np.int64
    )
    if pred.shape != lab.shape:
        raise InputError(f"expected as many cluster ids as labels, got {pred.size} and {lab.size}")
    if pred.size and (pred.min() < 0 or lab.min() < 0):
        raise InputError("expected non-negative cluster ids and labels")
    k = int(num_clusters) if num_clusters is not None else int(pred.max(initial=-1)) + 1
    c = int(lab.max(initial=-1)) + 1
    if pred.size and pred.max() >= k:
        raise InputError(f"expected cluster ids below num_clusters={k}, got {pred.max()}")
    table = np.bincount(pred * c + lab, minlength=k * c).reshape(k, c)
    mapping = np.full(k, -1, dtype=np.int64)
    if k <= c:
        rows, cols = linear_sum_assignment(table, maximize=True)
        mapping[rows] = cols
    else:
        used = table.sum(axis=1) > 0
        mapping[used] = table[used].argmax(axis=1)
    return mapping


def clustering_accuracy(pred_clusters: Any, labels: Any, num_clusters: int | None = None) -> float:
    """Fraction of items whose cluster, read through :func:`cluster_mapping`, is their class."""
    pred, lab = _np(pred_clusters).reshape(-1), _np(labels).reshape(-1)
    if not pred.size:
        return float("nan")
    mapping = cluster_mapping(pred, lab, num_clusters)
    return float(np.mean(mapping[pred.astype(np.int64)] == lab))


# --- aggregation -----------------------------------------------------------------------------
def summarise(values: Iterable[float]) -> dict[str, float]:
    """mean, sample std (ddof=1; 0 for one value), min, max and n, e.g. over seeds."""
    v = np.asarray(list(values), dtype=np.float64)
    if not v.size:
        return {
            "mean": float("nan"),
            "std": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "n": 0.0,
        }
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {
        "mean": float(v.mean()),
        "std": std,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": float(v.size),
    }


def evaluate_encoder(
    encoder: Encoder, scenes: Scenes, batch_size: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Every metric that applies to ``encoder`` on ``scenes``, as a flat dict of floats.

    Runs ``encoder.encode(images, deterministic=True)`` under ``torch.no_grad`` in eval mode
    (the previous mode is restored) on batches sent to ``device`` (the encoder must already
    be there). A slot is an object when its presence exceeds ``PRESENCE_THRESHOLD`` (0.5).

    Always: ``count_accuracy``, ``position_error_median_px`` / ``_mean_px`` /
    ``position_matched`` (see :func:`position_error`) and ``slot_cosine`` (over present slots).
    With ``masks``: ``ari`` (all pixels), ``fg_ari``, ``miou`` and ``duplicate_rate``. With
    ``class_probs`` and valid labels: ``clustering_accuracy`` of the argmax class of each present
    slot matched by position to a true object (the same matching as the position error),
    against that object's label, with ``encoder.num_classes`` clusters.
    """
    h, w = scenes.image_shape[1:]
    counts, distances, cosine, ari, fg_ari, iou = [], [], [], [], [], []
    duplicates, objects = 0, 0
    clusters, classes = [], []
    num_classes = None
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(scenes), batch_size):
                idx = slice(start, start + batch_size)
                images = torch.from_numpy(scenes.float_images(idx)).to(device)
                out = encoder.encode(images, deterministic=True)
                presence = _np(out.presence)
                present = presence > PRESENCE_THRESHOLD
                counts.append(present.sum(axis=1))
                cosine.append(_cosine_scores(out.slots, presence))
                pred_px = _positions_to_pixels(_np(out.position).astype(np.float64), (h, w))
                matches = _match_positions(
                    pred_px, present, scenes.centres[idx].astype(np.float64), scenes.valid[idx]
                )
                distances.extend(m[2] for m in matches)
                if out.masks is not None:
                    masks = _np(out.masks)
                    true_masks = scenes.instance_masks(idx)
                    ari.append(_ari_scores(scenes.segmentation[idx], masks, False))
                    fg_ari.append(_ari_scores(scenes.segmentation[idx], masks, True))
                    iou.append(_iou_scores(true_masks, masks, scenes.valid[idx]))
                    d, t = _duplicate_counts(true_masks, masks, scenes.valid[idx], presence)
                    duplicates, objects = duplicates + d, objects + t
                if out.class_probs is not None:
                    probs = _np(out.class_probs)
                    num_classes = encoder.num_classes or probs.shape[-1]
                    labels = scenes.labels[idx]
                    for i, (ps, ts, _) in enumerate(matches):
                        keep = labels[i, ts] >= 0
                        clusters.append(probs[i, ps[keep]].argmax(axis=-1))
                        classes.append(labels[i, ts[keep]])
    finally:
        encoder.train(was_training)

    position = _position_summary(distances)
    results = {
        "count_accuracy": count_accuracy(np.concatenate(counts), scenes.counts),
        "position_error_median_px": position["median"],
        "position_error_mean_px": position["mean"],
        "position_matched": position["matched"],
        "slot_cosine": _nanmean(np.concatenate(cosine)),
    }
    if ari:
        results["ari"] = _nanmean(np.concatenate(ari))
        results["fg_ari"] = _nanmean(np.concatenate(fg_ari))
        results["miou"] = _nanmean(np.concatenate(iou))
        results["duplicate_rate"] = duplicates / objects if objects else float("nan")
    if clusters and sum(c.size for c in clusters):
        results["clustering_accuracy"] = clustering_accuracy(
            np.concatenate(clusters), np.concatenate(classes), num_classes
        )
    return results
