"""OnnxEncoder: the contract's behaviour through onnxruntime, its errors, and other runtimes."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import perception.pretrained
from export import OnnxEncoder, export_onnx
from export.runtime import MAX_THREADS, session_options
from perception.contract import EncoderOutput
from perception.errors import CheckpointError, InputError, PerceptionError
from perception.models import build_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "export" / "examples"
SHAPE = (1, 32, 32)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_model("vae", {"latent_dim": 4, "channels": 8}, SHAPE).eval()


@pytest.fixture(scope="module")
def onnx_path(vae, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "vae.onnx"
    export_onnx(vae, path, batch_sizes=(1, 3))
    return path


@pytest.fixture(scope="module")
def encoder(onnx_path) -> OnnxEncoder:
    return OnnxEncoder(onnx_path, device="cpu")


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def test_properties_come_from_the_metadata(encoder, vae):
    assert encoder.model_name == "vae"
    assert encoder.image_shape == SHAPE
    assert encoder.num_slots == 1
    assert encoder.slot_layout == vae.slot_layout
    assert encoder.output_names == ["slots", "presence", "position"]
    assert encoder.training_data.startswith("unknown")


def test_call_and_encode_match_torch_at_any_batch_size(encoder, vae):
    for n in (1, 2, 17):
        x = images(n)
        out = encoder(x)
        assert isinstance(out, dict) and list(out) == encoder.output_names
        with torch.inference_mode():
            expected = vae(torch.from_numpy(x)).as_dict()
        for name, value in expected.items():
            assert isinstance(out[name], np.ndarray) and out[name].shape == tuple(value.shape)
            assert np.abs(out[name] - value.numpy()).max() <= 1e-4
        as_torch = encoder.encode(torch.from_numpy(x))  # the torch encoders' call, unchanged
        assert isinstance(as_torch, EncoderOutput) and as_torch.class_probs is None
        torch.testing.assert_close(as_torch.slots, torch.from_numpy(out["slots"]))


def test_pickles_for_worker_processes(encoder):
    copy = pickle.loads(pickle.dumps(encoder))
    assert copy.path == encoder.path and copy.providers == encoder.providers
    np.testing.assert_array_equal(copy(images(2))["slots"], encoder(images(2))["slots"])


def test_sampling_is_refused(encoder):
    with pytest.raises(PerceptionError, match="deterministic"):
        encoder.encode(images(1), deterministic=False)


@pytest.mark.parametrize(
    "bad, message",
    [
        (images(2).astype(np.float64), r"float32 \[N, 1, 32, 32\] in \[0, 1\], got dtype float64 \(cast"),
        ((images(2) * 255).astype(np.uint8), r"got dtype uint8 \(divide uint8 images by 255\)"),
        (images(2)[:, :, :16], r"got shape \[2, 1, 16, 32\]"),
        (np.repeat(images(2), 3, axis=1), r"got shape \[2, 3, 32, 32\]"),
        (images(1)[0], r"got shape \[1, 32, 32\]"),
        (images(2) * 255, r"got values in \[0.\d+, 255\]"),
        (np.full((1, *SHAPE), np.nan, np.float32), r"got values in \[nan"),
        (images(0), "empty batch"),
        (images(1).tolist(), "expected a numpy array of float32"),
        (torch.rand(2, *SHAPE, dtype=torch.float64), "got dtype float64"),
    ],
    ids=["float64", "uint8", "height", "channels", "unbatched", "range", "nan", "empty", "list", "torch-float64"],
)
def test_bad_input_is_one_clear_error(encoder, bad, message):
    with pytest.raises(InputError, match=message):
        encoder(bad)


def test_check_range_false_skips_only_the_value_check(encoder):
    bright = images(2) * 255  # out of range: the caller vouched for it, so it runs
    assert encoder(bright, check_range=False)["slots"].shape[0] == 2
    with pytest.raises(InputError, match="dtype float64"):
        encoder(images(2).astype(np.float64), check_range=False)
    with pytest.raises(InputError, match="got shape"):
        encoder(images(2)[:, :, :16], check_range=False)


def test_torch_float32_input_is_accepted(encoder):
    x = torch.from_numpy(images(3))
    np.testing.assert_array_equal(encoder(x)["slots"], encoder(x.numpy())["slots"])


def test_missing_corrupt_and_foreign_files(onnx_path, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        OnnxEncoder(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not an ONNX model"):
        OnnxEncoder(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or not an ONNX model"):
        OnnxEncoder(truncated)
    model = onnx.load(onnx_path)
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, foreign)
    with pytest.raises(CheckpointError, match="no perception metadata"):
        OnnxEncoder(foreign)


def test_short_names_resolve_to_the_bundled_directory(onnx_path, tmp_path, monkeypatch):
    monkeypatch.setattr(perception.pretrained, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(CheckpointError, match=r"bundled ONNX encoders: \(none bundled\)"):
        OnnxEncoder("toy")
    (tmp_path / "toy.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="python -m export.bundle"):
        OnnxEncoder("toy")
    shutil.copy(onnx_path, tmp_path / "toy.onnx")
    assert OnnxEncoder("toy").path == tmp_path / "toy.onnx"


def test_cpu_session_without_cuda_noise(onnx_path, capfd, caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: onnxruntime may legitimately use CUDA")
    assert OnnxEncoder(onnx_path).providers == ["CPUExecutionProvider"]
    # A machine with a driver but without CUDA libraries: requested, fails to load, CPU, logged only.
    monkeypatch.setattr("export.runtime._cuda_driver_present", lambda: True)
    with caplog.at_level(logging.INFO, logger="export.runtime"):
        assert OnnxEncoder(onnx_path, device="auto").providers == ["CPUExecutionProvider"]
    assert "running vae.onnx on CPU" in caplog.text
    with pytest.raises(PerceptionError, match="cannot use CUDA here"):
        OnnxEncoder(onnx_path, device="cuda")
    captured = capfd.readouterr()
    assert "CUDA" not in captured.err + captured.out


def test_threads_suit_small_machines():
    options = session_options()
    assert options.intra_op_num_threads == min(os.cpu_count() or 1, MAX_THREADS)
    assert options.inter_op_num_threads == 1


def test_importing_export_loads_no_torch():
    code = (
        "import sys, export; export.OnnxEncoder; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_minimal_example_needs_only_onnxruntime_and_numpy(onnx_path, tmp_path):
    script = EXAMPLES / "minimal_onnxruntime.py"
    code = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert not {'torch', 'perception', 'export'} & set(sys.modules), 'project imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(script), str(onnx_path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "slots: [4, 1, 4]" in result.stdout and "position: [4, 1, 2]" in result.stdout
    assert result.stderr == ""


def test_node_example(onnx_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    example = EXAMPLES / "node"
    found = subprocess.run([node, "-e", "require.resolve('onnxruntime-node')"], cwd=example, capture_output=True)
    if found.returncode != 0:
        pytest.skip("onnxruntime-node is not installed (cd export/examples/node && npm install --onnxruntime-node-install=skip)")
    result = subprocess.run([node, "index.js", str(onnx_path)], cwd=example, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["slots: [4, 1, 4]", "presence: [4, 1]", "position: [4, 1, 2]"]
