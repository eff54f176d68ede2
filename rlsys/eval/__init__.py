"""Benchmark evaluation with the training reward (``rlsys eval``, and validation during training).

- ``benchmark``: ``evaluate_prompts`` (generate n samples per prompt, score them with
  ``RewardPool``, summarise), ``BenchmarkResult``, and ``write_results`` (re-exported).
- ``metrics``: ``pass_at_k`` (the unbiased estimator), default k values.
- ``choice``: letter answers of multiple-choice benchmarks (GPQA style).
- ``inputs``: benchmark files: key detection, prompt templates, rendering and tokenisation.
- ``model``: the model to evaluate (HF directory, offline name, rlsys checkpoint) and its engine.
- ``report``: the output files (per-example JSONL, summary JSON, markdown table, analysis report).
- ``command``: the ``rlsys eval`` command line (parser); ``run``: what it does.

Nothing is imported here, so that ``rlsys --help`` stays instant.
"""
