"""PPO agents (RLlib new API stack) that learn from object slots, pixels or the oracle state.

``python -m agents.train`` trains one agent; ``python -m agents.bench`` compares observation
sources and measures ObjectSlots throughput. See :mod:`agents.modules` for the networks and
:mod:`agents.environment` for how sub-environments are encoded in one batch inside RLlib.
"""
