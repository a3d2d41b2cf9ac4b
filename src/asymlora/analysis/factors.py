"""Read saved adapters from disk into per-module, per-expert LoRA factors.

Two formats are understood:

- **asymlora** (``"peft_type": "ASYMLORA"``): tensors ``<module>.asymlora_<name>`` as the method's
  ``specs()`` declare them. The method registry rebuilds each layer's tensor dict and its
  ``expert_factors`` turns it into ordinary (A_i, B_i) pairs (ALoRA: (A_i, B) for each i; HydraLoRA: (A, B_i);
  MALoRA: (P_i S, B_i) …). Roles and which tensors are shared by all experts come from the specs.
- **plain peft LoRA** (``"peft_type": "LORA"``): ``<module>.lora_A.weight`` (r × d_in) and
  ``<module>.lora_B.weight`` (d_out × r), one expert.

A path may be the adapter directory itself or a run directory holding one: ``<dir>/adapter``,
``<dir>/final`` (or ``<dir>/final/adapter``), or the newest ``<dir>/checkpoint-<step>`` (a Trainer's) or
``<dir>/checkpoints/step-<step>`` (an asymlora run still training, or killed).

    from asymlora.analysis.factors import load_adapter
    ad = load_adapter("runs/alora-seed0")
    for module, experts in ad.modules.items():
        for A_i, B_i in experts: ...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from asymlora.methods import get_method
from asymlora.methods.base import ATTR_PREFIX, TENSOR_NAMES, Role
from asymlora.tuner.config import AsymLoraConfig
from asymlora.tuner.layer import dequantized_weight

__all__ = [
    "CONFIG_NAME",
    "AdapterFactors",
    "check_compatible",
    "find_adapter_dir",
    "load_adapter",
    "load_base_weights",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_SAFE = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
PEFT_KEY_PREFIX = "base_model.model."
"""peft's prefix on saved adapter keys; stripped so module names read as in the base model."""

# Sentinel sizes for matching a method's spec shapes against stored shapes: any axis equal to one of
# these is d_in / d_out; every other axis must match exactly.
_D_IN = 1_000_003
_D_OUT = 1_000_033


@dataclass
class AdapterFactors:
    """One adapter read from disk, as ordinary LoRA pairs per module and expert.

    Attributes:
        label: short name used in reports (defaults to the directory name).
        source: the path given by the user.
        path: the adapter directory actually read (holds ``adapter_config.json``).
        peft_type: ``"ASYMLORA"`` or ``"LORA"``.
        method: asymlora method name; ``"lora"`` for a plain peft LoRA.
        base_model: ``base_model_name_or_path`` from the config (None when not recorded).
        r: nominal rank from the config (per-expert rank of each A_i is ``A_i.shape[0]``).
        num_experts: experts per layer (1 for plain LoRA).
        modules: module name (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``) ->
            ``[(A_i, B_i), ...]`` with A_i (r_i × d_in), B_i (d_out × r_i), float64 on CPU.
        shapes: module -> (d_out, d_in) of the adapted linear layer.
        scaling: module -> s (the update of expert i is ΔW_i = s · B_i A_i).
        shared: role -> True when one tensor of that role serves every expert (ALoRA's B, HydraLoRA's A).
        fan_in_fan_out: the base layer stores its weight transposed (GPT-2 Conv1D).
        config: the raw adapter_config.json.
    """

    label: str
    source: Path
    path: Path
    peft_type: str
    method: str
    base_model: str | None
    r: int
    num_experts: int
    modules: dict[str, list[tuple[Tensor, Tensor]]]
    shapes: dict[str, tuple[int, int]]
    scaling: dict[str, float]
    shared: dict[str, bool] = field(default_factory=lambda: {"A": False, "B": False})
    fan_in_fan_out: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def delta_weight(self, module: str, expert: int) -> Tensor:
        """ΔW_i = s · B_i A_i (d_out × d_in, float64) of one expert on one module."""
        a, b = self.modules[module][expert]
        return self.scaling[module] * (b @ a)

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly description (no tensors)."""
        ranks = sorted({a.shape[0] for experts in self.modules.values() for a, _ in experts})
        return {
            "label": self.label,
            "source": str(self.source),
            "path": str(self.path),
            "peft_type": self.peft_type,
            "method": self.method,
            "base_model": self.base_model,
            "r": self.r,
            "expert_ranks": ranks,
            "num_experts": self.num_experts,
            "num_modules": len(self.modules),
            "shapes": {m: list(s) for m, s in self.shapes.items()},
            "scaling": sorted(set(self.scaling.values())),
            "shared": dict(self.shared),
            "router": self.config.get("router"),
            "task_names": self.config.get("task_names"),
        }


# --- locating the adapter ------------------------------------------------------------------------------------
def _checkpoint_step(p: Path) -> int:
    m = re.fullmatch(r"(?:checkpoint|step)-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The directory holding ``adapter_config.json`` for ``path``.

    Looks in ``path`` itself, then ``path/adapter``, ``path/final``, ``path/final/adapter``, then the
    newest ``path/checkpoint-<step>`` or ``path/checkpoints/step-<step>`` (highest step; itself or its
    ``adapter`` subdirectory).
    Raises ``ValueError`` saying what was looked for when nothing is found.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist (expected an adapter directory or a run directory holding one)")
    if p.is_file():
        if p.name == CONFIG_NAME:
            return p.parent
        raise ValueError(
            f"{p} is a file; pass the adapter directory (the one holding {CONFIG_NAME}) or a run directory"
        )
    candidates = [p, p / "adapter", p / "final", p / "final" / "adapter"]
    # a Trainer's checkpoint-<step>, or asymlora's own checkpoints/step-<step> of a run still training or killed
    checkpoints = sorted(
        (c for c in [*p.glob("checkpoint-*"), *p.glob("checkpoints/step-*")] if c.is_dir()),
        key=_checkpoint_step,
        reverse=True,
    )
    for ckpt in checkpoints:
        candidates += [ckpt, ckpt / "adapter"]
    for c in candidates:
        if (c / CONFIG_NAME).is_file():
            return c
    # a compare run (asymlora demo, compare.methods) keeps one run directory per method: <run>/<method>/adapter
    # and `asymlora experiment init-similarity` keeps its adapters as <out>/adapters/<run>
    nested = sorted({str(c.parent) for c in p.glob(f"*/{CONFIG_NAME}")}
                    | {str(c.parent.parent) for c in p.glob(f"*/adapter/{CONFIG_NAME}")}
                    | {str(c.parent) for c in p.glob(f"adapters/*/{CONFIG_NAME}")})  # fmt: skip
    hint = f" Subdirectories holding adapters (pass them): {nested[:5]}." if nested else ""
    raise ValueError(
        f"{p} is not an adapter: no {CONFIG_NAME} in it, nor in {p.name}/adapter, {p.name}/final or a "
        f"{p.name}/checkpoint-* or {p.name}/checkpoints/step-* directory.{hint} Pass a directory written by save_pretrained (asymlora or "
        "peft LoRA) or a training run directory."
    )


def _read_state(adapter_dir: Path) -> dict[str, Tensor]:
    safe = adapter_dir / WEIGHTS_SAFE
    if safe.is_file():
        try:
            with safe_open(str(safe), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"{safe} cannot be read as safetensors (truncated or corrupt?): {e}") from e
    binary = adapter_dir / WEIGHTS_BIN
    if binary.is_file():
        state = torch.load(str(binary), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{binary} does not hold a state dict")
        return dict(state)
    raise ValueError(f"{adapter_dir} has {CONFIG_NAME} but no weights ({WEIGHTS_SAFE} or {WEIGHTS_BIN})")


def _module_name(key_module: str) -> str:
    return key_module[len(PEFT_KEY_PREFIX) :] if key_module.startswith(PEFT_KEY_PREFIX) else key_module


# --- asymlora --------------------------------------------------------------------------------------------------
def _split_asymlora_key(key: str) -> tuple[str, str] | None:
    """``<module>.asymlora_<name>`` (optionally followed by ``.<adapter>``) -> (module, name); else None."""
    parts = key.split(".")
    for pos in (len(parts) - 1, len(parts) - 2):
        if pos < 1:
            continue
        leaf = parts[pos]
        if leaf.startswith(ATTR_PREFIX) and leaf[len(ATTR_PREFIX) :] in TENSOR_NAMES:
            return ".".join(parts[:pos]), leaf[len(ATTR_PREFIX) :]
    return None


def _unify(spec_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int | None, int | None] | None:
    """Match a spec shape written with sentinel d_in/d_out against a stored shape -> (d_in, d_out) or None."""
    if len(spec_shape) != len(shape):
        return None
    d_in = d_out = None
    for want, got in zip(spec_shape, shape, strict=True):
        if want == _D_IN:
            if d_in not in (None, got):
                return None
            d_in = got
        elif want == _D_OUT:
            if d_out not in (None, got):
                return None
            d_out = got
        elif want != got:
            return None
    return d_in, d_out


def _asymlora_config(raw: dict[str, Any], where: Path) -> AsymLoraConfig:
    names = set(AsymLoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in names and k not in ("peft_type",)}
    try:
        return AsymLoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where / CONFIG_NAME}: invalid asymlora config: {e}") from e


def _layer_shape(
    adapter_dir: Path, module: str, cfg: Any, template: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> tuple[int, int]:
    """(d_in, d_out) of ``module``, read from its tensors against the method's specs ``template``.

    Raises:
        ValueError: a declared tensor is missing, or a shape does not fit the config.
    """
    d_in = d_out = None
    for name, spec in template.items():
        if name not in tensors:
            raise ValueError(
                f"{adapter_dir}: module {module} lacks tensor {ATTR_PREFIX}{name} that method "
                f"{cfg.method!r} declares (has: {sorted(tensors)})"
            )
        got = tuple(tensors[name].shape)
        dims = _unify(spec.shape, got)
        if (
            dims is None
            or (d_in is not None and dims[0] not in (None, d_in))
            or (d_out is not None and dims[1] not in (None, d_out))
        ):
            raise ValueError(
                f"{adapter_dir}: module {module} tensor {name} has shape {got}, which does not fit method "
                f"{cfg.method!r} with r={cfg.r}, num_experts={cfg.num_experts} (config and weights disagree)"
            )
        d_in = dims[0] if dims[0] is not None else d_in
        d_out = dims[1] if dims[1] is not None else d_out
    if d_in is None or d_out is None:
        raise ValueError(f"{adapter_dir}: cannot tell the layer shape of module {module} from its tensors")
    return d_in, d_out


def _load_asymlora(adapter_dir: Path, raw: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    cfg = _asymlora_config(raw, adapter_dir)
    method = get_method(cfg.method)
    n_experts = method.num_experts(cfg)
    per_module: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        split = _split_asymlora_key(key)
        if split is not None:
            module, name = split
            per_module.setdefault(_module_name(module), {})[name] = value
    if not per_module:
        raise ValueError(
            f"{adapter_dir / WEIGHTS_SAFE} holds no asymlora tensors (<module>.{ATTR_PREFIX}<name>); "
            "is the config from another adapter?"
        )
    template = method.specs(cfg, _D_IN, _D_OUT)
    shared = {}
    for role in (Role.A, Role.B):
        role_specs = [s for s in template.values() if s.role == role]
        shared[str(role)] = (
            n_experts > 1 and bool(role_specs) and all(s.expert_dim is None for s in role_specs)
        )
    modules: dict[str, list[tuple[Tensor, Tensor]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module, tensors in per_module.items():
        d_in, d_out = _layer_shape(adapter_dir, module, cfg, template, tensors)
        t64 = {name: tensors[name].to(torch.float64) for name in template}
        with torch.no_grad():
            pairs = method.expert_factors(t64, n_experts)
        modules[module] = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
        shapes[module] = (d_out, d_in)
    return {
        "method": cfg.method,
        "r": cfg.r,
        "num_experts": n_experts,
        "modules": modules,
        "shapes": shapes,
        "scaling": dict.fromkeys(modules, float(cfg.scaling)),
        "shared": shared,
        "fan_in_fan_out": bool(cfg.fan_in_fan_out),
    }


# --- plain peft LoRA ----------------------------------------------------------------------------------------
def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha pattern lookup: a key matches when it is a dotted suffix (regex) of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_peft_lora(adapter_dir: Path, raw: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Any]:
    found: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            found.setdefault(_module_name(".".join(parts[:-2])), {})[parts[-2][-1]] = value
    if not found:
        raise ValueError(
            f"{adapter_dir}: a LORA config but no <module>.lora_A.weight / lora_B.weight tensors"
        )
    r_cfg = int(raw.get("r", 8))
    alpha_cfg = float(raw.get("lora_alpha", r_cfg))
    modules: dict[str, list[tuple[Tensor, Tensor]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    scaling: dict[str, float] = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: module {module} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"].to(torch.float64), ab["B"].to(torch.float64)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{adapter_dir}: module {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, d_in) and (d_out, r) linear LoRA factors (conv/embedding LoRA is not supported)"
            )
        rank = a.shape[0]
        alpha = float(_pattern_value(raw.get("alpha_pattern") or {}, module, alpha_cfg))
        scaling[module] = alpha / (rank**0.5 if raw.get("use_rslora") else rank)
        modules[module] = [(a, b)]
        shapes[module] = (b.shape[0], a.shape[1])
    return {
        "method": "lora",
        "r": r_cfg,
        "num_experts": 1,
        "modules": modules,
        "shapes": shapes,
        "scaling": scaling,
        "shared": {"A": False, "B": False},
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out", False)),
    }


def _check_finite(adapter_dir: Path, modules: Mapping[str, list[tuple[Tensor, Tensor]]]) -> None:
    for module, experts in modules.items():
        for e, pair in enumerate(experts):
            for role, t in zip("AB", pair, strict=True):
                if not bool(torch.isfinite(t).all()):
                    n_bad = int((~torch.isfinite(t)).sum())
                    raise ValueError(
                        f"{adapter_dir}: {role} of expert {e} in module {module} has {n_bad} NaN/Inf entries "
                        f"of {t.numel()}; the training run that wrote it diverged or the file is corrupt"
                    )


def load_adapter(path: str | os.PathLike, label: str | None = None) -> AdapterFactors:
    """Read an adapter (or a run directory holding one) into `AdapterFactors`.

    Raises ``ValueError`` for a path that is not an adapter, an unsupported ``peft_type``, or weights that
    do not fit the config.
    """
    source = Path(path)
    adapter_dir = find_adapter_dir(source)
    cfg_path = adapter_dir / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    peft_type = str(raw.get("peft_type", ""))
    if peft_type == "ASYMLORA":
        parts = _load_asymlora(adapter_dir, raw, _read_state(adapter_dir))
    elif peft_type == "LORA":
        parts = _load_peft_lora(adapter_dir, raw, _read_state(adapter_dir))
    else:
        raise ValueError(
            f"{cfg_path}: peft_type {peft_type!r} is not supported; analysis reads asymlora adapters "
            "(ASYMLORA) and plain peft LoRA adapters (LORA)"
        )
    _check_finite(adapter_dir, parts["modules"])
    if label is None:
        label = source.name if source.name not in ("", ".") else adapter_dir.name
    return AdapterFactors(
        label=label,
        source=source,
        path=adapter_dir,
        peft_type=peft_type,
        base_model=raw.get("base_model_name_or_path"),
        config=raw,
        **parts,
    )


def check_compatible(a: AdapterFactors, b: AdapterFactors) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` adapt the same modules of the same base model with the same
    layer shapes (ranks may differ). The message names the base models or the differing modules/shapes."""
    if a.base_model and b.base_model and a.base_model != b.base_model:
        raise ValueError(
            f"cannot pair {a.label!r} and {b.label!r}: different base models ({a.base_model!r} vs "
            f"{b.base_model!r}); their weight spaces are not comparable"
        )
    only_a = sorted(set(a.modules) - set(b.modules))
    only_b = sorted(set(b.modules) - set(a.modules))
    if only_a or only_b:
        raise ValueError(
            f"cannot pair {a.label!r} and {b.label!r}: they adapt different modules "
            f"(only in {a.label!r}: {only_a[:4]}{' …' if len(only_a) > 4 else ''}; "
            f"only in {b.label!r}: {only_b[:4]}{' …' if len(only_b) > 4 else ''})"
        )
    diff = [(m, a.shapes[m], b.shapes[m]) for m in a.modules if a.shapes[m] != b.shapes[m]]
    if diff:
        shown = "; ".join(f"{m}: {sa} vs {sb} (d_out, d_in)" for m, sa, sb in diff[:4])
        raise ValueError(
            f"cannot pair {a.label!r} and {b.label!r}: layer shapes differ in {len(diff)} module(s) — {shown}"
            f"{' …' if len(diff) > 4 else ''}; were they trained on different base models?"
        )


# --- base weights ------------------------------------------------------------------------------------------------
def _candidate_keys(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[k:]) + ".weight" for k in range(len(parts))]


def _weights_from_safetensors(root: Path, modules: list[str]) -> dict[str, Tensor]:
    files = sorted(root.glob("*.safetensors"))
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for k in h.keys():  # noqa: SIM118
                index.setdefault(k, f)
    out: dict[str, Tensor] = {}
    for module in modules:
        key = next((k for k in _candidate_keys(module) if k in index), None)
        if key is None:
            continue
        with safe_open(str(index[key]), framework="pt", device="cpu") as h:
            out[module] = h.get_tensor(key)
    return out


def _weights_from_module(model: nn.Module, modules: list[str]) -> dict[str, Tensor]:
    named = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for module in modules:
        for name in (module, PEFT_KEY_PREFIX + module, "base_model." + module):
            layer = named.get(name)
            if layer is None:
                continue
            if hasattr(layer, "get_base_layer"):
                layer = layer.get_base_layer()
            if isinstance(getattr(layer, "weight", None), Tensor):
                out[module] = dequantized_weight(layer).detach()  # a bitsandbytes W0 dequantised
                break
    return out


def load_base_weights(
    base_model: str | os.PathLike | nn.Module | Mapping[str, Tensor], modules: list[str]
) -> dict[str, Tensor]:
    """Frozen weights W0 (d_out × d_in as stored) of ``modules`` from the base model.

    ``base_model`` may be a directory of ``*.safetensors`` files (read lazily, only the needed tensors), a
    built-in model name (``smollm2-135m``: its converted cache directory, as `asymlora.models.load` reads), an
    in-memory ``nn.Module`` (a base model or a peft model wrapping it), a state dict, or anything
    ``transformers.AutoModelForCausalLM.from_pretrained`` accepts. Raises ``ValueError`` naming the missing
    modules, ``FileNotFoundError`` for a local path that does not exist.
    """
    if isinstance(base_model, nn.Module):
        out = _weights_from_module(base_model, modules)
    elif isinstance(base_model, Mapping):
        out = {}
        for module in modules:
            key = next((k for k in _candidate_keys(module) if k in base_model), None)
            if key is not None:
                out[module] = base_model[key]
    else:
        from asymlora import models  # lazily: the GGUF converter is not needed to read adapters

        name = str(base_model)
        if isinstance(base_model, str) and name.lower() in models.BUILTIN_MODELS:
            root = models.ensure_builtin_cached(name)  # the directory `models.load(name)` reads
        else:  # FileNotFoundError for a local path that does not exist (it was tried as a hub id)
            root = Path(models.resolve_source(name))
        if root.is_dir() and any(root.glob("*.safetensors")):
            out = _weights_from_safetensors(root, modules)
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
            except Exception as e:  # transformers raises many types for a bad path
                raise ValueError(f"cannot load base model {str(base_model)!r}: {e}") from e
            out = _weights_from_module(model, modules)
    missing = [m for m in modules if m not in out]
    if missing:
        raise ValueError(
            f"base model {getattr(base_model, 'name_or_path', base_model)!s:.200} has no weight for "
            f"{len(missing)} adapted module(s), e.g. {missing[:3]}; is it the model the adapters were trained on?"
        )
    return out
