"""ONNX export: every registered model exports, matches torch, carries its metadata; failures write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import Tensor

import perception
import perception.pretrained
from export import OnnxEncoder, export_onnx
from export.__main__ import main as cli_main
from export.bundle import main as bundle_main
from export.onnx_export import UNKNOWN_TRAINING_DATA
from perception.cli import run_cli
from perception.contract import Encoder, EncoderOutput
from perception.data import default_image_shape
from perception.errors import OutputExistsError, PerceptionError
from perception.models import MODELS, build_model, model_class
from perception.train.checkpoint import atomic_save, encoder_state

ROOT = Path(__file__).resolve().parents[1]


def untrained(name: str, options: dict | None = None) -> Encoder:
    torch.manual_seed(0)
    return build_model(name, options or {}, default_image_shape(model_class(name).default_dataset)).eval()


def small_vae() -> Encoder:
    torch.manual_seed(0)
    return build_model("vae", {"latent_dim": 4, "channels": 8}, (1, 32, 32)).eval()


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_exports_and_matches_torch(name, tmp_path):
    model = untrained(name)
    path = tmp_path / f"{name}.onnx"
    # The exporter's own check at batch sizes 1 and 3 (its default adds 64: minutes for IODINE on a shared CPU).
    result = export_onnx(model, path, batch_sizes=(1, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # one file: weights inside, no temp left
    assert max(result.max_abs_diff.values()) <= 1e-4

    # Independently of the exporter's own check: new inputs, new batch sizes, through OnnxEncoder.
    encoder = OnnxEncoder(path, device="cpu")
    for n in (1, 2, 5):
        images = torch.rand(n, *model.image_shape, generator=torch.Generator().manual_seed(100 + n))
        with torch.inference_mode():
            expected = model(images).as_dict()
        got = encoder(images.numpy())
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key].shape == tuple(value.shape)
            assert abs(torch.from_numpy(got[key]) - value).max() <= 1e-4, (key, n)

    assert encoder.model_name == name
    assert encoder.image_shape == model.image_shape
    assert encoder.num_slots == model.num_slots and encoder.slot_layout == list(model.slot_layout)
    assert encoder.training_data == UNKNOWN_TRAINING_DATA and encoder.metadata.version == perception.__version__
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["image"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_iodine_with_logistic_pixels_5x5_kernels_and_no_lstm_exports_and_matches_torch(tmp_path):
    options = {"likelihood": "logistic", "sigma": 0.03, "kernel_size": 5, "recurrent": False, "num_slots": 3,
               "latent_dim": 4, "decoder_channels": 8, "decoder_layers": 2, "refine_channels": 8, "hidden": 16}
    torch.manual_seed(0)
    model = build_model("iodine", options, (3, 35, 35)).eval()
    result = export_onnx(model, tmp_path / "iodine.onnx", batch_sizes=(1, 3))
    assert max(result.max_abs_diff.values()) <= 1e-4


def test_metadata_is_json_other_runtimes_can_read(tmp_path):
    model = small_vae()
    model.training_data = "multi-mnist canonical: 64x64"
    path = tmp_path / "vae.onnx"
    export_onnx(model, path, batch_sizes=(1, 3))
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["perception.model"] == "vae"
    assert json.loads(props["perception.image_shape"]) == [1, 32, 32]
    assert props["perception.num_slots"] == "1"
    assert json.loads(props["perception.slot_layout"]) == ["z_0", "z_1", "z_2", "z_3"]
    assert props["perception.training_data"] == "multi-mnist canonical: 64x64"
    assert props["perception.version"] == perception.__version__


def test_failed_verification_writes_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    monkeypatch.setattr("export.verify.max_abs_diff", lambda expected, got: 0.5)
    path = tmp_path / "vae.onnx"
    with pytest.raises(PerceptionError, match="does not match torch: output 'slots' differs by 0.5"):
        export_onnx(small_vae(), path, batch_sizes=(1,))
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"previous export")
    with pytest.raises(PerceptionError, match="does not match torch"):
        export_onnx(small_vae(), path, overwrite=True, batch_sizes=(1,))
    assert path.read_bytes() == b"previous export" and list(tmp_path.iterdir()) == [path]


class BatchFixingEncoder(Encoder):
    """``len(x)`` turns the batch size into a constant while tracing (what torch.export rejects)."""

    Config = dict
    name = "batch-fixing"

    def __init__(self) -> None:
        super().__init__({}, (1, 8, 8))
        self.linear = torch.nn.Linear(64, 3)

    num_slots = 1  # type: ignore[assignment]
    slot_layout = ["a", "b", "c"]  # type: ignore[assignment]

    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        n = len(images)
        return EncoderOutput(
            slots=self.linear(images.reshape(n, 64)).unsqueeze(1),
            presence=images.new_ones(n, 1),
            position=images.new_zeros(n, 1, 2),
        )

    def loss(self, batch, step):
        raise NotImplementedError


def test_a_batch_fixing_model_is_refused_with_the_reason(tmp_path):
    with pytest.raises(PerceptionError, match="fixes the batch size while tracing"):
        export_onnx(BatchFixingEncoder(), tmp_path / "fixed.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    model = small_vae()
    checkpoint = tmp_path / "encoder.pt"
    atomic_save(encoder_state(model, "tiny test data"), checkpoint)
    out = tmp_path / "exported.onnx"
    out.write_bytes(b"keep me")
    assert run_cli(cli_main, [str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {out} exists; pass --overwrite (overwrite=True) to replace it"
    assert out.read_bytes() == b"keep me"

    assert run_cli(cli_main, [str(tmp_path), "--out", str(out), "--overwrite"]) == 0  # a run directory
    assert capsys.readouterr().out.startswith(f"wrote {out} (vae: slots [1, 1, 4]")
    assert OnnxEncoder(out).training_data == "tiny test data"
    with pytest.raises(OutputExistsError):
        export_onnx(checkpoint, out)


def test_cli_unknown_name_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "export", "no-such-encoder", "--out", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: 'no-such-encoder' is neither a checkpoint file nor a bundled encoder")
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_bundle_reexports_all_checkpoints_and_reports_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(perception.pretrained, "PRETRAINED_DIR", tmp_path)
    atomic_save(encoder_state(small_vae(), "tiny test data"), tmp_path / "tiny.pt")
    (tmp_path / "broken.pt").write_bytes(b"half a checkpoint")
    assert run_cli(bundle_main, []) == 1
    out = capsys.readouterr().out
    assert "broken: FAILED: checkpoint" in out and "1 of 2 failed: broken" in out
    assert OnnxEncoder("tiny").training_data == "tiny test data"
    (tmp_path / "broken.pt").unlink()
    assert run_cli(bundle_main, ["tiny"]) == 0  # rerunnable: replaces its own output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.pt"]


def test_bench_times_both_runtimes_in_wall_and_cpu_time(tmp_path):
    from export.bench import bench_encoder, markdown_table

    model = small_vae()
    path = export_onnx(model, tmp_path / "vae.onnx", batch_sizes=(1,)).path
    row = {"name": "vae", "source": "untrained", **bench_encoder(model, path, threads=1, repeats=4, budget_s=5.0)}
    assert row["max_abs_diff"] <= 1e-4
    for n in (1, 64):
        timing = row[f"batch_{n}"]
        assert timing["repeats"] >= 3
        assert all(timing[k] > 0 for k in ("torch_ms", "onnxruntime_ms", "torch_cpu_ms", "onnxruntime_cpu_ms"))
        assert timing["speedup_cpu"] == pytest.approx(timing["torch_cpu_ms"] / timing["onnxruntime_cpu_ms"])
    assert markdown_table([row]).splitlines()[-1].count("|") == markdown_table([]).splitlines()[0].count("|")
