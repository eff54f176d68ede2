"""CPU stand-in for ``sgl_kernel`` (the sglang-kernel wheel ships CUDA builds only).

With ``SGLANG_USE_CPU_ENGINE=1``, sglang 0.5.21 imports these names at module level. None is called
when generating without speculative decoding (page size 1), so each stand-in raises if it is: a
call means sglang took a CPU path that needs the real kernel. Only the names sglang imports are
defined, so ``try: from sgl_kernel import X except ImportError`` fallbacks elsewhere still work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _missing_kernel(name: str, used_for: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"sgl_kernel.{name} ({used_for}) was called, but this sglang process runs on CPU with "
            "rlsys's sgl_kernel stand-in, which has no kernels"
        )

    refuse.__name__ = name
    return refuse


# sglang/srt/mem_cache/allocation.py and sglang/kernels/ops/kvcache/cache_move.py
assign_req_to_token_pool_cpu = _missing_kernel("assign_req_to_token_pool_cpu", "speculative-decoding KV allocation")
copy_all_layer_kv_cache_cpu = _missing_kernel("copy_all_layer_kv_cache_cpu", "KV-cache copy between slots")
# sglang/srt/speculative/eagle_utils.py and spec_utils.py
build_tree_kernel_efficient_cpu = _missing_kernel("build_tree_kernel_efficient_cpu", "EAGLE draft tree")
verify_tree_greedy_cpu = _missing_kernel("verify_tree_greedy_cpu", "EAGLE verification")
assign_extend_cache_locs_cpu = _missing_kernel("assign_extend_cache_locs_cpu", "speculative decoding")
fill_accept_out_cache_loc_cpu = _missing_kernel("fill_accept_out_cache_loc_cpu", "speculative decoding")
fill_bonus_tokens_cpu = _missing_kernel("fill_bonus_tokens_cpu", "speculative decoding")
