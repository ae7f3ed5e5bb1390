"""The Multi-MNIST environments: Gymnasium compliance, seeding, and truthful state."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.base import ORACLE_LAYOUT
from envs.collect import AGENT_SIZE, STEP
from envs.scene import DIGIT_SIZE, NUM_CLASSES, to_unit
from perception.errors import PerceptionError


def make(env_id: str, **kwargs) -> gym.Env:
    return gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped


@pytest.mark.parametrize("obs_mode", ["pixels", "oracle"])
@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_check_env(env_id, obs_mode):
    check_env(make(env_id, obs_mode=obs_mode, render_mode="rgb_array"), skip_render_check=False)


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_seeding_is_deterministic(env_id):
    def rollout(seed):
        env = make(env_id)
        env.action_space.seed(seed)
        obs, info = env.reset(seed=seed)
        frames, rewards = [obs], []
        for _ in range(30):
            obs, r, term, trunc, info = env.step(env.action_space.sample())
            frames.append(obs)
            rewards.append(r)
            if term or trunc:
                frames.append(env.reset()[0])
        return np.stack(frames), rewards

    a, ra = rollout(3)
    b, rb = rollout(3)
    c, _ = rollout(4)
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    assert not np.array_equal(a, c)


def _check_truth(env: envs.MultiMNISTEnv, obs: np.ndarray, info: dict) -> None:
    """Ink exactly inside the present digits' boxes (and the agent), oracle rows = info."""
    image = obs[0].astype(np.int32)
    covered = np.zeros_like(image, bool)
    for k in np.flatnonzero(info["present"]):
        x, y = (info["positions"][k] - DIGIT_SIZE / 2).astype(int)
        covered[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = True
        assert image[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE].sum() > 0
        assert info["labels"][k] >= 0
    if "agent_position" in info:
        x, y = (info["agent_position"] - AGENT_SIZE / 2).astype(int)
        assert (image[y : y + AGENT_SIZE, x : x + AGENT_SIZE] == 255).all()
        covered[y : y + AGENT_SIZE, x : x + AGENT_SIZE] = True
    assert image[~covered].sum() == 0
    assert (info["labels"][~info["present"]] == -1).all()

    oracle = env.oracle()
    k = np.flatnonzero(info["present"])
    n = env.num_digits
    np.testing.assert_array_equal(oracle["mask"][:n], info["present"].astype(np.float32))
    np.testing.assert_array_equal(oracle["slots"][k, :NUM_CLASSES].argmax(1), info["labels"][k])
    np.testing.assert_allclose(oracle["slots"][k, NUM_CLASSES : NUM_CLASSES + 2], to_unit(info["positions"][k]))
    assert (oracle["slots"][:n][info["present"] == 0] == 0).all()
    if "agent_position" in info:
        assert oracle["slots"][-1, ORACLE_LAYOUT.index("agent")] == 1.0
        np.testing.assert_allclose(oracle["slots"][-1, NUM_CLASSES : NUM_CLASSES + 2], to_unit(info["agent_position"]))


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_info_and_oracle_agree_with_pixels(env_id):
    env = make(env_id)
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    for _ in range(40):
        _check_truth(env, obs, info)
        obs, _, term, trunc, info = env.step(env.action_space.sample())
        _check_truth(env, obs, info)
        if term or trunc:
            obs, info = env.reset()


def _rewards_of_each_action(env, seed: int) -> list[float]:
    rewards = []
    for action in range(env.action_space.n):
        env.reset(seed=seed)
        rewards.append(env.step(action)[1])
    return rewards


def test_count_rewards_the_true_count():
    env = make("MultiMNIST-Count-v0")
    seen = set()
    for seed in range(40):
        _, info = env.reset(seed=seed)
        n = int(info["present"].sum())
        seen.add(n)
        assert _rewards_of_each_action(env, seed) == [float(a == n) for a in range(4)]
    assert seen == {0, 1, 2, 3}


def test_odd_one_out_answer_is_the_quadrant_of_the_odd_class():
    env = make("MultiMNIST-OddOneOut-v0")
    for seed in range(20):
        _, info = env.reset(seed=seed)
        labels = info["labels"]
        odd = [k for k in range(3) if (labels == labels[k]).sum() == 1]
        assert len(odd) == 1 and len(set(labels.tolist())) == 2
        x, y = info["positions"][odd[0]]
        quadrant = int(y >= 32) * 2 + int(x >= 32)
        assert _rewards_of_each_action(env, seed) == [float(a == quadrant) for a in range(4)]


def test_collect_rewards_targets_and_removes_touched_digits():
    env = make("MultiMNIST-Collect-v0", targets=(0, 2, 4, 6, 8))
    for seed in range(10):
        _, info = env.reset(seed=seed)
        assert np.isin(info["labels"], (0, 2, 4, 6, 8)).any()  # every scene has a target
        k = 0
        x, y = env.top_left[k]
        # put the agent just left of digit k, vertically centred, then step right into it
        env.agent_xy = np.array([x - AGENT_SIZE - STEP + 1, y + DIGIT_SIZE // 2]).clip(0, 60)
        if env._touching().any() or x < AGENT_SIZE + STEP:
            continue
        label = env.labels[k]
        _, reward, term, _, info = env.step(3)
        assert reward == (1.0 if label % 2 == 0 else -1.0)
        assert not info["present"][k]
        assert term == (not np.isin(info["labels"][info["present"]], (0, 2, 4, 6, 8)).any())


def test_collect_truncates_at_max_steps():
    env = make("MultiMNIST-Collect-v0", max_steps=3)
    checked = 0
    for seed in range(10):
        env.reset(seed=seed)
        outs = [env.step(a) for a in (0, 1, 0)]  # up, down, up: rarely reaches a digit
        if not any(o[2] for o in outs):
            assert [o[3] for o in outs] == [False, False, True]
            checked += 1
    assert checked > 0


def test_held_out_digits_and_bad_options():
    train = make("MultiMNIST-Count-v0")
    test = make("MultiMNIST-Count-v0", digit_split="test")
    assert train.bank.images.shape[1:] == (DIGIT_SIZE, DIGIT_SIZE)
    assert "held-out" in test.bank.description and "held-out" not in train.bank.description
    with pytest.raises(PerceptionError, match="obs_mode"):
        make("MultiMNIST-Count-v0", obs_mode="rgb")
    with pytest.raises(PerceptionError, match="digit_split"):
        make("MultiMNIST-Count-v0", digit_split="val")
    with pytest.raises(PerceptionError, match="targets"):
        make("MultiMNIST-Collect-v0", targets=tuple(range(10)))


def test_vector_env_matches_single_envs():
    vec = envs.make_vector_env("MultiMNIST-OddOneOut-v0", 3, obs_mode="oracle")
    obs, _ = vec.reset(seed=5)
    for i in range(3):
        single, _ = make("MultiMNIST-OddOneOut-v0", obs_mode="oracle").reset(seed=5 + i)
        np.testing.assert_array_equal(obs["slots"][i], single["slots"])
