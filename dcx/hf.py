"""Hugging Face transformers models with dcx: a model folder loaded offline, its config carried
in the .dcx manifest, and the compressed model rebuilt from the file alone.

    model = dcx.hf.load_folder("path/to/all-MiniLM-L6-v2")     # its config's class, offline
    dcx.convert_(model, dcx.ConvertConfig(bits=6))
    dcx.save(model, "minilm.dcx", extra=dcx.hf.manifest_extra(model))
    fresh = dcx.hf.model_from_file("minilm.dcx")                 # config from the manifest

transformers (and safetensors) are optional: pip install 'dcx[hf]'. Without them these
functions raise MissingDependency, which says what to install.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from torch import nn

__all__ = ["MissingDependency", "require", "is_model_folder", "load_folder", "manifest_extra",
           "model_class", "model_from_file", "MANIFEST_KEY", "CLASS_KEY"]

MANIFEST_KEY = "transformers"  # the manifest entry holding the model's config (config.to_dict)
CLASS_KEY = "transformers_class"  # the class the file was saved from (files before 1.5: none)


class MissingDependency(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def require(package: str, extra: str = "hf"):
    """The module `package`, or MissingDependency naming the dcx extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependency(f"{package} is not installed; install it with "
                                f"pip install 'dcx[{extra}]' (or pip install {package})") from None


def is_model_folder(path) -> bool:
    """A transformers model folder: a config.json beside the weights."""
    return (Path(path) / "config.json").is_file()


def load_folder(path) -> nn.Module:
    """The model of a transformers folder (config.json + weights), offline (nothing is fetched
    from a hub), in eval mode: the class its config names first in "architectures", else
    AutoModel."""
    if not is_model_folder(path):
        raise FileNotFoundError(f"{str(path)!r} is not a transformers model folder (no "
                                "config.json in it)")
    transformers = require("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = model_class(transformers, (getattr(config, "architectures", None) or [None])[0])
    return cls.from_pretrained(str(path), local_files_only=True).eval()


def model_class(transformers, name):
    """The transformers model class called `name` (LlamaForCausalLM: the language model head,
    tied to the embedding, included), when transformers has it; else AutoModel."""
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel


def manifest_extra(model: nn.Module) -> dict:
    """{MANIFEST_KEY: the model's config} for dcx.save(..., extra=), so the file and the config
    alone rebuild the model; {} for a model that is not a transformers one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    return {MANIFEST_KEY: json.loads(config.to_json_string(use_diff=False)),
            CLASS_KEY: type(model).__name__}


def model_from_file(path, packed: bool = True, compute: str | None = None) -> nn.Module:
    """The compressed model of a .dcx file written from a transformers model: the class it was
    saved from (the manifest's CLASS_KEY; AutoModel for files without it) built from the config
    in the file's manifest, then filled by dcx.load (checked completely first).
    compute: one compute mode for every packed layer; None: each layer's as saved (dcx.load)."""
    from dcx import format as fmt
    from dcx.io import load

    manifest, _ = fmt.parse(fmt.read(path))
    config = manifest["extra"].get(MANIFEST_KEY)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path}: the file carries no transformers config (save it with "
                         "extra=dcx.hf.manifest_extra(model), as dcx convert does)")
    transformers = require("transformers")
    config = dict(config)
    auto = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    cls = model_class(transformers, manifest["extra"].get(CLASS_KEY))
    model = transformers.AutoModel.from_config(auto) if cls is transformers.AutoModel else cls(auto)
    return load(path, model.eval(), packed, compute)
