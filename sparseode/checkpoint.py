"""``sparseode.save`` / ``sparseode.load``: a model as its configuration plus its state dict, in one
file that ``torch.load(path, weights_only=True)`` reads (tensors and plain containers: no pickled
code to trust).

The file holds one dict::

    "sparseode_checkpoint": FORMAT_VERSION     what marks the file, and its layout's version
    "sparseode_version":    the package version that wrote it
    "model":   {"__module__": kind, "config": {constructor arguments}}, JSON values; an argument
               that is a module (a CNF's field) is nested the same way
    "dtype":   the floating dtype of the parameters ("float32")
    "pruned":  names of the tensors under a ``torch.nn.utils.prune`` mask ("layers.0.linear.weight")
    "sparse":  for a sparsified model, per sparse layer (named as ``sparsify`` names it): format,
               block, backend, shape (out, in) and activation
    "training": the model's train/eval mode
    "state_dict": ``model.state_dict()``

``load`` rebuilds the dense model from its kind (:data:`KINDS`) and configuration, re-applies the
prune masks (``torch.nn.utils.prune``'s parametrisation), re-sparsifies the layers with their
stored formats, then loads the state dict strictly. A model kind of your own joins with
:func:`register_kind`.
"""
from __future__ import annotations

import json
import pickle
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparseode.models import CNF, ConcatLinear, ConcatSquashLinear, MLPVectorField, NeuralODE, ODEClassifier
from sparseode.nn.convert import LayerSpec, densify, sparsify_as
from sparseode.nn.folded import FoldedConcatLinear
from sparseode.nn.sparse_linear import SparseLinear
from sparseode.pruned import masks

__all__ = ["save", "load", "register_kind", "KINDS", "FORMAT_VERSION"]

#: Version of the file layout; ``load`` reads only this one.
FORMAT_VERSION = 1
_MARK = "sparseode_checkpoint"
ConfigFn = Callable[[nn.Module], dict[str, Any]]


def _linear_config(layer: nn.Module) -> dict[str, Any]:
    inner = layer if isinstance(layer, nn.Linear) else layer.linear
    return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": inner.bias is not None}


#: Model kinds ``save`` stores: name -> (class, its constructor arguments as ``fn(module) -> dict``).
KINDS: dict[str, tuple[type[nn.Module], ConfigFn]] = {
    "MLPVectorField": (MLPVectorField, MLPVectorField.config),
    "CNF": (CNF, CNF.config),
    "NeuralODE": (NeuralODE, NeuralODE.config),
    "ODEClassifier": (ODEClassifier, ODEClassifier.config),
    "Linear": (nn.Linear, _linear_config),
    "ConcatLinear": (ConcatLinear, _linear_config),
    "ConcatSquashLinear": (ConcatSquashLinear, _linear_config),
}


def register_kind(cls: type[nn.Module], config: ConfigFn | None = None, name: str | None = None) -> None:
    """Let ``save``/``load`` store models of class ``cls``: ``config(module)`` (default
    ``cls.config``) returns the keyword arguments that rebuild it, ``cls(**config(module))``, as
    JSON values or modules of registered kinds."""
    fn = config or getattr(cls, "config", None)
    if fn is None:
        raise TypeError(f"{cls.__name__} has no config() method: pass config=fn(module) -> constructor kwargs")
    KINDS[name or cls.__name__] = (cls, fn)


def _kind_name(module: nn.Module, where: str) -> str:
    for name, (cls, _) in KINDS.items():
        if type(module) is cls:
            return name
    raise TypeError(f"so.save stores models of the kinds {sorted(KINDS)}; {where} is a {type(module).__name__} "
                    "(register its class with sparseode.checkpoint.register_kind, or save its state_dict())")


def _encode(value: Any, where: str) -> Any:
    """``value`` as JSON values: a module of a registered kind becomes {"__module__", "config"}."""
    if isinstance(value, nn.Module):
        kind = _kind_name(value, where)
        config = KINDS[kind][1](value)
        return {"__module__": kind, "config": {k: _encode(v, f"{where}.{k}") for k, v in config.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"so.save stores a model's constructor arguments as JSON; {where} is a {type(value).__name__}")


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict) and "__module__" in value:
        kind = value["__module__"]
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown model kind {kind!r}; this sparseode knows {sorted(KINDS)} "
                             "(register others with sparseode.checkpoint.register_kind before loading)")
        cls = KINDS[kind][0]
        return cls(**{k: _decode(v, f"{where}.{k}") for k, v in value["config"].items()})
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v, where) for k, v in value.items()}
    return value


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The sparse layers of ``model`` by layer name (``sparsify``'s names: a folded concat layer's
    is its ``ConcatLinear``'s ``.linear``)."""
    found, inner = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, FoldedConcatLinear) and isinstance(module.inner, SparseLinear):
            found[f"{name}.linear" if name else "linear"] = module.inner
            inner.add(id(module.inner))
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and id(module) not in inner:
            found[name] = module
    return found


def _layer_record(layer: SparseLinear) -> dict[str, Any]:
    return {"format": layer.format, "block": list(layer.sparse.block) if layer.format == "bsr" else None,
            "backend": layer.backend, "shape": [layer.out_features, layer.in_features],
            "activation": layer.activation}


def _dtype_of(model: nn.Module) -> str:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return str(torch.get_default_dtype()).removeprefix("torch.")


def save(model: nn.Module, path: Any) -> None:
    """Write ``model`` (a kind of :data:`KINDS`, dense, pruned or sparsified) to ``path`` (a file
    name or a binary file object) with its configuration and state dict; read it back with
    :func:`load`, or its parts with ``torch.load(path, weights_only=True)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    dense = densify(model)  # a copy: the configuration and the masks are read from the dense model
    record = {
        _MARK: FORMAT_VERSION,
        "sparseode_version": _package_version(),
        "model": _encode(dense, type(dense).__name__),
        "dtype": _dtype_of(model),
        "pruned": sorted(masks(dense)),
        "sparse": {name: _layer_record(layer) for name, layer in _sparse_layers(model).items()},
        "training": model.training,
    }
    record = json.loads(json.dumps(record))  # tuples to lists: what load will see
    record["state_dict"] = model.state_dict()
    torch.save(record, path)


def _package_version() -> str:
    from sparseode import __version__

    return __version__


def _read(path: Any) -> dict[str, Any]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a sparseode checkpoint: it holds pickled objects that torch.load(weights_only=True) "
            "refuses (a whole model written by torch.save(model)?). If you trust the file, load it with "
            "torch.load(path, weights_only=False) and write it again with sparseode.save") from err
    if not isinstance(record, dict) or _MARK not in record:
        what = f"a dict with keys {sorted(map(str, record))[:5]}" if isinstance(record, dict) else type(record).__name__
        hint = " (a bare state dict? build the model and call load_state_dict, or sparseode.prune.load_pruned)" \
            if isinstance(record, dict) else ""
        raise ValueError(f"{path} is not a sparseode checkpoint (written by sparseode.save): it holds {what}{hint}")
    version = record[_MARK]
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} is a sparseode checkpoint of layout version {version} (written by sparseode "
                         f"{record.get('sparseode_version', '?')}); this sparseode {_package_version()} reads "
                         f"version {FORMAT_VERSION}")
    return record


def _apply_masks(model: nn.Module, names: list[str], path: Any) -> None:
    for full in names:
        owner, _, tensor = full.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, tensor):
            raise ValueError(f"{path}: the checkpoint prunes {full}, which the model rebuilt from its "
                             "configuration does not have")
        torch_prune.identity(module, tensor)


def _resparsify(model: nn.Module, layers: dict[str, dict[str, Any]], backend: str | None, path: Any) -> nn.Module:
    specs = {name: LayerSpec(rec["format"], tuple(rec["block"] or (16, 16)), backend or rec["backend"])
             for name, rec in layers.items()}
    model = sparsify_as(model, specs)
    built = _sparse_layers(model)
    for name, rec in layers.items():
        layer = built.get(name)
        if layer is None or [layer.out_features, layer.in_features] != rec["shape"]:
            got = None if layer is None else [layer.out_features, layer.in_features]
            raise ValueError(f"{path}: sparse layer {name!r} of shape {rec['shape']} rebuilt as {got}")
        layer.activation = rec["activation"]
    return model


def load(path: Any, device: str | torch.device = "cpu", backend: str | None = None) -> nn.Module:
    """The model :func:`save` wrote to ``path``, on ``device``; ``backend`` (default: as saved)
    sets the backend of every sparse layer. Reads tensors and plain containers only."""
    record = _read(path)
    dtype = getattr(torch, str(record["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}: unknown dtype {record['dtype']!r}")
    with torch.random.fork_rng(devices=[]):  # the rebuilt model's initial draw is overwritten
        model = _decode(record["model"], "model").to(dtype)
    _apply_masks(model, record["pruned"], path)
    if record["sparse"]:
        model = _resparsify(model, record["sparse"], backend, path)
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the state dict does not fit the model rebuilt from its configuration: {err}") from err
    model.train(bool(record["training"]))
    return model.to(device)
