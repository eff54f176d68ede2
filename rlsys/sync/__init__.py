"""Weight sync from the Megatron actor into the rollout engine.

megatron-core is imported only by the modules that need it (``weight_sync``, ``verify``), so the
plain-torch parts load without it.

- ``weight_sync``: ``sync_weights`` (collective: TP gather, PP broadcast, HF names, buckets),
  ``SyncConfig``, ``SyncReport``, ``make_transport``, ``is_sync_source``, ``iter_sync_buckets``.
- ``transports``: ``ColocatedTransport`` (update_weights_from_tensor), ``DisaggregatedTransport``
  (broadcast over a process group the engine joins), ``InProcessTransport`` (HFEngine),
  ``WeightSyncError``.
- ``buckets``: size-bounded bucketing of a tensor stream (plain torch).
- ``verify``: the engine's greedy continuation against the actor's (``check_engine_follows_actor``),
  ``logprob_mismatch``.
"""
