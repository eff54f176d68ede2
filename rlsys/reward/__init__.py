"""Verifiable math reward.

``rlsys.reward.math.compute_score`` checks one response in-process (trusted text only);
``rlsys.reward.pool.RewardPool`` scores batches of untrusted responses in killable, memory-capped
worker processes and adds the optional format reward (``rlsys.reward.format``) and extra terms
loaded by import path (``rlsys.reward.terms``).
"""
