"""rlsys: GRPO reinforcement learning for math reasoning.

A Megatron-core actor, an SGLang rollout engine that receives the actor's weights after every
step, and a verifiable ±5 boxed-answer reward, wired by Hydra configs and launched on Ray.
"""

__version__ = "0.1.0"
