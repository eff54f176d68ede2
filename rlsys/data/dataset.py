"""Prompt datasets: JSONL examples rendered into prompt text and token ids.

Choices
    * With ``apply_chat_template`` on, a prompt is rendered by the tokenizer's own chat template
      with ``add_generation_prompt=True``; a string prompt becomes one user message, preceded by
      ``system_prompt`` when one is set, and a message-list prompt is used as written
      (``system_prompt`` is not added to it). The rendered text is then tokenised without adding
      special tokens, which is exactly what ``tokenizer.apply_chat_template(..., tokenize=True)``
      does: the template already contains every special token the model expects.
    * With it off, a string prompt is tokenised as written with the tokenizer's defaults
      (``tokenizer(text)``), so a model whose tokenizer adds a BOS token gets it, as it would from
      a server given the raw text. Message-list prompts need a template and are an error then.
    * ``prompt_template`` (``rlsys.data.templates``: a preset name or a string with ``{prompt}``)
      wraps string prompts first; with the chat template on, the wrapped text is the user message.
      Message-list prompts are already written for the model, so a prompt template with them is
      an error rather than a guess at which message to wrap.
    * Prompts longer than ``max_prompt_length`` tokens (counted after every template, as the
      model sees them) follow ``overlong_prompts``: ``drop`` (the default) leaves them out,
      ``truncate`` keeps their first and last ``max_prompt_length / 2`` tokens (the start of the
      template and the turn the model answers, with the middle of the problem cut out), and
      ``error`` stops with the first one's ``path:LINE``. Dropped and truncated prompts are
      counted on the dataset and logged with a warning; ``summary()`` says it in one line.
    * Malformed lines follow the reader's rule (``rlsys.data.jsonl``): dropped and counted when at
      most ``max_malformed_fraction`` of a file's lines are bad, an error otherwise. Prompts that
      the templates cannot render are always errors. Nothing else is dropped.
    * Relative data paths are resolved against ``base`` when given, else the working directory.
    * Several files are concatenated in the order listed; every prompt remembers ``path:LINE``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from rlsys.data.jsonl import MAX_LINE_BYTES, DataError, Example, PromptContent, read_examples
from rlsys.data.templates import apply_template, resolve_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsys.config import DataConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for generation."""

    index: int
    """Position in its dataset (after overlong prompts were dropped)."""
    text: str
    """The prompt as rendered for the model (with the chat template when it is applied)."""
    token_ids: tuple[int, ...]
    """Token ids of ``text``, the input of generation."""
    answers: tuple[str, ...]
    """Reference answers."""
    location: str
    """``path:LINE`` of the source line."""


@dataclass(frozen=True)
class PromptDataset:
    """Prompts in file order, with the numbers left out or cut, and why."""

    prompts: tuple[Prompt, ...]
    num_dropped_overlong: int
    """Prompts left out because they had more than ``max_prompt_length`` tokens."""
    max_prompt_length: int
    num_truncated: int = 0
    """Prompts cut to ``max_prompt_length`` tokens (``overlong_prompts="truncate"``)."""
    num_dropped_malformed: int = 0
    """Malformed lines left out under ``max_malformed_fraction``."""

    def counts(self) -> dict[str, int]:
        """The numbers of prompts kept, dropped and truncated, for metrics."""
        return {"prompts": len(self.prompts), "dropped_overlong": self.num_dropped_overlong,
                "truncated": self.num_truncated, "dropped_malformed": self.num_dropped_malformed}

    def summary(self) -> str:
        """One line: prompts kept, and every prompt or line dropped or cut."""
        parts = [f"{len(self.prompts)} prompts"]
        if self.num_dropped_overlong:
            parts.append(f"{self.num_dropped_overlong} longer than {self.max_prompt_length} tokens dropped")
        if self.num_truncated:
            parts.append(f"{self.num_truncated} longer than {self.max_prompt_length} tokens truncated")
        if self.num_dropped_malformed:
            parts.append(f"{self.num_dropped_malformed} malformed line{'s' * (self.num_dropped_malformed > 1)} dropped")
        return ", ".join(parts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def batches(self, batch_size: int) -> Iterator[list[Prompt]]:
        """Consecutive batches in file order; the last one may be smaller. For validation."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self.prompts), batch_size):
            yield list(self.prompts[start : start + batch_size])


def render_prompt(
    prompt: PromptContent,
    tokenizer: PreTrainedTokenizerBase,
    apply_chat_template: bool,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
) -> str:
    """The prompt text the model sees (see the module docstring for the rules).

    ``prompt_template`` is template text (``resolve_template`` turns a preset name into it).
    """
    if prompt_template is not None:
        if not isinstance(prompt, str):
            raise DataError("data.prompt_template applies to string prompts; this prompt is a list of chat messages")
        prompt = apply_template(prompt_template, prompt)
    if not apply_chat_template:
        if not isinstance(prompt, str):
            raise DataError("a list of chat messages needs data.apply_chat_template=true")
        return prompt
    _require_chat_template(tokenizer)
    if isinstance(prompt, str):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
    else:
        messages = prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.chat_template is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
            "set data.apply_chat_template=false to use prompts as written"
        )


def load_prompts(
    files: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "solutions",
    apply_chat_template: bool = True,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    max_prompt_length: int = 1024,
    overlong_prompts: str = "drop",
    max_malformed_fraction: float = 0.0,
    max_line_bytes: int = MAX_LINE_BYTES,
    base: Path | None = None,
) -> PromptDataset:
    """Read, render and tokenise every prompt of ``files``; overlong prompts and malformed lines
    follow the rules of the module docstring.

    ``prompt_template`` is a preset name or a template string (``rlsys.data.templates``).
    """
    from rlsys.config import DataConfig

    if overlong_prompts not in DataConfig.OVERLONG_PROMPTS:
        raise ValueError(f"overlong_prompts must be one of {', '.join(DataConfig.OVERLONG_PROMPTS)}, "
                         f"got {overlong_prompts!r}")
    # Resolved before any file is read, so a misspelt preset is reported as a config error.
    template = resolve_template(prompt_template) if prompt_template is not None else None
    examples: list[Example] = []
    num_malformed = 0
    for file in files:
        path = Path(file) if base is None else base / file
        contents = read_examples(path, prompt_key=prompt_key, answer_key=answer_key,
                                 max_malformed_fraction=max_malformed_fraction, max_line_bytes=max_line_bytes)
        examples.extend(contents.examples)
        num_malformed += len(contents.dropped)

    if apply_chat_template:
        # Checked once here so the error does not look like a fault of the first prompt.
        _require_chat_template(tokenizer)
    texts = []
    for example in examples:
        try:
            texts.append(render_prompt(example.prompt, tokenizer, apply_chat_template, system_prompt, template))
        except DataError as exc:
            raise DataError(f"{example.location}: {exc}") from None
        except TemplateError as exc:  # templates reject conversations they cannot render
            raise DataError(f"{example.location}: the chat template failed: {exc}") from exc

    # Chat-rendered text already holds its special tokens; plain text gets the tokenizer's defaults.
    encoded = tokenizer(texts, add_special_tokens=not apply_chat_template)["input_ids"] if texts else []

    overlong = [i for i, token_ids in enumerate(encoded) if len(token_ids) > max_prompt_length]
    if overlong and overlong_prompts == "error":
        first = overlong[0]
        raise DataError(
            f"{examples[first].location}: prompt of {len(encoded[first])} tokens is longer than "
            f"data.max_prompt_length={max_prompt_length}; {len(overlong)} of {len(examples)} prompts are "
            "(data.overlong_prompts=error; 'drop' leaves them out, 'truncate' cuts them)"
        )
    prompts = []
    for example, text, token_ids in zip(examples, texts, encoded):
        if len(token_ids) > max_prompt_length:
            if overlong_prompts == "drop":
                continue
            token_ids = _truncate_middle(token_ids, max_prompt_length)
            text = tokenizer.decode(token_ids)
        prompts.append(Prompt(len(prompts), text, tuple(token_ids), example.answers, example.location))
    if overlong:
        logger.warning(
            "%s %d of %d prompts longer than data.max_prompt_length=%d tokens (data.overlong_prompts=%s) from %s; "
            "the first: %s",
            "dropped" if overlong_prompts == "drop" else "truncated", len(overlong), len(examples),
            max_prompt_length, overlong_prompts, ", ".join(str(f) for f in files),
            ", ".join(examples[i].location for i in overlong[:5]),
        )
    num_dropped = len(overlong) if overlong_prompts == "drop" else 0
    return PromptDataset(tuple(prompts), num_dropped, max_prompt_length,
                         num_truncated=len(overlong) - num_dropped, num_dropped_malformed=num_malformed)


def _truncate_middle(token_ids: Sequence[int], length: int) -> list[int]:
    """The first ``ceil(length / 2)`` and the last ``floor(length / 2)`` tokens."""
    tail = length // 2
    return [*token_ids[: length - tail], *token_ids[len(token_ids) - tail :]]


def load_train_prompts(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, base: Path | None = None
) -> PromptDataset:
    """The training prompts of a ``DataConfig``; an error when none are left."""
    dataset = _load_split(config, config.train_files, tokenizer, base)
    if not len(dataset):
        raise DataError(
            f"data.train_files: no prompts in {config.train_files} "
            f"({dataset.num_dropped_overlong} longer than data.max_prompt_length={config.max_prompt_length}, "
            f"{dataset.num_dropped_malformed} malformed lines)"
        )
    return dataset


def load_val_prompts(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, base: Path | None = None
) -> PromptDataset:
    """All validation prompts of a ``DataConfig``, in file order (empty when there are no files;
    an error when files are given and none of their prompts is left)."""
    dataset = _load_split(config, config.val_files, tokenizer, base)
    if config.val_files and not len(dataset):
        raise DataError(
            f"data.val_files: no prompts in {config.val_files} "
            f"({dataset.num_dropped_overlong} longer than data.max_prompt_length={config.max_prompt_length}, "
            f"{dataset.num_dropped_malformed} malformed lines)"
        )
    return dataset


def _load_split(
    config: DataConfig, files: Sequence[str], tokenizer: PreTrainedTokenizerBase, base: Path | None
) -> PromptDataset:
    return load_prompts(
        files,
        tokenizer,
        prompt_key=config.prompt_key,
        answer_key=config.answer_key,
        apply_chat_template=config.apply_chat_template,
        system_prompt=config.system_prompt,
        prompt_template=config.prompt_template,
        max_prompt_length=config.max_prompt_length,
        overlong_prompts=config.overlong_prompts,
        max_malformed_fraction=config.max_malformed_fraction,
        max_line_bytes=config.max_line_bytes,
        base=base,
    )
