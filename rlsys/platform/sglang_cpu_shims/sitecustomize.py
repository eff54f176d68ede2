"""Run by Python at the start of every sglang process on CPU (this folder is first on their path).

It installs ``rlsys.platform.quiet``'s filters there: sglang spawns its scheduler and detokenizer,
so filters set in the rollout worker's interpreter would not reach them. It shadows any other
``sitecustomize`` only in those processes.
"""

from rlsys.platform.quiet import quiet_third_party

quiet_third_party()
