"""Scene batches with ground truth, as numpy arrays.

Images are stored as uint8 to keep large cached datasets small (a 64x64 grayscale scene is
4 KB); :meth:`Scenes.float_images` converts to the contract's float32 in [0, 1].

Coordinates are continuous pixel units: pixel column ``i`` covers ``[i, i + 1)``, so a digit
pasted at integer top-left ``(x0, y0)`` with size ``s`` has centre ``(x0 + s/2, y0 + s/2)``
and box ``(x0, y0, x0 + s, y0 + s)``. ``perception.contract.pixels_to_unit`` maps them to
the contract's [-1, 1] positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scenes:
    images: np.ndarray  # uint8 [N, C, H, W]
    counts: np.ndarray  # int64 [N], number of objects
    centres: np.ndarray  # float32 [N, Kmax, 2], (x, y) pixel units; 0 where invalid
    boxes: np.ndarray  # float32 [N, Kmax, 4], (x0, y0, x1, y1) pixel units; 0 where invalid
    labels: np.ndarray  # int64 [N, Kmax], class / shape id; -1 where invalid
    valid: np.ndarray  # bool [N, Kmax], which object rows exist
    segmentation: np.ndarray  # uint8 [N, H, W], 0 = background, k + 1 = object row k
    description: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def max_objects(self) -> int:
        return int(self.valid.shape[1])

    def float_images(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        imgs = self.images if index is None else self.images[index]
        return imgs.astype(np.float32) / 255.0

    def instance_masks(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """bool [n, Kmax, H, W] from the segmentation map."""
        seg = self.segmentation if index is None else self.segmentation[index]
        ids = np.arange(1, self.max_objects + 1, dtype=np.uint8)
        return seg[:, None, :, :] == ids[None, :, None, None]

    def subset(self, index: np.ndarray | slice) -> "Scenes":
        return Scenes(
            images=self.images[index],
            counts=self.counts[index],
            centres=self.centres[index],
            boxes=self.boxes[index],
            labels=self.labels[index],
            valid=self.valid[index],
            segmentation=self.segmentation[index],
            description=self.description,
            extra={k: v[index] for k, v in self.extra.items()},
        )
