"""Training and validation prompts: Boba JSONL files, chat-template rendering, resumable batches."""

from rlsys.data.dataset import (
    Prompt,
    PromptDataset,
    load_prompts,
    load_train_prompts,
    load_val_prompts,
    render_prompt,
)
from rlsys.data.jsonl import DataError, Example, JsonlContents, read_examples, read_jsonl
from rlsys.data.sampler import EpochBatchSampler, PromptBatches, epoch_order

__all__ = [
    "DataError",
    "EpochBatchSampler",
    "Example",
    "JsonlContents",
    "Prompt",
    "PromptBatches",
    "PromptDataset",
    "epoch_order",
    "load_prompts",
    "load_train_prompts",
    "load_val_prompts",
    "read_examples",
    "read_jsonl",
    "render_prompt",
]
