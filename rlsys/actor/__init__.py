"""The Megatron actor (megatron-core is imported only by the modules that need it).

- ``actor``: ``MegatronActor`` (log-probs, GRPO train step, checkpoints, HF weight stream).
- ``parallel``: process group, megatron parallel state and seeds (``initialize_parallel``).
- ``build``: model stage, DDP wrapper, optimizer, scheduler.
- ``microbatch``: ``RolloutBatch`` and token-budget microbatches (plain torch, no megatron).
- ``vocab_parallel``: log-probs and entropy from vocabulary-sharded logits.
- ``checkpoint``: megatron distributed checkpoints with the HF side files.
- ``checkpoint_files``: a checkpoint directory's metadata, side files and ``latest`` pointer (no megatron).
- ``convert``: ``rlsys convert`` (HF <-> megatron checkpoint), which launches its own processes.
- ``launch``: run a function on N local gloo processes (used by ``convert`` and the bench).
"""
