"""The GRPO loop (``rlsys.runner.grpo``) and the ``rlsys train`` command."""
