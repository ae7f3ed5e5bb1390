"""Run an exported perception encoder with onnxruntime and numpy only (no torch, no perception).

    python export/examples/minimal_onnxruntime.py perception/pretrained/air.onnx
"""

import json
import sys

import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
channels, height, width = json.loads(meta["perception.image_shape"])
print("model:", meta["perception.model"], "| trained on:", meta["perception.training_data"])
print("slot columns:", json.loads(meta["perception.slot_layout"]))

# float32 [N, C, H, W] in [0, 1]; any batch size N.
images = np.random.default_rng(0).random((4, channels, height, width), dtype=np.float32)
outputs = session.run(None, {"image": images})
for output, value in zip(session.get_outputs(), outputs):
    print(f"{output.name}: {list(value.shape)}")

slots, presence, position = outputs[:3]  # always these three first, in this order
for k in range(slots.shape[1]):
    x, y = position[0, k]  # x right, y down, -1 / +1 at the image edges
    print(f"image 0, slot {k}: presence {presence[0, k]:.2f} at x={x:+.2f} y={y:+.2f}")
