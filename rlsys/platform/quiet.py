"""Third-party warnings and log lines that leave nothing to act on, filtered where they are raised.

Each one restates a fallback rlsys intends (megatron-core and sglang on CPU) or reports a
deprecation inside megatron-core's own code; on the console they would bury the lines that matter.
Checked against megatron-core 0.16.1, sglang 0.5.21 and torch 2.13.0 (CPU build). Re-check the list
when one of them moves: a message that changed no longer matches and shows again (the safe way to
fail). Every entry matches one message (``warnings.filterwarnings`` semantics: a regular
expression matched at the start of the message, case-insensitively), never a whole module or all
warnings; anything not listed still shows, in the worker's log file (``rlsys.cluster.logs``).

Where the filters are installed (``quiet_third_party()``, idempotent):
- the Ray actors of a run: first thing in ``ActorWorker.__init__`` and ``EngineWorker.__init__``;
- every sglang process on CPU (the rollout worker and the scheduler and detokenizer sglang spawns
  from it): by ``sglang_cpu_shims/sitecustomize.py``, which Python runs at start in every process
  whose path has that folder first (``rlsys.platform.sglang_cpu.sglang_process_env``). sglang
  spawns its children, so a filter set in the worker's interpreter would not reach them.

Warnings (``WARNINGS``):

1. "Apex is not installed. Falling back to Torch Norm", "Transformer Engine and Apex are not
   installed. Falling back to ..." (UserWarning): megatron-core, at the import of its layer specs,
   optimizer, clip-grads and FSDP modules, on machines without Transformer Engine or apex (CPU; sglang
   imports megatron too). The torch implementations it falls back to are the ones rlsys uses there.
2. "Only CUDA, HIP and XPU support AWQ currently.", "Only CUDA, MUSA and NPU support GGUF
   quantization currently." (UserWarning): sglang, at the import of its quantization modules, once in
   each of its processes, on CPU. rlsys loads unquantised weights.
3. "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer." (UserWarning):
   megatron-core's ``TransformerConfig.__post_init__`` warns about its own default
   (``cuda_graph_scope="full"``), on any device. The actor captures no CUDA graphs.
4. "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed" (UserWarning, from
   torch's C++): megatron-core's ``DistributedOptimizer.zero_grad`` resets ``.grad`` of its shard
   views (``_zero_grad_group_helper``; upstream marks the line "throws grad-access warning"), every
   step, on any device; nothing reads those grads. Matched by module too: megatron's
   ``megatron.core.optimizer.optimizer`` on GPU, and on CPU ``rlsys.platform.megatron_cpu``, whose
   torch-function mode is the Python frame torch attributes the warning to.
5. "`torch.distributed.reduce_scatter_tensor` is deprecated", "`torch.distributed.all_gather_into_tensor`
   is deprecated" (FutureWarning): torch 2.13 deprecates them; megatron-core's grad buffers and
   distributed optimizer call them every step. "`load_state_dict` is deprecated and will be removed
   in future versions. Please use `load` instead.", "Please use DTensor instead and we are deprecating
   ShardedTensor." (FutureWarning): megatron-core's distributed checkpoint loading
   (``dist_checkpointing.strategies.torch``), when a run resumes. rlsys calls none of these.

Log lines (``LOG_LINES``: a ``logging.Filter`` on the logger that emits them, by message), sglang on CPU:

6. "Cuda graph is disabled because of using torch native attention backend"
   (``sglang.srt.arg_groups.attention_hook``): rlsys asks for both on CPU (``rlsys.platform.sglang_cpu``).
7. "Cannot detect CUDA architecture." (``sglang.kernels.jit.utils.arch``): a CPU has none.
8. "init_cpu_threads_env and shared memory based AllReduce is disabled, only intel amx backend and
   arm64 are supported" (``sglang.srt.distributed.bootstrap``): CPUs without AMX run sglang's torch path.

Not filtered, on purpose: sglang's "Ignore import error when loading sglang.srt.models.<name>" (if
``<name>`` is the run's own model, that line is the cause of the failure that follows), "Fail to set
RLIMIT_NOFILE" (a limit of the machine), and ``rlsys.platform.sglang_cpu.warn_if_unchecked_version``.

This module imports only the standard library: sglang's processes import it before anything else.
"""

from __future__ import annotations

import logging
import re
import warnings

WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # (category, message, module); "" matches any module. Numbers refer to the list above.
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed\. Falling back to ", ""),  # 1
    (UserWarning, r"Only CUDA, HIP and XPU support AWQ currently\.", ""),  # 2
    (UserWarning, r"Only CUDA, MUSA and NPU support GGUF quantization currently\.", ""),  # 2
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer\.", ""),  # 3
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"(megatron\.core\.optimizer\.optimizer|rlsys\.platform\.megatron_cpu)$"),  # 4
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", ""),  # 5
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", ""),  # 5
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load`",
     ""),  # 5
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\.", ""),  # 5
)

LOG_LINES: tuple[tuple[str, str], ...] = (
    # (logger, message)
    ("sglang.srt.arg_groups.attention_hook",
     r"Cuda graph is disabled because of using torch native attention backend$"),  # 6
    ("sglang.kernels.jit.utils.arch", r"Cannot detect CUDA architecture\.$"),  # 7
    ("sglang.srt.distributed.bootstrap", r"init_cpu_threads_env and shared memory based AllReduce is disabled, "
                                         r"only intel amx backend and arm64 are supported$"),  # 8
)

_installed = False


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = re.compile(message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.message.match(record.getMessage())


def quiet_third_party() -> None:
    """Install every filter of this module in this process (see the top); calling it again does nothing."""
    global _installed
    if _installed:
        return
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message in LOG_LINES:
        # On the emitting logger, a filter survives sglang replacing the root handlers (basicConfig(force=True)).
        logging.getLogger(name).addFilter(_DropMessage(message))
    _installed = True


def filtered_lines(text: str) -> list[str]:
    """The lines of ``text`` that one of the filters above should have removed (for tests)."""
    patterns = [re.compile(message, re.IGNORECASE) for _, message, _ in WARNINGS]
    patterns += [re.compile(message.rstrip("$")) for _, message in LOG_LINES]
    return [line for line in text.splitlines() if any(pattern.search(line) for pattern in patterns)]
