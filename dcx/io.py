"""Models <-> .dcx files: the one place that knows both modules and the file (dcx.format knows
only bytes and tensors, dcx.state only modules).

    dcx.save(model, "model.dcx")                 # after any stage, no other argument
    model = dcx.load("model.dcx", MyModel())     # a freshly built model, compressed layers packed
    tensors = dcx.load_state_dict("model.dcx")   # no model: the decoded tensors

What `save` stores for each parameter with compressed state (dcx.state), all Huffman coded:
  pruned and shared  the codes of the kept weights at relative positions, or the codes of every
                     position with a symbol for "pruned", whichever is smaller
  shared only        the codes of every position (dense mode)
  pruned only        the kept weights' values, raw, at relative positions
and every other state_dict entry raw. Packed layers (SparseQuant*, from dcx.convert or an
earlier load) are stored the same way, from their packed state. Saving what it cannot encode
raises: a non-tensor entry in the state_dict, a pruned position that holds a non-zero value, a
shared weight that no longer equals codebook[labels].

`load` checks the file completely, and the model's names and shapes against it, before anything
is written to the model; then it restores each layer's state and, with packed=True, swaps the
shared nn.Linear / nn.Conv2d layers for SparseQuantLinear / SparseQuantConv2d
(dcx.convert.pack_layers_, as convert_ does). A layer no packed twin can run keeps its decoded
weight and its state, so `load(..., packed=False)` gives a model the stages can carry on with.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from dcx import format as fmt
from dcx import state
from dcx.config import EncodeConfig, check_compute
from dcx.convert import pack_layers_
from dcx.packing import dense_by_density

__all__ = ["save", "load", "load_state_dict", "encode", "records", "layer_settings"]


def _index_bits(st: state.LayerState) -> int:
    if st.index_bits is not None:
        return st.index_bits
    default = EncodeConfig()
    return default.conv_index_bits if st.conv else default.linear_index_bits


def _record(st: state.LayerState) -> fmt.CompressedTensor:
    """The file record of one layer's state; ValueError when the weight does not match it."""
    if st.shared:
        mask = st.kept
        if not (st.live or st.packed):
            weight, expected = getattr(st.module, st.param).detach(), st.shared_values()
            if not torch.equal(weight, expected):
                raise ValueError(
                    f"{st.name}: {int((weight != expected).sum())} weights differ from "
                    "codebook[labels]: the weight changed after finalize_clustering_; share it "
                    "again (dcx.cluster_) or save it as it was")
        return fmt.CompressedTensor(mask.cpu(), st.labels.cpu(), st.codebook.detach().cpu(),
                                    st.bits, index_bits=_index_bits(st),
                                    scale=None if st.scale is None else st.scale.detach().cpu())
    weight = st.weight()
    mask = st.mask
    moved = int((weight[~mask] != 0).sum())
    if moved:
        raise ValueError(
            f"{st.name}: {moved} pruned positions hold non-zero values (an optimizer that does "
            "not know the masks moved them); zero them with dcx.prune.apply_masks_(model), or "
            "train with dcx.MaskedSGD / dcx.mask_optimizer_")
    return fmt.CompressedTensor(mask.cpu(), values=weight.cpu(), index_bits=_index_bits(st))


def records(model: nn.Module, states: Optional[dict] = None) -> tuple[dict, dict, dict]:
    """(compressed {name: CompressedTensor}, raw {name: Tensor}, tied {name: name}) of `model`:
    what `save` writes. A weight tied to a compressed one (the same Parameter, or a packed layer
    reading the same packed weight) is stored once, under its first name, and `tied` maps each
    other name to that one. states: dcx.state.layers(model), when the caller has it already."""
    compressed, owned, tied, holders = {}, set(), {}, {}
    for name, st in (state.layers(model) if states is None else states).items():
        prefix = f"{st.module_name}." if st.module_name else ""
        owned |= {prefix + key for key in st.keys}
        holder = st.module._buffers["codes"] if st.packed else st.module._parameters.get(st.param)
        if holder is not None and id(holder) in holders:
            tied[name] = holders[id(holder)]
            continue
        if holder is not None:
            holders[id(holder)] = name
        compressed[name] = _record(st)
    raw = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in owned:
            continue
        if id(value) in holders:  # a plain layer's Parameter tied to a compressed weight
            tied[key] = holders[id(value)]
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{key}: {type(value).__name__} (a module's extra state) cannot be "
                             "stored: a .dcx file holds tensors only")
        raw[key] = value.detach()
    return compressed, raw, tied


def layer_settings(model: nn.Module, states: Optional[dict] = None) -> dict:
    """{module name: settings} of the packed Linear / Conv2d layers of `model` that differ from
    what dcx.load does by default: "compute" (default "auto") and "mode", "dense" or "sparse"
    (default: by density, as dcx.pack chooses); the manifest's "layers" (dcx.format). Only the
    choices are written, so a loaded file saves again to the same bytes. states: as records'."""
    states = state.layers(model) if states is None else states
    settings = {}
    for st in states.values():
        m, name = st.module, st.module_name
        if not hasattr(m, "packed"):
            continue
        mine = {} if m.compute == "auto" else {"compute": m.compute}
        if m.packed.dense != dense_by_density(st.mask):
            mine["mode"] = "dense" if m.packed.dense else "sparse"
        if mine:
            settings[name] = mine
    return settings


def encode(model: nn.Module, config=None, extra: Optional[dict] = None) -> bytes:
    """The bytes `save` writes. config: the compression config (a dict, or an object with
    to_dict()), kept in the manifest; extra: more JSON-serialisable manifest entries."""
    states = state.layers(model)  # one state per layer: a packed one decodes once
    compressed, raw, tied = records(model, states)
    if not compressed:
        warnings.warn("no layer of the model holds compressed state (prune_, cluster_ or convert "
                      "first): the file stores every tensor raw", stacklevel=3)
    manifest = dict(extra or {})
    if config is not None:
        manifest["config"] = config.to_dict() if hasattr(config, "to_dict") else config
    return fmt.encode_file(compressed, raw, manifest, layer_settings(model, states), tied)


def save(model: nn.Module, path, config=None, extra: Optional[dict] = None) -> Path:
    """Write `model` as a .dcx file at `path` (atomically; the file follows the umask) and return
    the path. The same model gives the same bytes."""
    fmt.write_atomic(path, encode(model, config, extra))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Loading


def _record_dtype(ct: fmt.CompressedTensor) -> torch.dtype:
    return (ct.values if ct.values is not None else ct.codebook).dtype


def _check_fits(model: nn.Module, compressed: dict, raw: dict, tied: dict):
    """ValueError, before anything is written, unless every name, shape and dtype of the file
    matches the model (a tied name as the tensor it is tied to)."""
    state_dict = model.state_dict()
    owned, problems = set(), []
    for name in tied:  # a tie makes one weight Parameter (or packed weight) of two modules
        module_name, _, param = name.rpartition(".")
        module = _submodule(model, module_name)
        if module is None:
            continue  # said below, with the records
        if param != "weight" or not (hasattr(module, "packed")
                                     or isinstance(module._parameters.get(param), nn.Parameter)):
            problems.append(f"{name}: the file ties it to {tied[name]}, but it is not a "
                            "module's weight Parameter")
    compressed = {**compressed, **{n: compressed[s] for n, s in tied.items()}}
    for name, ct in compressed.items():
        module_name, _, param = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{name}: the model has no module {module_name!r}")
            continue
        st = state.get(module, param, module_name)
        if hasattr(module, "layer_state"):
            if ct.codebook is None:
                problems.append(f"{name}: {type(module).__name__} runs shared weights, the file "
                                "holds the layer pruned only; load it into the plain layer")
                continue
            shape, dtype = (module.weight_shape, module.codebook.dtype) if param == "weight" \
                else (None, None)
        else:
            target = getattr(module, param, None)
            shape, dtype = (target.shape, target.dtype) if isinstance(target, Tensor) \
                else (None, None)
        if shape is None:
            problems.append(f"{name}: {type(module).__name__} has no tensor {param!r}")
            continue
        if tuple(shape) != ct.shape or dtype != _record_dtype(ct):
            problems.append(f"{name}: the file holds {_record_dtype(ct)} {ct.shape}, the model "
                            f"{dtype} {tuple(shape)}")
        prefix = f"{module_name}." if module_name else ""
        owned |= {prefix + k for k in (st.keys if st is not None else (param,))}
    for name, t in raw.items():
        if name in state_dict and (state_dict[name].shape != t.shape
                                   or state_dict[name].dtype != t.dtype):
            problems.append(f"{name}: the file holds {t.dtype} {tuple(t.shape)}, the model "
                            f"{state_dict[name].dtype} {tuple(state_dict[name].shape)}")
    missing = sorted(set(state_dict) - owned - set(raw))
    unexpected = sorted(set(raw) - set(state_dict))
    if missing or unexpected or problems:
        raise ValueError(f"the file does not match the model: missing {missing}, unexpected "
                         f"{unexpected}" + "".join(f"; {p}" for p in problems))


@torch.no_grad()
def _restore(model: nn.Module, name: str, ct: fmt.CompressedTensor, dense: Optional[bool]):
    """Put one record back: a packed layer is repacked (in dense or sparse mode as the file says,
    None: by density), any other layer gets the decoded weight and the record's state (mask,
    codebook and labels, index bits)."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "packed"):
        module.load_compressed(ct.mask, ct.labels, ct.codebook, ct.bits, dense=dense,
                               scale=ct.scale)
        return
    state.set_compressed_(module, param, ct.to_dense(), ct.mask, ct.codebook, ct.labels, ct.bits,
                          ct.scale)
    state.set_index_bits_(module, param, ct.index_bits)


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _untie_stored(model: nn.Module, names) -> None:
    """Give each of `names` (module.param, all stored in the file) a Parameter of its own where
    the model ties two of them and the file does not: each gets its own record."""
    seen = set()
    for name in names:
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        p = module._parameters.get(param)
        if p is None:
            continue
        if id(p) in seen:
            module._parameters[param] = nn.Parameter(p.detach().clone(), p.requires_grad)
        seen.add(id(p))


def _tie(model: nn.Module, name: str, source: str, ct: fmt.CompressedTensor,
         dense: Optional[bool]):
    """Make the model's `name` the weight `source` (restored already) again: the same Parameter
    for plain layers, the same packed weight for packed ones. A plain and a packed layer cannot
    share; the one named gets its own copy of the record."""
    (module_name, _, param), (source_module_name, _, source_param) = (name.rpartition("."),
                                                                    source.rpartition("."))
    module, source_module = model.get_submodule(module_name), model.get_submodule(
        source_module_name)
    if hasattr(module, "packed") and hasattr(source_module, "packed"):
        module.tie_to(source_module)
    elif not hasattr(module, "packed") and not hasattr(source_module, "packed"):
        module._parameters[param] = source_module._parameters[source_param]
    else:
        _restore(model, name, ct, dense)


def load(path, model: Optional[nn.Module] = None, packed: bool = True,
         compute: Optional[str] = None):
    """Fill `model` (freshly built, same architecture) from a .dcx file and return it (checked
    completely first; see the module docstring). The packed layers come back as they were
    saved: compute mode and dense or sparse mode (the manifest's "layers"); compute: one mode
    (COMPUTE_MODES) for all of them instead ("auto" for layers the file has no setting for).
    Without a model it returns the decoded state_dict (deprecated: load_state_dict)."""
    if model is None:
        warnings.warn("dcx.load(path) without a model is deprecated (one release): use "
                      "dcx.load_state_dict(path) for the decoded tensors", DeprecationWarning,
                      stacklevel=2)
        return load_state_dict(path)
    compressed, raw, manifest = fmt.load_records(path)
    settings = manifest["layers"]  # checked by dcx.format
    modes = {name: s["mode"] == "dense" for name, s in settings.items() if "mode" in s}
    computes = {name: s.get("compute", "auto") for name, s in settings.items()}
    if compute is not None:
        check_compute(compute)
    elif _version(manifest) < (1, 3):  # written before "layers": `dcx convert --compute` then
        legacy = manifest["extra"].get("dcx_convert")  # kept it here
        compute = check_compute(legacy["compute"]) if isinstance(legacy, dict) and \
            "compute" in legacy else None
    tied = manifest["tied"]  # checked by dcx.format
    _check_fits(model, compressed, raw, tied)
    _untie_stored(model, list(compressed) + list(raw))
    state_dict = model.state_dict()
    with torch.no_grad():
        for name, t in raw.items():
            state_dict[name].copy_(t)
    for name, ct in compressed.items():
        _restore(model, name, ct, modes.get(name.rpartition(".")[0]))
    for name, source in tied.items():
        _tie(model, name, source, compressed[source], modes.get(name.rpartition(".")[0]))
    if packed:
        pack_layers_(model, dense=modes)
    for name, m in model.named_modules():  # every packed layer's weight came from the file
        if hasattr(m, "packed"):
            m.compute = compute or computes.get(name, "auto")
    return model


def _version(manifest) -> tuple:
    """(major, minor) the manifest says it was written as; (1, 0) when it does not say."""
    try:
        return tuple(int(part) for part in str(manifest["version"]).split(".")[:2])
    except (KeyError, ValueError):
        return (1, 0)


def load_state_dict(path) -> dict:
    """The decoded state_dict of a .dcx file ({name: tensor} in the order saved, every compressed
    weight dense, then each tied name holding its source's tensor), checked completely first;
    no model needed."""
    compressed, raw, manifest = fmt.load_records(path)
    decoded = {**{n: ct.to_dense() for n, ct in compressed.items()}, **raw}
    result = {meta["name"]: decoded[meta["name"]] for meta in manifest["tensors"]}
    return result | {name: decoded[source] for name, source in manifest["tied"].items()}
