"""HF transformers ``generate`` as a rollout engine: the fallback when SGLang is unavailable.

Choices:
- The batch is left-padded and generated in one ``generate`` call (``num_return_sequences=n``),
  so the engine schedules all prompts together.
- Padding after an early stop is the end-of-sequence token. A response ends at its first
  end-of-sequence token, which is kept in ``response_ids`` (the actor must learn to emit it)
  unless the row actually stopped on a stop string, in which case the padding is not part of it.
- Log-probs are recomputed with one forward pass over prompt + response after generation
  (in chunks), instead of keeping every step's full-vocabulary logits: memory stays
  O(batch × sequence) rather than O(batch × steps × vocab).
- Sampling runs under ``torch.random.fork_rng`` seeded from ``SamplingParams.seed``, so a call
  is reproducible and leaves the caller's RNG untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlsys.rollout.base import Sample, SamplingParams


class HFEngine:
    def __init__(self, model_path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 logprob_chunk_size: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device).eval()
        self.device = device
        self.logprob_chunk_size = logprob_chunk_size
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take new weights by HF name (the weight-sync entry point for this engine)."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"HF engine: unexpected weight names {unexpected[:5]}")

    def parameter_names(self) -> list[str]:
        """Every weight name a sync must send (a tied parameter once, under the name HF exports it by)."""
        return [name for name, _ in self.model.named_parameters()]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                 return_logprobs: bool = True) -> list[Sample]:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("HF engine: every prompt needs at least one token")
        pad_id = self.eos_ids[0]
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1

        greedy = params.temperature == 0
        sampling = {} if greedy else {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else None,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                do_sample=not greedy,
                max_new_tokens=params.max_new_tokens,
                # Greedy samples of one prompt are all the same: generate one, repeat it below.
                num_return_sequences=1 if greedy else params.n,
                pad_token_id=pad_id,
                eos_token_id=self.eos_ids,
                stop_strings=params.stop or None,
                tokenizer=self.tokenizer if params.stop else None,
                **sampling,
            ).cpu()
        if greedy and params.n > 1:
            sequences = sequences.repeat_interleave(params.n, dim=0)

        samples = [self._trim(i // params.n, row[width:].tolist(), params) for i, row in enumerate(sequences)]
        if return_logprobs:
            temperature = params.temperature if params.temperature > 0 else 1.0
            self._fill_logprobs(samples, prompt_ids, temperature)
        return samples

    def _trim(self, prompt_index: int, generated: list[int], params: SamplingParams) -> Sample:
        end = next((i for i, tok in enumerate(generated) if tok in self.eos_ids), None)
        if end is None:
            ids = generated
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            stopped = any(text.endswith(s) for s in params.stop)
            return Sample(prompt_index, ids, text, [], "stop" if stopped else "length")
        before = generated[:end]
        text_before = self.tokenizer.decode(before, skip_special_tokens=True)
        if any(text_before.endswith(s) for s in params.stop):
            return Sample(prompt_index, before, text_before, [], "stop")
        ids = generated[: end + 1]
        return Sample(prompt_index, ids, self.tokenizer.decode(ids, skip_special_tokens=True), [], "stop")

    def _fill_logprobs(self, samples: list[Sample], prompt_ids: list[list[int]], temperature: float) -> None:
        for start in range(0, len(samples), self.logprob_chunk_size):
            chunk = samples[start:start + self.logprob_chunk_size]
            rows = [prompt_ids[s.prompt_index] + s.response_ids for s in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.eos_ids[0], dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # right padding: positions stay 0..len-1 as in generation
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
            token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, sample in enumerate(chunk):
                p = len(prompt_ids[sample.prompt_index])
                sample.logprobs = token_logp[i, p - 1:p - 1 + len(sample.response_ids)].tolist()

    def shutdown(self) -> None:
        self.model = None
