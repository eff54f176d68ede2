"""rlsys: GRPO reinforcement learning for math reasoning.

A Megatron-core actor, an SGLang rollout engine that receives the actor's weights after every
step, and a verifiable ±5 boxed-answer reward, wired by Hydra configs and launched on Ray.
"""

__version__ = "0.1.0"

import time as _time

IMPORTED_AT = _time.monotonic()
"""``time.monotonic()`` when this process first imported rlsys: where ``time/startup`` counts from.
(A process's own start time is no use here: ``run_main_grpo_math.sh`` execs Python from the shell
that first installed the environment.)"""
