"""RLlib (new API stack) modules: a permutation-invariant slot-set network and a pixel CNN.

:class:`SlotSetModule` reads ``Dict(slots=[K, D], mask=[K])`` (ObjectSlots output or the
environments' oracle mode): a per-slot MLP, masked multi-head self-attention blocks, then
pooling over present slots — mean, max, and the fraction of present slots (mean and max alone
cannot tell two identical objects from one, which counting needs) — and policy and value
heads. Nothing depends on slot order, so permuting slots (with their mask) leaves logits and
values unchanged. :class:`PixelCNNModule` is the pixel baseline on uint8 ``[1, 64, 64]``.
Both share the trunk between policy and value heads.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import Tensor, nn


class MaskedSelfAttention(nn.Module):
    """Pre-norm transformer block over a set; absent slots are neither attended to nor updated."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, present: Tensor) -> Tensor:
        # A scene with no present slot would make every key masked (NaN softmax): let such
        # rows attend freely; their slots are zeroed and ignored by the pooling anyway.
        ignore = ~present & present.any(dim=1, keepdim=True)
        x = self.norm1(h)
        h = h + self.attn(x, x, x, key_padding_mask=ignore, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return h * present.unsqueeze(-1)


def masked_pool(h: Tensor, present: Tensor) -> Tensor:
    """[B, K, H] -> [B, 2H + 1]: mean and max over present slots, and their fraction."""
    m = present.unsqueeze(-1).to(h.dtype)
    count = m.sum(dim=1)
    mean = (h * m).sum(dim=1) / count.clamp(min=1.0)
    maxed = h.masked_fill(~present.unsqueeze(-1), float("-inf")).amax(dim=1)
    maxed = torch.where(count > 0, maxed, torch.zeros_like(maxed))
    return torch.cat([mean, maxed, count / present.shape[1]], dim=-1)


def _heads(features: int, hidden: int, actions: int) -> tuple[nn.Module, nn.Module]:
    pi = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, actions))
    vf = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    return pi, vf


class _ActorCritic(TorchRLModule, ValueFunctionAPI):
    """Shared forward/value plumbing; subclasses define ``setup`` and ``embed(obs)``."""

    pi: nn.Module
    vf: nn.Module

    def embed(self, obs: Any) -> Tensor:
        raise NotImplementedError

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.pi(self.embed(batch[Columns.OBS]))}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        e = self.embed(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self.pi(e), Columns.EMBEDDINGS: e}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> Tensor:
        if embeddings is None:
            embeddings = self.embed(batch[Columns.OBS])
        return self.vf(embeddings).squeeze(-1)


class SlotSetModule(_ActorCritic):
    """model_config: ``hidden`` (64), ``heads`` (4), ``layers`` (2)."""

    def setup(self) -> None:
        hidden = int(self.model_config.get("hidden", 64))
        heads = int(self.model_config.get("heads", 4))
        layers = int(self.model_config.get("layers", 2))
        d = self.observation_space["slots"].shape[-1]
        self.slot_mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([MaskedSelfAttention(hidden, heads) for _ in range(layers)])
        self.pi, self.vf = _heads(2 * hidden + 1, hidden, int(self.action_space.n))

    def embed(self, obs: dict[str, Tensor]) -> Tensor:
        present = obs["mask"] > 0.5
        h = self.slot_mlp(obs["slots"].float()) * present.unsqueeze(-1)
        for block in self.blocks:
            h = block(h, present)
        return masked_pool(h, present)


class PixelCNNModule(_ActorCritic):
    """model_config: ``hidden`` (64). Three stride-2 convolutions then a linear layer."""

    def setup(self) -> None:
        hidden = int(self.model_config.get("hidden", 64))
        c, h, w = self.observation_space.shape
        self.cnn = nn.Sequential(
            nn.Conv2d(c, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * ((h + 7) // 8) * ((w + 7) // 8), 2 * hidden + 1), nn.ReLU(),
        )  # fmt: skip
        self.pi, self.vf = _heads(2 * hidden + 1, hidden, int(self.action_space.n))

    def embed(self, obs: Tensor) -> Tensor:
        return self.cnn(obs.float() * (1.0 / 255.0))
