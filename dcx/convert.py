"""Model transforms onto packed layers: `pack_layers_` (every weight-shared layer a packed twin
can run, swapped for it: what dcx.load does) and `convert_` (post-training compression of any
model's Linear / Conv2d / Embedding layers through the stage verbs, then pack_layers_, as a
ConvertConfig says).
"""

import copy
import dataclasses
import warnings
from typing import Iterable, NamedTuple, Optional

from torch import nn

from dcx import state
from dcx.calibration import calibratable, compress_calibrated_
from dcx.config import (ClusterConfig, ConfigError, ConvertConfig, PruneConfig, check_compute,
                        layer_overrides)
from dcx.nn import (SparseQuantConv2d, SparseQuantEmbedding, SparseQuantLinear, _compress_layer,
                    packable)
from dcx.packing import can_pack_dense
from dcx.prune import prune_
from dcx.quantize import clusterable, cluster_

__all__ = ["pack_layers_", "convert_", "convert", "ConvertRow", "ConvertPlan", "plan_convert",
           "sparsity_for_size"]


def _twin(module: nn.Module):
    if isinstance(module, nn.Embedding):
        return SparseQuantEmbedding
    return SparseQuantConv2d if isinstance(module, nn.Conv2d) else SparseQuantLinear


def _replace_modules(model: nn.Module, new: dict) -> None:
    """Swap every occurrence of the modules {id(old): new} inside `model`."""
    if id(model) in new:
        raise ValueError("the model itself is a layer to replace: wrap it in a container")
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[child_name] = new[id(child)]


def weight_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """{id(weight Parameter): [(module name, module), ...]} in module order: a list of two or
    more is a tied weight (an input embedding that is also the output projection)."""
    owners = {}
    for name, m in model.named_modules():
        weight = m._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append((name, m))
    return owners


def tie_reason(group: list, st: state.LayerState) -> Optional[str]:
    """Why the owners [(name, module)] of one shared weight (its state `st`) cannot be packed
    (None: they can); a tied weight is packed once, in dense mode, for every owner."""
    reason = next(filter(None, (packable(m) for _, m in group)), None)
    if reason is None and len(group) > 1 and not can_pack_dense(st.kept, st.codebook, st.bits):
        reason = "a tied table is packed in dense mode, which 8 bits and pruning leave no id for"
    return reason


def pack_layers_(model: nn.Module, names=None, dense=None, compute="auto") -> nn.Module:
    """Swap every weight-shared layer of `model` (dcx.state) that a packed twin can run
    (`packable`) for that twin: nn.Linear -> SparseQuantLinear, nn.Conv2d -> SparseQuantConv2d,
    nn.Embedding -> SparseQuantEmbedding, built from the layer's mask, labels and codebook.
    A weight tied to other modules (the same Parameter; the state on its first owner) is packed
    once, in dense mode, and every owner's twin reads that one packed weight (tie_to); the
    group stays as it is unless every owner is packable.
    names: only these modules. dense: force the packed mode (default None: dense from
    DENSE_DENSITY on; a tied weight is always dense). compute: the new Linear / Conv2d layers'
    compute mode (COMPUTE_MODES). Each of dense and compute may also be a {module name: value} dict (dcx.load passes the
    file's settings so), its default for layers it does not name. Other layers stay as they
    are. Returns the model."""
    def per_layer(value, name, default):
        return value.get(name, default) if isinstance(value, dict) else value

    for mode in compute.values() if isinstance(compute, dict) else [compute]:
        check_compute(mode)
    owners = weight_owners(model)
    new = {}
    for st in state.layers(model).values():
        if (not st.shared or st.packed or st.param != "weight"
                or (names is not None and st.module_name not in names)):
            continue
        group = owners.get(id(st.module._parameters.get("weight")), [(st.module_name, st.module)])
        if tie_reason(group, st) is not None:
            continue
        # The packed weight is built for the group's first Linear (an embedding-only group: its
        # first table); the others read it.
        first = next((i for i, (_, m) in enumerate(group) if _twin(m) is SparseQuantLinear), 0)
        group = [group[first]] + group[:first] + group[first + 1:]
        leader = None
        for name, m in group:
            twin = _twin(m)
            if leader is None:
                mode = True if len(group) > 1 else per_layer(dense, st.module_name, None)
                layer = twin.from_shared(m, st.kept, st.labels, st.codebook.detach(), st.bits,
                                         dense=mode, scale=st.scale)
                leader = layer
            else:
                layer = twin._like(m, st.bits).tie_to(leader)
                if getattr(m, "bias", None) is not None:
                    layer.bias = nn.Parameter(m.bias.detach().clone())
            if twin is not SparseQuantEmbedding:
                layer.compute = per_layer(compute, name, "auto")
            new[id(m)] = layer
    _replace_modules(model, new)
    return model


class ConvertRow(NamedTuple):
    """What convert did with one layer that has a weight of two or more dimensions."""

    name: str
    kind: str  # the module's class name
    shape: tuple
    action: str  # "packed" (a SparseQuant* layer), "shared" (its decoded weight kept), "dense"
    bits: Optional[int]
    sparsity: float
    reason: str  # why it is not packed, or not compressed at all ("" when packed)


class ConvertPlan(NamedTuple):
    """What convert_ will do to a model, before it does it: a ConvertRow per layer with a weight
    of two or more dimensions (those left as they are carry their reason already), the
    settings of each layer it compresses ({module name: {"sparsity", "bits", "scale"}}) and
    the layers tied to another ({module name: the first owner of its weight})."""
    rows: dict
    per_layer: dict
    followers: dict


def plan_convert(model: nn.Module, config: Optional[ConvertConfig] = None) -> ConvertPlan:
    """The layers convert_ compresses and with what settings (ConvertConfig's fields and the
    override rule), without changing the model: what dcx.distill.compress_ prunes before it
    retrains."""
    config = config or ConvertConfig()
    sparsity, bits, overrides, conv, embeddings = (config.sparsity, config.bits, config.overrides,
                                                   config.conv, config.embeddings)
    owners = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for param_name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), set()).add(f"{name}.{param_name}" if name else param_name)
    tied_groups = weight_owners(model)

    def left_out(m) -> Optional[str]:
        """Why convert leaves this layer as it is (None: it compresses it)."""
        layer_kind, st = state.kind(m), state.get(m)
        if layer_kind is None:
            return "not a Linear, convolution or embedding"
        if layer_kind == "conv" and not conv:
            return "convolutions left out (conv=False)"
        if layer_kind == "embedding" and not embeddings:
            return "embeddings left out (embeddings=False)"
        return "already shared" if st is not None and st.shared else None

    rows, layers = {}, {}  # layers: the ones convert may compress, with their names for patterns
    followers = {}  # {module name: the first owner of the weight it is tied to}
    for name, m in model.named_modules():
        weight = m._parameters.get("weight")
        if not name or weight is None or weight.dim() < 2 or hasattr(m, "layer_state"):
            continue
        row = ConvertRow(name, type(m).__name__, tuple(weight.shape), "dense", None, 0.0, "")
        reason = left_out(m)
        if len(owners.get(id(weight), ())) > 1:  # a tied weight: compressed once, or not at all
            group = tied_groups[id(weight)]
            if reason is None and (len(owners[id(weight)]) != len(group) or any(
                    left_out(o) or state.kind(o) == "conv" for _, o in group)):
                reason = f"weight tied to {sorted(owners[id(weight)])}"
            if reason is None and group[0][0] != name:
                reason = f"tied to {group[0][0]}"
                followers[name] = group[0][0]
        if reason is None:
            rows[name] = row
            layers[name] = m
        else:
            shared = reason == "already shared"
            rows[name] = row._replace(action="shared" if shared else "dense", reason=reason)

    def selected(patterns, where):
        return set(layer_overrides(model, {p: True for p in patterns}, layers, where))

    chosen = set(layers)
    if config.include is not None:
        chosen &= selected(config.include, "ConvertConfig include")
    if config.exclude is not None:
        chosen -= selected(config.exclude, "ConvertConfig exclude")
    settings = layer_overrides(model, overrides, layers, "ConvertConfig")
    per_layer = {}
    for name in layers:
        override = settings.get(name, (None, {}))[1]
        if name not in chosen or override is None:
            rows[name] = rows[name]._replace(reason="excluded (include / exclude / overrides)")
            continue
        per_layer[name] = {"sparsity": sparsity, "bits": bits, "scale": config.scale, **override}
    return ConvertPlan(rows, per_layer, followers)


def convert_(model: nn.Module, config: Optional[ConvertConfig] = None,
             progress: bool = False, calibration: Optional[Iterable] = None,
             pack: bool = True) -> tuple[nn.Module, list[ConvertRow]]:
    """Post-training compression, in place, as `config` says (ConvertConfig: its fields and the
    override rule): every nn.Linear of `model` (and every convolution, every nn.Embedding,
    subclasses included) is pruned by magnitude (dcx.prune_), its surviving weights shared among
    2^bits k-means centroids (dcx.cluster_), and, where a packed twin computes what it computes
    (dcx.nn.packable), swapped for SparseQuantLinear / SparseQuantConv2d / SparseQuantEmbedding
    (pack_layers_). A layer without one (a grouped convolution, a subclass with its own forward)
    keeps its decoded weight and its shared state, so dcx.save still stores it as codes.
    A pattern that selects no layer is an error. progress: a bar over the layers.

    calibration: unlabeled inputs (an iterable of batches, each a dict of keyword arguments, a
    tuple of arguments or one tensor; read several times). With them (config.method "auto" or
    "gptq"), every Linear and zero-padded Conv2d is pruned and shared by dcx.calibrate's
    second-order method instead ("weighted": its cheap activation-weighted path), layer group by
    layer group in the order the model calls them; embeddings keep the plain path.

    pack=False leaves the compressed layers as they are, weight-shared with their codebooks live
    (Parameters) instead of swapping in the packed twins: the state retraining starts from
    (dcx.distill_ moves the codebooks; dcx.finalize_clustering_ and pack_layers_ then finish what
    convert_ would have). The report says "packed" for the layers pack_layers_ would pack.

    Returns (model, report): report has one ConvertRow per layer with a weight of two or more
    dimensions, the ones left dense included, each with its reason.
    """
    config = config or ConvertConfig()
    rows, per_layer, followers = plan_convert(model, config)
    if per_layer:
        method = config.method
        if method == "auto":
            method = "plain" if calibration is None else "gptq"
        if method in ("gptq", "weighted") and calibration is None:
            raise ConfigError(f"method {method!r} needs calibration inputs: "
                              "convert_(model, config, calibration=batches)")
        leaders = set(followers.values())
        tied = {n: v for n, v in per_layer.items() if n in leaders}
        for name, v in tied.items():  # one weight, written in place: it stays tied
            module = model.get_submodule(name)
            mask, labels, codebook, scale = _compress_layer(module.weight, v["sparsity"],
                                                            v["bits"], v["scale"])
            state.set_compressed_(module, "weight", state.shared_weight(codebook, labels, mask,
                                                                        scale),
                                  mask, codebook, labels, v["bits"], scale)
        calibrated = {}
        if method in ("gptq", "weighted"):
            calibrated = {n: v for n, v in per_layer.items()
                          if n not in tied and calibratable(model.get_submodule(n)) is None}
        # The plain layers (all of them without calibration; embeddings and tied weights with
        # it) first, so the calibrated layers' statistics see their error too.
        plain = {n: v for n, v in per_layer.items() if n not in calibrated and n not in tied}
        pruned = {n: {"sparsity": v["sparsity"]} for n, v in plain.items() if v["sparsity"] > 0}
        if pruned:
            prune_(model, PruneConfig(sparsity=0.0, targets=list(pruned), overrides=pruned))
        others = {n: None for n in clusterable(model) if n not in plain}
        if plain:
            cluster_(model, ClusterConfig(overrides={n: {"bits": v["bits"], "scale": v["scale"]}
                                                     for n, v in plain.items()} | others),
                     progress=progress)
        if calibrated:
            compress_calibrated_(model, calibrated, calibration, progress=progress, method=method)
        for name, v in per_layer.items():
            group = [(n, model.get_submodule(n)) for n in
                     [name] + [f for f, leader in followers.items() if leader == name]]
            st = state.get(group[0][1])
            reason = tie_reason(group, st)
            rows[name] = rows[name]._replace(action="shared" if reason else "packed",
                                             bits=v["bits"], sparsity=v["sparsity"],
                                             reason=reason or "")
        for name, leader in followers.items():
            if leader in per_layer:
                rows[name] = rows[leader]._replace(name=name, kind=rows[name].kind,
                                                   shape=rows[name].shape,
                                                   reason=f"tied to {leader}")
        if pack:
            pack_layers_(model, names={n for n in per_layer if rows[n].action == "packed"},
                         dense=config.dense, compute=config.compute)
    return model, list(rows.values())


def sparsity_for_size(model: nn.Module, config: ConvertConfig, max_bytes: int,
                      extra: Optional[dict] = None,
                      progress: bool = False) -> tuple[float, int]:
    """The smallest sparsity, in whole percent, at which convert_(model, config) writes a
    .dcx file of at most `max_bytes`, found by bisection over trial compressions of copies of
    the model (plain: magnitude pruning and k-means; calibration and retraining change the size
    by little, the codes' Huffman lengths). Bisection takes the size to fall as the sparsity
    rises, as it does but for a few bytes where a layer changes packed mode; the result fits,
    and one percent less does not. config.sparsity is what is chosen; its overrides
    (a layer's own sparsity) are kept. Returns (sparsity, bytes of that trial); a ConfigError
    when even 99% does not fit. `model` is not changed."""
    from tqdm import tqdm

    from dcx.io import encode

    if max_bytes < 1:
        raise ConfigError(f"max_bytes must be >= 1, got {max_bytes}")
    tries = {}
    bar = tqdm(desc="sizing", unit="try", leave=False, disable=None if progress else True)

    def size(percent: int) -> int:
        if percent not in tries:
            tried = dataclasses.replace(config, sparsity=percent / 100)
            trial, _ = convert_(copy.deepcopy(model), dataclasses.replace(tried, method="plain"))
            tries[percent] = len(encode(trial, tried, extra))  # its manifest names `tried`
            bar.update(1)
            bar.set_postfix(sparsity=f"{percent}%", bytes=f"{tries[percent]:,}", refresh=False)
        return tries[percent]

    with bar:
        low, high = 0, 99  # size(low) > max_bytes >= size(high), once both are checked
        if size(low) <= max_bytes:
            return 0.0, size(low)
        if size(high) > max_bytes:
            raise ConfigError(f"{max_bytes:,} bytes cannot be reached at {config.bits} bits: "
                              f"99% sparsity still writes {size(high):,} (fewer bits, or "
                              "smaller embeddings and other unpruned layers, would)")
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if size(middle) <= max_bytes else (middle, high)
    return high / 100, size(high)


def convert(model: nn.Module, sparsity: float = 0.0, bits: int = 5, overrides=None,
            include=None, exclude=None, conv: bool = True, embeddings: bool = True,
            dense: Optional[bool] = None, compute: str = "auto", progress: bool = False,
            report: Optional[list] = None) -> nn.Module:
    """Deprecated spelling of convert_ (keyword arguments instead of a ConvertConfig, the report
    through a list argument); kept for one release."""
    warnings.warn("dcx.convert(model, sparsity=..., bits=..., report=rows) is deprecated: use "
                  "model, rows = dcx.convert_(model, dcx.ConvertConfig(sparsity=..., bits=...))",
                  DeprecationWarning, stacklevel=2)
    config = ConvertConfig(sparsity=sparsity, bits=bits, overrides=overrides or {},
                           include=include, exclude=exclude, conv=conv, embeddings=embeddings,
                           dense=dense, compute=compute)
    model, rows = convert_(model, config, progress)
    if report is not None:
        report.extend(rows)
    return model

