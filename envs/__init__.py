"""Traces, fitted profiles, the continuous-batching simulator and the gymnasium env.

Importing the package registers ``SpecDecode-v0`` with gymnasium.
"""

from gymnasium.envs.registration import register, registry

ENV_ID = "SpecDecode-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.spec_env:SpecDecodeEnv", max_episode_steps=20_000)

__all__ = ["ENV_ID"]
