"""Risk: a colocated engine with TP > 1 (the 7B recipe's rollout TP 2) gets one rank's payload for
every TP rank, so on a GPU all its TP ranks read one GPU's memory, or the payloads of its ranks
disagree. Two gloo ranks (DP 2) feed ONE engine of two TP ranks as a colocated route does: rank
1 serialises each bucket itself and rank 0, the lead, gathers the payloads and sends them in one
call. To see whose tensors reach which engine TP rank, the two replicas are loaded from DIFFERENT
checkpoints: TP rank i's payload must hold checkpoint i's tensors, byte for byte. The engine
stands in for SGLang at TP 2, which does not run on CPU here; it decodes what SGLang's scheduler
would."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from rlsys.models.offline import load_tokenizer
from tests.dist import run_distributed
from tests.sync.sync_models import save_random_qwen2


class TwoRankEngine:
    """Records the payloads each TP rank of a 2-rank engine would get, per bucket."""

    name = "stand-in sglang engine (tp 2)"
    engine_args = {"tp_size": 2}

    def __init__(self) -> None:
        self.buckets: list[list[bytes]] = []
        self.sessions = 0

    def begin_weight_update(self, **_: Any) -> None:
        self.sessions += 1

    def update_weights_from_serialized(self, payloads: list[bytes], **_: Any) -> None:
        assert len(payloads) == self.engine_args["tp_size"], len(payloads)
        self.buckets.append(payloads)

    def end_weight_update(self, **_: Any) -> None:
        pass

    def flush_cache(self, **_: Any) -> None:
        pass


def _feed_worker(rank: int, world_size: int, model_dirs: list[str]) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from transformers import AutoConfig

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import load_hf_into_megatron
    from rlsys.platform.megatron_cpu import enable_cpu_megatron
    from rlsys.sync.transports import ColocatedTransport
    from rlsys.sync.weight_sync import EngineFeed, sync_weights

    enable_cpu_megatron(force=True)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    hf_config = AutoConfig.from_pretrained(model_dirs[rank])
    model = build_gpt_model(hf_config, transformer_impl="local")
    load_hf_into_megatron(model, model_dirs[rank], hf_config)
    group = dist.new_group([0, 1], backend="gloo")
    engine = TwoRankEngine() if rank == 0 else None
    feed = EngineFeed(ColocatedTransport(engine) if engine else None, group=group, lead_rank=0)
    report = sync_weights(model, hf_config, feed=feed, bucket_bytes=256 * 1024)
    result = {"num_buckets": report.num_buckets}
    if engine is not None:
        result["sessions"] = engine.sessions
        result["payloads"] = [[pickle.loads(p) for p in bucket] for bucket in engine.buckets]
    return result


def _checkpoint(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_each_tp_rank_of_a_colocated_engine_gets_its_own_ranks_payload(tmp_path):
    tokenizer = load_tokenizer("qwen2.5-tokenizer")
    dirs = [save_random_qwen2(tmp_path / f"replica{i}", tokenizer, seed=3 + i) for i in range(2)]
    lead, follower = run_distributed(_feed_worker, world_size=2, args=([str(d) for d in dirs],), timeout_s=300)
    assert lead["sessions"] == 1 and lead["num_buckets"] == follower["num_buckets"] == len(lead["payloads"]) > 1
    for tp_rank, directory in enumerate(dirs):
        reference = _checkpoint(directory)
        sent = {name: tensor for bucket in lead["payloads"] for name, tensor in bucket[tp_rank]}
        assert set(sent) == set(reference) - ({"lm_head.weight"} if "lm_head.weight" not in sent else set())
        assert all(torch.equal(sent[name], reference[name]) for name in sent), tp_rank
