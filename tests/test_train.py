"""The shared trainer: exact resume, atomic checkpoints, NaN guard, clear CLI errors, Ray Train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perception.errors import CheckpointError, NonFiniteLossError, OutputExistsError, PerceptionError
from perception.train import TrainConfig, train
from perception.train.checkpoint import read_checkpoint

TINY = dict(model="vae", dataset="multi-mnist", steps=6, batch_size=8, train_size=64, eval_size=16,
            checkpoint_every=3, log_every=2, image_every=3, model_options={"latent_dim": 4, "channels": 8})
ROOT = Path(__file__).resolve().parents[1]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "encoder.pt")["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_writes_config_checkpoint_metrics_and_tensorboard(tmp_path):
    metrics = train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"] == "vae"
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 6
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 6
    assert saved == {k: (None if v != v else pytest.approx(v)) for k, v in metrics.items()}  # NaN -> null
    assert "neg_elbo" in saved and "count_accuracy" in saved
    assert any((run / "tb").iterdir())


def test_crash_then_resume_equals_uninterrupted_run(tmp_path):
    train(TrainConfig(**TINY), tmp_path / "straight", progress=False)

    def crash(step: int) -> None:
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainConfig(**TINY), tmp_path / "crashed", progress=False, on_step=crash)
    assert read_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["step"] == 3  # lost at most one interval
    train(TrainConfig(**TINY), tmp_path / "crashed", resume=True, progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "crashed")


def test_resume_can_extend_a_finished_run(tmp_path):
    train(TrainConfig(**TINY), tmp_path / "long", progress=False)
    short = {**TINY, "steps": 3}
    train(TrainConfig(**short), tmp_path / "extended", progress=False)
    train(TrainConfig(**TINY), tmp_path / "extended", resume=True, progress=False)
    assert_same_weights(tmp_path / "long", tmp_path / "extended")


def test_forked_run_trains_at_the_new_configurations_group_rates(tmp_path):
    """bench segmentation's --continue-from forks a run under new options; every optimiser group
    (the model's and a group with its own rate, here D-VAE's prototypes) must follow them."""
    from perception.bench.segmentation import fork_run
    from perception.train.loop import build_run_model
    from perception.train.optim import make_optimizer

    base = dict(model="dvae", dataset="mnist", steps=2, batch_size=8, train_size=64, eval_size=16,
                checkpoint_every=2, log_every=2, image_every=0,
                model_options={"channels": 4, "hidden": 8, "split_every": 0, "extra_classes": 0})
    train(TrainConfig(**base), tmp_path / "source", progress=False)
    forked = TrainConfig(**{**base, "steps": 3, "lr": 0.25 * TrainConfig(**base).lr,
                            "model_options": {**base["model_options"], "prototype_lr": 3.0}})
    fork_run(tmp_path / "source", tmp_path / "fork", forked)
    train(forked, tmp_path / "fork", resume=True, progress=False)
    saved = [g["lr"] for g in read_checkpoint(tmp_path / "fork" / "checkpoint.pt")["optimizer"]["param_groups"]]
    shape = tuple(read_checkpoint(tmp_path / "fork" / "encoder.pt")["image_shape"])
    expected = [g["lr"] for g in make_optimizer(build_run_model(forked, shape), forked.lr).param_groups]
    assert saved == pytest.approx(expected) and len(set(saved)) == 2


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    """A real kill -9 at an arbitrary moment: the atomic checkpoint is always loadable."""
    cfg = {**TINY, "steps": 400, "checkpoint_every": 2, "log_every": 50, "image_every": 0}
    args = ["--model", "vae", "--dataset", "multi-mnist", "--steps", "400", "--batch-size", "8",
            "--train-size", "64", "--eval-size", "16", "--checkpoint-every", "2", "--log-every", "50",
            "--image-every", "0", "--model-option", "latent_dim=4", "--model-option", "channels=8", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "perception.pretrain", *args, "--out", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "encoder.pt").exists(), "the run finished before it could be killed"
    killed_at = read_checkpoint(run / "checkpoint.pt")["step"]
    assert 0 < killed_at < 400
    resumed = subprocess.run([sys.executable, "-m", "perception.pretrain", "--out", str(run), "--resume", "--no-progress"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    torch.set_num_threads(1)
    train(TrainConfig(**cfg), tmp_path / "straight", progress=False)
    assert_same_weights(tmp_path / "straight", run)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    from perception.models.vae import ConvVAE

    original = ConvVAE.loss

    def poisoned(self, batch, step):
        result = original(self, batch, step)
        if step >= 4:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(ConvVAE, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4.*last good checkpoint"):
        train(TrainConfig(**{**TINY, "checkpoint_every": 2}), tmp_path / "run", progress=False)
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_existing_output_is_never_overwritten(tmp_path):
    train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "encoder.pt").read_bytes()
    with pytest.raises(OutputExistsError, match="--resume"):
        train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "encoder.pt").read_bytes() == before


def test_resume_rejects_a_changed_configuration(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 3}), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "run", resume=True, progress=False)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'; valid: "),
        (["--dataset", "nope"], "unknown dataset 'nope'; valid: "),
        (["--estimator", "nope"], "unknown estimator 'nope'; valid: "),
        (["--model", "vae", "--estimator", "reinforce"], "has no discrete latent"),
        (["--data-dir", "/does/not/exist"], "/does/not/exist"),
        (["--model", "vae", "--model-option", "no_such_option=3"], "unknown model 'vae' option(s) no_such_option; valid: "),
        (["--model", "vae", "--model-option", "latent_dim=2.5"], "model 'vae' option latent_dim must be an integer, got 2.5"),
    ],
)
def test_pretrain_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    result = cli("perception.pretrain", *args, "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_cli_and_its_errors(tmp_path):
    train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    out = tmp_path / "eval.json"
    ok = cli("perception.evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", "multi-mnist", "--size", "16",
             "--out", str(out), "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert "count_accuracy" in json.loads(out.read_text())

    again = cli("perception.evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", "multi-mnist", "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    bad = cli("perception.evaluate", "--checkpoint", str(corrupt), "--dataset", "multi-mnist")
    assert bad.returncode == 2 and "corrupt" in bad.stderr and "Traceback" not in bad.stderr

    shape = cli("perception.evaluate", "--checkpoint", str(tmp_path / "run"), "--dataset", "tetris", "--size", "4")
    assert shape.returncode == 2 and "expects [1, 64, 64]" in shape.stderr


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    from perception.train.checkpoint import load_encoder_checkpoint

    train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    state = read_checkpoint(tmp_path / "run" / "encoder.pt")
    state["model_config"]["latent_dim"] = 5
    torch.save(state, tmp_path / "mismatched.pt")
    with pytest.raises(CheckpointError, match="do not fit model 'vae'"):
        load_encoder_checkpoint(tmp_path / "mismatched.pt")


def test_encoder_rejects_bad_images():
    from perception.models import build_model

    model = build_model("vae", {"latent_dim": 4, "channels": 8}, (1, 64, 64))
    good = torch.rand(2, 1, 64, 64)
    assert model(good).slots.shape == (2, 1, 4)
    for bad, what in [(good.double(), "dtype"), (torch.rand(2, 3, 64, 64), "shape"), (good * 255, "values"),
                      (good.numpy(), "torch.Tensor")]:
        with pytest.raises(PerceptionError, match=what):
            model(bad)


@pytest.mark.slow
def test_two_worker_ray_train_run(tmp_path):
    ray = pytest.importorskip("ray")
    from perception.train.distributed import train_distributed

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TrainConfig(**{**TINY, "num_workers": 2, "steps": 4, "checkpoint_every": 2})
        metrics = train_distributed(cfg, tmp_path / "run", progress=False)
    finally:
        ray.shutdown()
    run = tmp_path / "run"
    state = read_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 4 and len(state["sampler_rng"]) == 2  # both ranks' streams are saved
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert metrics.get("steps") == 4
