"""Run megatron-core on CPU with gloo: every CPU workaround for megatron-core, and only here.

Checked against megatron-core 0.16.1 and torch 2.13.0 (CPU build). Each patch below names the
upstream code it stands in for; re-check all of them when either version moves.

``enable_cpu_megatron()`` is called once per process, before megatron's RNG is seeded and before
any model is built. It is idempotent. In a process that can use CUDA it does nothing (unless
``force=True``), so the same model, actor and sync code runs unchanged on GPU.

The patches, and why each is needed (all are CUDA assumptions of megatron-core):

1. RNG tracker (``megatron.core.tensor_parallel.random``). ``CudaRNGStatesTracker.add`` and
   ``.fork`` and the module helpers ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` (also used by
   activation recomputation) read and write the CUDA generator. On CPU the CPU default generator
   takes its role: the module's tracker class is replaced by a subclass whose ``add``/``fork`` use
   it, and the two helpers are replaced. ``model_parallel_cuda_manual_seed`` still calls
   ``torch.cuda.manual_seed`` for the data-parallel default state, which a CPU build queues and
   never runs: callers seed the CPU generator with ``torch.manual_seed`` first, as Megatron-LM's
   own initialisation does. The named tracker states (tensor-parallel, expert) are seeded here.
2. ``torch.cuda.current_device()`` (about 70 allocation sites: TP gathers and their backward,
   p2p receive buffers, DDP grad buffers, the global memory buffer, rotary ``inv_freq`` in
   ``RotaryEmbedding.get_emb``) and ``torch.cuda.synchronize()`` (p2p communication) raise on a
   CPU build. Here ``current_device`` answers the CPU device itself and ``synchronize`` returns at
   once (there is no device work to wait for). Answering a device instead of an index is what
   makes allocations inside autograd's backward work: (4) is not active there.
3. Causal masks (``megatron.core.transformer.utils.get_default_causal_mask`` and
   ``get_sliding_window_causal_mask``, also imported by name into
   ``megatron.core.fusions.fused_softmax``) are built with ``device="cuda"``. Both names in both
   modules are replaced by CPU builders, because upstream's ``DotProductAttention`` (the CPU
   attention of our local spec) builds them inside autograd's backward under activation
   recompute, where (4) is not active.
4. A ``TorchFunctionMode``, entered once, maps every CUDA device handed to a torch call to CPU:
   ``device="cuda"`` in the pipeline schedules, DDP, the optimizers and ``clip_grads``, bare device
   indices (they name the current accelerator), ``.to("cuda")``, and ``.cuda()`` on the tied
   output layer under PP. It also answers ``Tensor.type()`` (no arguments) with the CUDA type
   name, because ``clip_grads`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``.
   Limits, both inherent to torch function modes: the mode sits on the stack of the thread that
   called ``enable_cpu_megatron``, and it is off while it handles a call, which includes the whole
   of ``torch.autograd.backward``. So code that runs in backward gets no mapping; in 0.16.1 all of
   megatron's backward-time allocations on our paths go through (2) and (3).

Not here, because it is not specific to the CPU: the local layer spec's RMSNorm that works under
sequence parallel (megatron's ``WrappedTorchNorm`` asserts ``not sequence_parallel``) and the SDPA
core attention are modules of our own local spec (``rlsys/models/local_layers.py``), needed on any
device without Transformer Engine.

TransformerConfig settings CPU runs need (set by ``rlsys.models.megatron_model``):
``use_cpu_initialization=True``, fp32 params, every fusion off (``bias_dropout_fusion``,
``apply_rope_fusion``, ``masked_softmax_fusion``, ``gradient_accumulation_fusion``,
``persist_layer_norm``, ``bias_activation_fusion``), ``pipeline_dtype`` set under PP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core.fusions import fused_softmax as megatron_fused_softmax
from megatron.core.tensor_parallel import random as megatron_random
from megatron.core.transformer import utils as megatron_transformer_utils
from torch.overrides import TorchFunctionMode

CHECKED_MEGATRON_CORE_VERSION = "0.16.1"

_CPU = torch.device("cpu")

_enabled = False


def enable_cpu_megatron(force: bool = False) -> bool:
    """Apply every CPU workaround for megatron-core in this process; return whether they are on.

    Without ``force`` nothing is patched when CUDA is available: GPU processes run megatron as
    shipped. ``force=True`` is for a process that has a GPU but runs megatron on CPU on purpose
    (the CPU test suite on a GPU host); it must then not use CUDA for anything else.
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _point_rng_tracker_at_cpu_generator()
    _answer_cuda_device_queries_for_cpu()
    _build_causal_masks_on_cpu()
    _CudaToCpuDeviceMode().__enter__()
    _enabled = True
    return True


def cpu_megatron_enabled() -> bool:
    """Whether ``enable_cpu_megatron`` patched this process."""
    return _enabled


# ---------------------------------------------------------------- 1. RNG tracker on the CPU generator


class _CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's named RNG states, kept for the CPU default generator instead of the CUDA one.

    What must stay true (as upstream): a forked region runs with the named state and leaves it
    advanced; the state outside the fork is restored unchanged; nested forks restore in order.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        outer_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer_state)

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        # Upstream also warns when the CPU generator moved inside the fork; here the CPU generator
        # is the forked one, so moving it is the point and the warning is left out.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current rng state {self._current_state_name} is not the forked state {name}"
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _point_rng_tracker_at_cpu_generator() -> None:
    megatron_random.CudaRNGStatesTracker = _CpuRNGStatesTracker
    megatron_random._get_cuda_rng_state = _get_cpu_rng_state
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state
    # A tracker built before this call is upstream's, and on CPU it cannot hold any state (its
    # ``add`` raises), so replacing it loses nothing.
    megatron_random.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------- 2. torch.cuda device queries


def _current_device_is_the_cpu() -> torch.device:
    return _CPU


def _synchronize_nothing(device: Any = None) -> None:
    return None


def _answer_cuda_device_queries_for_cpu() -> None:
    torch.cuda.current_device = _current_device_is_the_cpu
    torch.cuda.synchronize = _synchronize_nothing


# ---------------------------------------------------------------- 3. causal masks on the CPU


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """True above the diagonal: position i may not attend to j > i (upstream's convention)."""
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """True where attention is masked: outside ``window_size`` (left, right) of the diagonal."""
    allowed = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    allowed = torch.triu(allowed, diagonal=skv - sq - window_size[0])
    allowed = torch.tril(allowed, diagonal=skv - sq + window_size[1])
    return ~allowed


def _build_causal_masks_on_cpu() -> None:
    for module in (megatron_transformer_utils, megatron_fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask


# ---------------------------------------------------------------- 4. CUDA devices become the CPU


def _names_cuda_device(device: object) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuDeviceMode(TorchFunctionMode):
    """Every torch call that names a CUDA device gets the CPU instead."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            type_name: str = func(*args)
            return type_name.replace("torch.", "torch.cuda.", 1)
        if _names_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)
