"""ObjectSlots / VectorObjectSlots: contract, backends, batching and clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import InputError, PerceptionError
from perception.models import build_model
from perception.train.checkpoint import atomic_save, encoder_state


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """An (untrained) vae as a torch checkpoint and, when export exists, an ONNX file."""
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 8, "channels": 8}, (1, 64, 64)).eval()
    root = tmp_path_factory.mktemp("vae")
    atomic_save(encoder_state(model, "untrained"), root / "vae.pt")
    onnx_path = None
    try:
        from export import export_onnx
    except ImportError:
        pass
    else:
        onnx_path = export_onnx(model, root / "vae.onnx").path
    return {"torch": root / "vae.pt", "onnx": onnx_path, "model": model}


def _encoder_for(vae_files, backend):
    if vae_files[backend] is None:
        pytest.skip("the export package cannot export ONNX yet")
    return str(vae_files[backend])


def make(env_id: str, **kwargs) -> gym.Env:
    return gym.make(env_id, disable_env_checker=True, **kwargs)


@dataclass
class _NoConfig:
    pass


class FakePrototypes(Encoder):
    """Two slots whose class scores and positions are simple functions of the image."""

    Config = _NoConfig
    name = "fake-prototypes"

    @property
    def num_slots(self) -> int:
        return 2

    @property
    def slot_layout(self) -> list[str]:
        return ["mean"]

    @property
    def num_classes(self) -> int:
        return 3

    def encode(self, images, deterministic=True):
        n = images.shape[0]
        m = images.mean(dim=(1, 2, 3))
        logits = torch.stack([torch.stack([m, -m, m * 0], -1), torch.stack([-m, m, m * 0 + 1e-3], -1)], 1)
        return EncoderOutput(
            slots=m[:, None, None].expand(n, 2, 1),
            presence=torch.tensor([0.9, 0.2]).expand(n, 2),
            position=torch.tensor([[0.5, -0.5], [0.0, 0.25]]).expand(n, 2, 2),
            class_probs=logits.softmax(-1),
        )

    def loss(self, batch, step):
        return ModelLoss(torch.zeros(()), {})


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_check_env_through_the_wrapper(vae_files, env_id, backend):
    env = envs.ObjectSlots(make(env_id), encoder=_encoder_for(vae_files, backend), backend=backend)
    check_env(env, skip_render_check=True)
    assert env.observation_space["slots"].shape == (1, 8 + 2)
    assert np.isfinite(env.observation_space["slots"].low).all()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_slots_are_the_encoder_output(vae_files, backend):
    env = envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=_encoder_for(vae_files, backend), backend=backend)
    obs, _ = env.reset(seed=2)
    image = torch.from_numpy(env.unwrapped.image()[None].astype(np.float32) / 255.0)
    with torch.no_grad():
        ref = vae_files["model"].encode(image)
    expected = torch.cat([ref.slots, ref.position], -1)[0].clamp(-envs.SLOT_BOUND, envs.SLOT_BOUND).numpy()
    np.testing.assert_allclose(obs["slots"], expected, atol=1e-4)
    np.testing.assert_array_equal(obs["mask"], (ref.presence[0] > 0.5).float().numpy())


def test_prototypes_give_argmax_one_hot_and_position():
    env = envs.ObjectSlots(
        make("MultiMNIST-Count-v0"), encoder=FakePrototypes(_NoConfig(), (1, 64, 64)), backend="torch",
        representation="prototypes",
    )
    obs, _ = env.reset(seed=0)
    assert env.observation_space["slots"].shape == (2, 3 + 2)
    assert obs["slots"][:, :3].sum(1).tolist() == [1.0, 1.0]
    np.testing.assert_allclose(obs["slots"][:, 3:], [[0.5, -0.5], [0.0, 0.25]])
    assert obs["mask"].tolist() == [1.0, 0.0]  # presence 0.9 and 0.2, threshold 0.5
    check_env(env, skip_render_check=True)


def test_prototypes_without_class_probs_is_a_clear_error(vae_files):
    with pytest.raises(PerceptionError, match="class_probs"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=str(vae_files["torch"]), backend="torch",
                         representation="prototypes")


def test_image_shape_mismatch_is_an_input_error():
    small = build_model("vae", {"latent_dim": 4, "channels": 4}, (1, 32, 32))
    with pytest.raises(InputError, match=r"\[1, 32, 32\].*\[1, 64, 64\]"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=small, backend="torch")
    with pytest.raises(InputError):
        envs.ObjectSlots(make("MultiMNIST-Count-v0", obs_mode="oracle"), encoder=small, backend="torch")


def test_backend_and_file_kind_mismatch_are_clear_errors(vae_files):
    with pytest.raises(PerceptionError, match="backend"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=str(vae_files["torch"]), backend="tensorflow")
    with pytest.raises(PerceptionError, match="onnx"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=str(vae_files["torch"]), backend="onnx")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_vector_wrapper_encodes_all_envs_in_one_call(vae_files, backend):
    num_envs = 4
    encoder = _encoder_for(vae_files, backend)
    vec = envs.make_vector_env("MultiMNIST-Collect-v0", num_envs, encoder=encoder, backend=backend)
    calls = []
    inner = vec.converter.encoder
    vec.converter.encoder = lambda images, **kw: calls.append(images.shape[0]) or inner(images, **kw)

    obs, _ = vec.reset(seed=7)
    vec.action_space.seed(0)
    for _ in range(5):
        obs, *_ = vec.step(vec.action_space.sample())
    assert calls == [num_envs] * 6  # reset + 5 steps, each one batched call
    assert obs["slots"].shape == (num_envs, 1, 10) and vec.observation_space.contains(obs)

    single = envs.ObjectSlots(make("MultiMNIST-Collect-v0"), encoder=inner, backend=backend)
    first, _ = single.reset(seed=7)
    vec_first, _ = vec.reset(seed=7)
    np.testing.assert_allclose(vec_first["slots"][0], first["slots"], atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_successive_observations_are_independent_arrays(vae_files, backend):
    """The wrapper reuses its float input buffer between steps; what it returns must not be reused."""
    vec = envs.make_vector_env("MultiMNIST-Count-v0", 3, encoder=_encoder_for(vae_files, backend), backend=backend)
    first, _ = vec.reset(seed=0)
    kept = {k: v.copy() for k, v in first.items()}
    for _ in range(2):  # the terminal step shows the reset scene; the autoreset step a new one
        later, *_ = vec.step(vec.action_space.sample())
    for key in kept:
        np.testing.assert_array_equal(first[key], kept[key])
        assert not np.shares_memory(first[key], later[key])
    assert not np.array_equal(first["slots"], later["slots"])


class _FloatImages(gym.Env):
    """Float observations are not in [0, 1] by construction, so the encoder must check them."""

    observation_space = gym.spaces.Box(0.0, 1.0, (1, 64, 64), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.full((1, 64, 64), 2.0, np.float32), {}

    def step(self, action):
        return self.reset()[0], 0.0, True, False, {}


def test_float_observations_out_of_range_are_refused(vae_files):
    env = envs.ObjectSlots(_FloatImages(), encoder=_encoder_for(vae_files, "onnx"), backend="onnx")
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        env.reset(seed=0)


def test_throughput_decomposition_splits_each_step_and_leaves_the_env_as_it_was(vae_files):
    from agents.bench import step_decomposition

    vec = envs.make_vector_env("MultiMNIST-Count-v0", 4, encoder=_encoder_for(vae_files, "onnx"), backend="onnx")
    session = vec.converter.encoder.session.session
    t = step_decomposition(vec, steps=20, warmup=2)
    for clock in ("wall", "cpu"):
        assert set(t[clock]) == {"env", "encoder", "wrapper", "step"}
        assert t[clock]["env"] > 0 and t[clock]["encoder"] > 0
        assert t[clock]["env"] + t[clock]["encoder"] < t[clock]["step"] * 1.5
    assert "step" not in vars(vec.env) and "run" not in vars(session)  # the clocks are gone
    obs, *_ = vec.step(vec.action_space.sample())
    assert vec.observation_space.contains(obs)


def test_max_objects_raises_k_where_the_model_allows_it():
    """Collect's agent sprite is a fourth object for encoders trained on 3 digits."""
    torch.manual_seed(0)
    air = build_model("air", {"hidden": 16, "embed": 16, "mlp": 16, "what_dim": 4}, (1, 64, 64)).eval()
    env = envs.ObjectSlots(make("MultiMNIST-Collect-v0"), encoder=air, backend="torch", max_objects=5)
    assert env.observation_space["slots"].shape == (5, 3 + 4 + 2)
    obs, _ = env.reset(seed=1)
    image = torch.from_numpy(env.unwrapped.image()[None].astype(np.float32) / 255.0)
    with torch.no_grad():
        ref = air.encode(image, max_steps=5)
    np.testing.assert_allclose(obs["slots"][:, -2:], ref.position[0].numpy(), atol=1e-5)
    check_env(env, skip_render_check=True)
    assert air.num_slots == 3  # the caller's model is left as it was


def test_max_objects_on_a_fixed_k_model_or_onnx_graph_is_a_clear_error(vae_files):
    with pytest.raises(PerceptionError, match="fixed number of slots"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=str(vae_files["torch"]), backend="torch", max_objects=3)
    with pytest.raises(PerceptionError, match="export"):
        envs.ObjectSlots(
            make("MultiMNIST-Count-v0"), encoder=_encoder_for(vae_files, "onnx"), backend="onnx", max_objects=3
        )


class FixedSlots(Encoder):
    """Slots at fixed places whose features are (slot index + 1) * the image mean."""

    Config = _NoConfig
    name = "fixed-slots"

    def __init__(self, positions, presence, width):
        super().__init__(_NoConfig(), (1, 64, 64))
        self.positions, self.presences, self.width = torch.tensor(positions), torch.tensor(presence), width

    @property
    def num_slots(self) -> int:
        return len(self.presences)

    @property
    def slot_layout(self) -> list[str]:
        return [f"f{i}" for i in range(self.width)]

    def encode(self, images, deterministic=True):
        n, k = images.shape[0], self.num_slots
        scale = torch.arange(1.0, k + 1)[None, :, None] * images.mean(dim=(1, 2, 3))[:, None, None]
        return EncoderOutput(
            slots=scale.expand(n, k, self.width),
            presence=self.presences.expand(n, k),
            position=self.positions.expand(n, k, 2),
        )

    def loss(self, batch, step):
        return ModelLoss(torch.zeros(()), {})


def test_fused_encoders_add_the_features_of_the_slot_at_the_same_place():
    detector = FixedSlots([[0.5, 0.5], [-0.5, 0.0], [0.0, -0.6]], [0.9, 0.9, 0.9], width=1)
    # slot 0 is absent at the detector's first object, slot 1 near it, slot 2 near nothing present
    describer = FixedSlots([[0.5, 0.5], [0.6, 0.45], [-0.5, 0.3]], [0.1, 0.9, 0.9], width=2)
    env = envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=[detector, describer], backend="torch")
    assert env.observation_space["slots"].shape == (3, 1 + 2 + 1 + 2)  # own, other's, matched, position
    obs, _ = env.reset(seed=3)
    m = env.unwrapped.image().mean() / 255.0
    np.testing.assert_allclose(obs["slots"][:, 0], [m, 2 * m, 3 * m], rtol=1e-5)
    np.testing.assert_allclose(obs["slots"][:, 1:3], [[2 * m, 2 * m], [0, 0], [0, 0]], rtol=1e-5)
    assert obs["slots"][:, 3].tolist() == [1.0, 0.0, 0.0]  # [-0.5, 0.3] is 0.3 away: beyond the radius
    np.testing.assert_allclose(obs["slots"][:, -2:], [[0.5, 0.5], [-0.5, 0.0], [0.0, -0.6]])
    assert obs["mask"].tolist() == [1.0, 1.0, 1.0]
    check_env(env, skip_render_check=True)


def test_fused_encoder_can_add_its_class_one_hot_instead_of_its_slot_vector():
    detector = FixedSlots([[0.5, -0.45], [0.0, 0.25], [-0.5, 0.5]], [0.9, 0.9, 0.9], width=1)
    describer = FakePrototypes(_NoConfig(), (1, 64, 64))  # present slot at [0.5, -0.5] only, argmax class 0
    env = envs.ObjectSlots(
        make("MultiMNIST-Count-v0"), encoder=[detector, describer], backend="torch",
        representation=["slots", "prototypes"],
    )
    assert env.observation_space["slots"].shape == (3, 1 + 3 + 1 + 2)  # own, other's class one-hot, matched, position
    obs, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs["slots"][:, 1:5], [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(obs["slots"][:, -2:], [[0.5, -0.45], [0.0, 0.25], [-0.5, 0.5]])
    check_env(env, skip_render_check=True)
    with pytest.raises(PerceptionError, match="class_probs"):  # one value for all: the detector has no classes
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=[detector, describer], backend="torch",
                         representation="prototypes")
    with pytest.raises(PerceptionError, match="representation"):
        envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=[detector, describer], backend="torch",
                         representation=["slots", "classes"])


def test_one_encoder_given_as_a_list_of_one_is_that_encoder():
    single = envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=FakePrototypes(_NoConfig(), (1, 64, 64)),
                              backend="torch", representation="prototypes")
    listed = envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder=[single.converter.encoder.member],
                              backend=["torch"], representation=["prototypes"])
    assert listed.observation_space == single.observation_space
    for key, value in single.reset(seed=4)[0].items():
        np.testing.assert_array_equal(listed.reset(seed=4)[0][key], value)


def test_prototypes_through_onnx_match_torch():
    """The ONNX graph's class_probs shape gives the class count of the one-hot."""
    pytest.importorskip("export")
    from perception.pretrained import bundled_path

    if bundled_path("dair", ".onnx") is None:
        pytest.skip("no bundled dair.onnx")
    obs = {
        backend: envs.ObjectSlots(make("MultiMNIST-Count-v0"), encoder="dair", backend=backend,
                                  representation="prototypes").reset(seed=5)[0]
        for backend in ("torch", "onnx")
    }
    assert obs["onnx"]["slots"].shape == (3, 10 + 2)
    np.testing.assert_array_equal(obs["onnx"]["slots"][:, :10], obs["torch"]["slots"][:, :10])
    np.testing.assert_array_equal(obs["onnx"]["mask"], obs["torch"]["mask"])
    np.testing.assert_allclose(obs["onnx"]["slots"][:, 10:], obs["torch"]["slots"][:, 10:], atol=1e-4)  # positions
