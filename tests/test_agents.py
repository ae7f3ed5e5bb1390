"""Agents: the slot-set module's invariances, the RLlib env creator, and tiny PPO runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

import envs
from agents.environment import ObservationSource, encoder_tag, parse_encoder_spec, rllib_env_creator
from agents.modules import PixelCNNModule, SlotSetModule
from perception.errors import PerceptionError
from perception.models import build_model
from perception.train.checkpoint import atomic_save, encoder_state

K, D = 5, 7


def slot_module(**config) -> SlotSetModule:
    space = gym.spaces.Dict(
        {"slots": gym.spaces.Box(-10, 10, (K, D), np.float32), "mask": gym.spaces.Box(0, 1, (K,), np.float32)}
    )
    torch.manual_seed(0)
    return SlotSetModule(observation_space=space, action_space=gym.spaces.Discrete(4), model_config=config)


def outputs(module, slots, mask):
    batch = {Columns.OBS: {"slots": slots, "mask": mask}}
    with torch.no_grad():
        return module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS], module.compute_values(batch)


def test_set_module_is_permutation_invariant_and_ignores_masked_slots():
    module = slot_module(hidden=32, heads=4, layers=2)
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(6, K, D, generator=g)
    mask = (torch.rand(6, K, generator=g) > 0.4).float()
    mask[0] = 0.0  # a scene with no objects at all
    logits, values = outputs(module, slots, mask)
    assert logits.shape == (6, 4) and values.shape == (6,)
    assert torch.isfinite(logits).all() and torch.isfinite(values).all()

    perm = torch.randperm(K, generator=g)
    p_logits, p_values = outputs(module, slots[:, perm], mask[:, perm])
    torch.testing.assert_close(p_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_values, values, atol=1e-5, rtol=1e-5)

    noise = torch.randn(6, K, D, generator=g) * (1 - mask).unsqueeze(-1)
    n_logits, n_values = outputs(module, slots + noise, mask)
    torch.testing.assert_close(n_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n_values, values, atol=1e-5, rtol=1e-5)


def test_set_module_sees_how_many_identical_objects_there_are():
    module = slot_module(hidden=16, heads=2, layers=1)
    slots = torch.ones(2, K, D)
    mask = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0]])
    logits, _ = outputs(module, slots, mask)
    assert not torch.allclose(logits[0], logits[1])


def test_pixel_module_reads_uint8_images():
    space = gym.spaces.Box(0, 255, (1, 64, 64), np.uint8)
    module = PixelCNNModule(observation_space=space, action_space=gym.spaces.Discrete(4), model_config={"hidden": 16})
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits = module.forward_inference({Columns.OBS: images})[Columns.ACTION_DIST_INPUTS]
        values = module.compute_values({Columns.OBS: images})
    assert logits.shape == (3, 4) and values.shape == (3,) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 8, "channels": 8}, (1, 64, 64))
    path = tmp_path_factory.mktemp("agents") / "vae.pt"
    atomic_save(encoder_state(model, "untrained"), path)
    return str(path)


def test_env_creator_builds_a_batched_slot_vector_env(vae_checkpoint):
    config = ObservationSource("MultiMNIST-Collect-v0", vae_checkpoint).as_config()
    vec = rllib_env_creator({**config, "num_envs": 3})
    assert isinstance(vec, envs.VectorObjectSlots) and vec.num_envs == 3
    obs, _ = vec.reset(seed=0)
    assert obs["slots"].shape == (3, 1, 10)
    single = rllib_env_creator(config)
    assert isinstance(single, envs.ObjectSlots)
    oracle = rllib_env_creator({**ObservationSource("MultiMNIST-Count-v0", "oracle").as_config(), "num_envs": 2})
    assert oracle.single_observation_space["slots"].shape == (3, len(envs.ORACLE_LAYOUT))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


TINY = dict(num_envs=4, train_batch=128, minibatch=64, epochs=1, hidden=16)


def test_ppo_trains_checkpoints_and_resumes(ray_session, tmp_path, capsys):
    from agents.train import PPOSettings, RunConfig, train

    run = RunConfig(ObservationSource("MultiMNIST-Count-v0", "oracle"), timesteps=128, ppo=PPOSettings(**TINY))
    history = train(run, tmp_path, progress=False)
    assert len(history) == 1 and history[0]["env_steps"] >= 128
    assert math.isfinite(history[0]["episode_return_mean"])
    assert (tmp_path / "checkpoint").is_dir() and (tmp_path / "tb").is_dir()

    run.timesteps = 256
    history = train(run, tmp_path, resume=True, progress=False)
    assert len(history) == 2 and history[-1]["env_steps"] >= 256
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["env_steps"] for line in lines] == [h["env_steps"] for h in history]

    from agents.environment import make_env
    from agents.evaluate import EVAL_SEED, greedy_return, load_module
    from agents.evaluate import main as evaluate_main

    # one Count episode by hand: the highest-logit action on the first evaluation seed
    module, env = load_module(tmp_path), make_env(run.source)
    obs, _ = env.reset(seed=EVAL_SEED)
    batch = {key: torch.from_numpy(value)[None] for key, value in obs.items()}
    with torch.no_grad():
        action = int(module.forward_inference({Columns.OBS: batch})[Columns.ACTION_DIST_INPUTS][0].argmax())
    assert greedy_return(tmp_path, episodes=1) == env.step(action)[1]
    assert 0.0 <= greedy_return(tmp_path, episodes=20) <= 1.0

    # the bench remembers a run's greedy return for the checkpoint it scored, and only for it
    from agents.bench import cached_greedy_return

    steps = history[-1]["env_steps"]
    assert cached_greedy_return(tmp_path, 3, steps) == greedy_return(tmp_path, episodes=3)
    saved = json.loads((tmp_path / "greedy.json").read_text())
    (tmp_path / "greedy.json").write_text(json.dumps({**saved, "greedy_return": 42.0}))
    assert cached_greedy_return(tmp_path, 3, steps) == 42.0  # served, not replayed
    assert cached_greedy_return(tmp_path, 3, steps + 1) == greedy_return(tmp_path, episodes=3)  # newer checkpoint
    assert cached_greedy_return(tmp_path, 2, steps + 1) == greedy_return(tmp_path, episodes=2)  # other budget
    (tmp_path / "greedy.json").write_text('{"episodes": 2, "greedy_re')  # a write cut short: a miss, not an error
    assert cached_greedy_return(tmp_path, 2, steps + 1) == greedy_return(tmp_path, episodes=2)
    saved = json.loads((tmp_path / "greedy.json").read_text())
    (tmp_path / "greedy.json").write_text(json.dumps({**saved, "greedy_return": 7.0}))
    os.utime(tmp_path / "checkpoint", ns=(1, 1))  # the checkpoint was rewritten (e.g. retrained from scratch)
    assert cached_greedy_return(tmp_path, 2, steps + 1) == greedy_return(tmp_path, episodes=2)

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "run.json").write_text((tmp_path / "run.json").read_text())
    with pytest.raises(PerceptionError, match="no trained agent"):
        greedy_return(untrained, episodes=1)
    assert evaluate_main([str(untrained), str(tmp_path), "--episodes", "2"]) == 2  # reports, then goes on
    out, err = capsys.readouterr()
    assert "no trained agent" in err and json.loads(out.strip().splitlines()[-1])["run"] == str(tmp_path)


def test_bench_learning_end_to_end_and_re_invocation(ray_session, tmp_path):
    """`python -m agents.bench` trains each run, scores it greedily, writes JSON and curves; run
    again over the finished runs it neither retrains nor replays, and reports the same numbers."""
    import ray

    from agents.bench import main as bench_main

    argv = ["--envs", "Count", "--encoders", "oracle", "--seeds", "1", "--timesteps", "64",
            "--eval-episodes", "3", "--num-envs", "4", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert bench_main(argv) == 0
    assert ray.is_initialized()  # the caller's session is used and left running
    first = json.loads((tmp_path / "learning.json").read_text())
    (run,) = first["runs"]
    run_dir = Path(run["dir"])
    assert run_dir.parent == tmp_path / "runs" and (tmp_path / "curves-Count.png").is_file()
    assert math.isfinite(run["final_return"]) and 0.0 <= run["greedy_return"] <= 1.0
    assert first["summary"]["Count"]["oracle"]["fraction_of_oracle"] == pytest.approx(1.0)
    history = (run_dir / "history.jsonl").read_text()
    greedy = json.loads((run_dir / "greedy.json").read_text())
    (run_dir / "greedy.json").write_text(json.dumps({**greedy, "greedy_return": 0.125}))
    assert bench_main(argv) == 0
    (again,) = json.loads((tmp_path / "learning.json").read_text())["runs"]
    assert (run_dir / "history.jsonl").read_text() == history  # not retrained
    assert again["greedy_return"] == 0.125 and again["final_return"] == run["final_return"]  # not replayed


def test_bench_summary_keeps_failed_evaluations_apart():
    from agents.bench import summarize_runs

    runs = [
        {"env": "Count", "encoder": "air", "final_return": 0.8, "greedy_return": 0.9},
        {"env": "Count", "encoder": "air", "final_return": 0.6, "eval_error": "RuntimeError: x"},
        {"env": "Count", "encoder": "oracle", "final_return": 1.0, "greedy_return": 1.0},
        {"env": "Count", "encoder": "oracle", "error": "RuntimeError: y"},
    ]
    summary = summarize_runs(runs)["Count"]
    air, oracle = summary["air"], summary["oracle"]
    assert air["final_return_mean"] == pytest.approx(0.7) and air["fraction_of_oracle"] == pytest.approx(0.7)
    assert air["greedy_return_per_seed"] == [0.9] and air["greedy_fraction_of_oracle"] == pytest.approx(0.9)
    assert air["failed_evaluations"] == 1 and oracle["failed_runs"] == 1


@pytest.mark.parametrize("encoder", ["vae", "pixels"])
def test_ppo_iteration_on_slots_and_pixels(ray_session, vae_checkpoint, encoder):
    from agents.train import PPOSettings, RunConfig, build_algorithm, summarize

    name = vae_checkpoint if encoder == "vae" else encoder
    source = ObservationSource("MultiMNIST-Collect-v0", name, backend="torch")
    algo = build_algorithm(RunConfig(source, timesteps=128, ppo=PPOSettings(**TINY)))
    try:
        row = summarize(algo.train())
        learner = algo.train()["learners"]["default_policy"]
    finally:
        algo.stop()
    assert row["env_steps"] >= 128
    assert math.isfinite(learner["total_loss"]) and math.isfinite(learner["vf_loss"])


def test_encoder_spec_sets_k_and_fuses_encoders(tmp_path):
    torch.manual_seed(0)
    air = build_model("air", {"hidden": 16, "embed": 16, "mlp": 16, "what_dim": 4}, (1, 64, 64))
    path = tmp_path / "air.pt"
    atomic_save(encoder_state(air, "untrained"), path)
    source = ObservationSource("MultiMNIST-Collect-v0", f"{path}@4")
    assert source.members == [(str(path), 4, None)] and source.resolved_backends() == ["torch"]
    assert ObservationSource("MultiMNIST-Collect-v0", "air@4").resolved_backends() == ["torch"]  # ONNX K is fixed
    vec = rllib_env_creator({**source.as_config(), "num_envs": 2})
    assert vec.single_observation_space["slots"].shape == (4, 3 + 4 + 2)

    fused = rllib_env_creator(ObservationSource("MultiMNIST-Collect-v0", f"{path}@4+{path}@2").as_config())
    obs, _ = fused.reset(seed=0)
    assert obs["slots"].shape == (4, 7 + 7 + 1 + 2)  # the first encoder's rows, the second's features
    for bad in ("air@0", "air@x", "air+"):
        with pytest.raises(PerceptionError, match="NAME@K"):
            ObservationSource("MultiMNIST-Collect-v0", bad)


def test_encoder_spec_sets_one_encoders_representation():
    spec = "lavae@4+/tmp/x/dair.onnx:prototypes"
    assert parse_encoder_spec(spec) == [("lavae", 4, None), ("/tmp/x/dair.onnx", None, "prototypes")]
    assert encoder_tag(spec) == "lavae@4+dair-prototypes"  # run directories get no colon
    assert parse_encoder_spec("c:/x/air.onnx") == [("c:/x/air.onnx", None, None)]  # not a representation
    with pytest.raises(PerceptionError, match="NAME"):
        parse_encoder_spec("air+:prototypes")


def test_slot_and_prototype_runs_get_their_own_default_directory():
    from agents.train import parse_args

    slots = parse_args(["--env", "MultiMNIST-Count-v0", "--encoder", "dair"])[1].out
    prototypes = parse_args(["--env", "MultiMNIST-Count-v0", "--encoder", "dair", "--representation", "prototypes"])[1].out
    assert slots == "runs/agents/MultiMNIST-Count-v0-dair-s0"
    assert prototypes == "runs/agents/MultiMNIST-Count-v0-dair-prototypes-s0"
    oracle = parse_args(["--env", "MultiMNIST-Count-v0", "--encoder", "oracle", "--representation", "prototypes"])[1].out
    assert oracle == "runs/agents/MultiMNIST-Count-v0-oracle-s0"  # no encoder, no representation


def test_probe_reports_what_the_slots_hold(vae_checkpoint, tmp_path):
    from agents.probe import main

    out = tmp_path / "probe"
    assert main(["--encoders", vae_checkpoint, "--episodes", "2", "--scenes", "30", "--out", str(out)]) == 0
    result = json.loads((out / "probe.json").read_text())
    collect, odd = result["collect"][vae_checkpoint], result["oddoneout"][vae_checkpoint]
    assert 0.0 <= collect["agent_has_slot"] <= 1.0 and collect["frames"] > 0
    assert odd == {"scenes": 30, "scenes_matched": 0.0}  # one slot cannot hold three digits
    assert main(["--encoders", vae_checkpoint, "--probes", "nope", "--out", str(out)]) == 2


def test_collect_probe_reads_the_target_class_where_the_slots_hold_it():
    from agents.probe import _collect_frames, probe_collect

    frames, infos, targets = _collect_frames(6)
    state = {"next": 0}

    def converter(batch, parity_in_slots):
        """Slots at the true digit centres; the one feature is the digit's parity, or a constant."""
        rows = infos[state["next"] : state["next"] + len(batch)]
        state["next"] += len(batch)
        xy = np.array([i["positions"] for i in rows]) / 32.0 - 1.0  # pixels -> contract units
        parity = np.array([i["labels"] % 2 for i in rows], np.float32)[..., None]
        feature = parity if parity_in_slots else np.zeros_like(parity)
        return {"slots": np.concatenate([feature, xy], -1), "mask": np.array([i["present"] for i in rows], np.float32)}

    held = probe_collect(lambda b: converter(b, True), frames, infos, targets)
    state["next"] = 0
    blind = probe_collect(lambda b: converter(b, False), frames, infos, targets)
    assert held["digits_with_slot"] == 1.0 and held["target_probe_logistic"] == 1.0
    assert held["return_ceiling_of_best"] == 1.0
    assert blind["target_probe_logistic"] <= blind["target_base_rate"] + 0.05 < 1.0
    assert blind["return_ceiling_of_best"] < 0.9  # it takes every digit (or none), non-targets too
