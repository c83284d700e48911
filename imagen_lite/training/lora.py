"""LoRA adapters (``peft``) on the UNets and the prior: add, save separately, load, merge.

A LoRA directory holds ``adapter_config.json``::

    {"format": "imagen-lite-lora", "version": 1, "pipeline": "ImagenPipeline", "stage": "base",
     "components": {"unet": {"r": 8, "lora_alpha": 8, "target_modules": ["to_q", ...]}}}

and one ``<component>.safetensors`` per adapted component, holding the adapter's parameters
under the names ``peft`` gives them inside that component (``...to_q.lora_A.default.weight``).
Loading reads only JSON and safetensors: nothing in a LoRA directory can execute code.

``load_pipeline(..., lora=PATH)`` calls :func:`load_lora`; training uses :func:`add_lora`,
:func:`save_lora` and :func:`merge_lora` (to write a full pipeline with the adapters folded in).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = "imagen-lite-lora"
CONFIG_FILE = "adapter_config.json"
ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'imagen-lite[lora]' (or pip install peft)") from None
    return peft


def add_lora(module: torch.nn.Module, r: int, alpha: float | None, targets) -> dict:
    """Inject a LoRA adapter into ``module`` (its base weights are frozen); returns the adapter
    config as saved. Raises when no layer of ``module`` matches ``targets``."""
    peft = _peft()
    targets = list(targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()} | {n for n, _ in module.named_modules()}
    if not any(t in names or any(n.endswith("." + t) for n in names) for t in targets):
        raise ValueError(
            f"lora_targets={targets} match no layer of {type(module).__name__}; its attention layers are named "
            "to_q/to_k/to_v/to_out.0 (pass --lora-targets to choose others)"
        )
    config = dict(r=int(r), lora_alpha=float(alpha if alpha is not None else r), target_modules=targets,
                  init_lora_weights="gaussian")  # fmt: skip
    module.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(**config), module, adapter_name=ADAPTER)
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return config


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in module.named_parameters() if "lora_" in n}


def save_lora(out_dir, modules: dict[str, torch.nn.Module], configs: dict[str, dict], pipeline: str, stage: str) -> Path:
    """Write the adapters of ``modules`` (component name -> module) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file(lora_state_dict(module), str(out / f"{name}.safetensors"))
    meta = {"format": FORMAT, "version": 1, "pipeline": pipeline, "stage": stage, "components": configs}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_lora(pipe, path) -> list[str]:
    """Add the adapters saved in ``path`` to ``pipe``'s components; returns their names.

    Errors name the path and what was expected: a missing directory or config, another
    pipeline class, a component the pipeline lacks, or weights that do not fit."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"lora={str(path)!r} is not a LoRA directory (no {CONFIG_FILE}); pass OUT/lora of a LoRA run")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("components"), dict):
        raise ValueError(f"{config_file} is not an imagen-lite LoRA config (format {FORMAT!r} with 'components')")
    if meta.get("pipeline") and meta["pipeline"] != type(pipe).__name__:
        raise ValueError(
            f"lora={str(path)!r} was trained for a {meta['pipeline']}, but the pipeline is a {type(pipe).__name__}"
        )
    for name, config in meta["components"].items():
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"lora={str(path)!r} adapts component {name!r}, which this {type(pipe).__name__} lacks")
        weights = path / f"{name}.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"lora={str(path)!r} has no {weights.name} for component {name!r}")
        try:
            state = load_file(str(weights))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{weights} is corrupt or truncated ({type(err).__name__}: {err})") from None
        add_lora(module, config["r"], config["lora_alpha"], config["target_modules"])
        expected = {n for n, _ in module.named_parameters() if "lora_" in n}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"{weights} does not fit component {name!r}: missing {missing}, unexpected {extra}")
        param = next(module.parameters())
        module.load_state_dict({k: v.to(param.device, param.dtype) for k, v in state.items()}, strict=False)
        module.requires_grad_(False)
    return list(meta["components"])


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer of ``module`` into its base weights and remove the adapters (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, sub.get_base_layer())
    return module
