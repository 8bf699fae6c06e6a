"""Loading UniRepLKNet checkpoints: official ``.pth`` files and our own, in any of their wrappings.

:func:`load_checkpoint` is the one entry point. It accepts

* raw state dicts and files wrapped in ``model``, ``state_dict`` or ``module`` (the official classification files
  are raw or wrapped in ``model``; detection/segmentation files are wrapped in ``state_dict`` with a ``backbone.``
  prefix, which is stripped and everything outside the backbone dropped);
* ``.pth``/``.pt``/``.bin`` files (read with ``torch.load(weights_only=True)``) and ``.safetensors`` files;
* a different class count (the head is dropped and the model keeps its own, freshly initialised head);
* a different number of input channels (the stem's first conv is adapted with timm's ``adapt_input_conv``);
* features-mode files (``norm0..norm3`` instead of ``norm``/``head``);
* a train-form file into a deploy-form model (converted on the fly through a train-form twin);
* models pruned for feature extraction (timm's ``features_only`` with ``out_indices``): the tensors of the stages
  they no longer have are dropped and reported.

Anything else that does not fit raises :class:`~backbones.errors.CheckpointError` listing the missing, unexpected
and mis-shaped keys.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from timm.models import adapt_input_conv

from .errors import CheckpointError

__all__ = ["LoadReport", "load_checkpoint", "read_state_dict", "is_train_form"]

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
_STEM_KEY = "downsample_layers.0.0.weight"
# Keys that may be absent from a file and then keep the model's own initialisation.
_OPTIONAL = re.compile(r"^(head\.|norm\.|norm[0-3]\.)|\.num_batches_tracked$")
_TRAIN_ONLY = re.compile(
    r"^stages\.\d+\.\d+\.(gamma$|act\.1\.beta$|norm\.|pwconv2\.2\.|dwconv\.(origin_bn|dil_conv_k\d+_\d+|dil_bn_k\d+_\d+)\.)"
)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did besides copying tensors one to one."""

    source: str
    loaded: int = 0
    adapted: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    kept_initialised: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for title, items in (
            ("adapted", self.adapted), ("dropped", self.dropped), ("kept at initialisation", self.kept_initialised),
            ("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.mismatched),
        ):
            if items:
                lines.append(f"{title}: {_preview(items)}")
        return "\n".join(lines)


def _preview(items: List[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _describe(source: Source) -> str:
    return "<state dict>" if isinstance(source, Mapping) else str(source)


def read_state_dict(source: Source, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint and return a flat ``{name: tensor}`` dict of backbone tensors.

    Unwraps ``model``/``state_dict``/``module`` containers, strips ``module.`` (DDP) and ``backbone.`` prefixes and,
    when a ``backbone.`` prefix is present, drops everything outside the backbone (necks, decode heads).

    Files are read with ``torch.load(weights_only=True)``, which cannot run code. Training checkpoints that also
    pickle Python objects (argument namespaces, ...) need ``trusted=True``: only for files from a trusted source.
    """
    name = _describe(source)
    if isinstance(source, Mapping):
        obj = source
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"{name}: checkpoint file does not exist")
        if path.is_dir():
            raise CheckpointError(f"{name}: is a directory, expected a checkpoint file (.pth or .safetensors)")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{name}: checkpoint file is empty")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj = load_file(str(path), device="cpu")
            else:
                obj = torch.load(str(path), map_location="cpu", weights_only=not trusted)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            if not found:
                raise CheckpointError(
                    f"{name}: cannot read checkpoint (the file is corrupt or not a PyTorch checkpoint: "
                    f"{str(exc).splitlines()[-1] if str(exc) else type(exc).__name__})"
                ) from exc
            raise CheckpointError(
                f"{name}: cannot read checkpoint safely: it pickles the Python object {found.group(1)} besides "
                f"tensors (training code often stores its arguments); if you trust the file, load it with "
                f"trusted=True"
            ) from exc
        except Exception as exc:  # corrupt, truncated or not a checkpoint at all
            raise CheckpointError(
                f"{name}: cannot read checkpoint ({type(exc).__name__}: {exc}); expected a PyTorch .pth file or a "
                f".safetensors file holding a state dict"
            ) from exc

    for _ in range(3):  # nested wrappers such as {"state_dict": {"model": ...}}
        if not isinstance(obj, Mapping):
            break
        wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if wrapped and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[wrapped[0]]
        else:
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")

    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name}: holds no tensors; keys found: {_preview([str(k) for k in obj])}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if any(k.startswith("backbone.") for k in tensors):
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors


def is_train_form(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if a state dict holds train-form block tensors (BatchNorms, dilated branches, GRN beta, layer scale)."""
    return any(_TRAIN_ONLY.search(k) for k in state_dict if k.startswith("stages."))


def _to_deploy_state_dict(
    state_dict: Dict[str, torch.Tensor], model: nn.Module, name: str, strict: bool, report: "LoadReport"
) -> Dict[str, torch.Tensor]:
    """Convert a train-form state dict for ``model``'s architecture into its deploy form.

    A train-form twin of the full architecture loads the file (with the same adaptations and strictness), is
    re-parameterised, and hands over its tensors, except those it did not get from the file (a head it kept at
    initialisation, say), so that the model keeps its own.
    """
    from .unireplknet import UniRepLKNet

    twin = UniRepLKNet(**{**model._arguments, "num_classes": model.num_classes, "deploy": False})
    twin_report = load_checkpoint(twin, state_dict, strict=strict, _name=name)
    twin.eval().reparameterize()
    converted = twin.state_dict()
    not_from_file = set(twin_report.kept_initialised) | set(twin_report.missing)
    not_from_file |= {entry.split(" ", 1)[0] for entry in twin_report.dropped if entry.startswith("head.")}
    for key in not_from_file:
        converted.pop(key, None)
    report.adapted += twin_report.adapted
    report.dropped += twin_report.dropped
    report.missing += [k for k in twin_report.missing if not k.startswith("stages.")]
    report.mismatched += twin_report.mismatched
    report.unexpected += twin_report.unexpected
    if any(k.startswith("stages.") for k in twin_report.missing):
        # deploy tensors of blocks whose train-form tensors were missing cannot be trusted: leave them out
        blocks = {".".join(k.split(".")[:3]) for k in twin_report.missing if k.startswith("stages.")}
        for key in [k for k in converted if ".".join(k.split(".")[:3]) in blocks]:
            converted.pop(key)
    return converted


def _pruned_stage(key: str, stages: int) -> bool:
    """True if ``key`` belongs to a stage (or its downsampling layer or features-mode norm) the model does not have."""
    match = re.match(r"^(?:stages|downsample_layers)\.(\d+)\.|^norm(\d)\.", key)
    if not match:
        return False
    index = int(match.group(1) if match.group(1) is not None else match.group(2))
    return index >= stages


def load_checkpoint(
    model: nn.Module, source: Source, strict: bool = True, trusted: bool = False, _name: str = None
) -> LoadReport:
    """Load a checkpoint into a :class:`~backbones.unireplknet.UniRepLKNet` and report what was adapted.

    Args:
        model: the model to fill (train or deploy form, any ``in_chans``, any ``num_classes``, pruned for features,
            or timm's ``features_only`` wrapper around one).
        source: a file path or an in-memory state dict.
        strict: raise :class:`CheckpointError` if any tensor is missing, unexpected or mis-shaped after the
            adaptations listed in the module docstring; with ``False`` load what fits and report the rest.
        trusted: allow files that pickle Python objects besides tensors (see :func:`read_state_dict`).

    Returns:
        a :class:`LoadReport`.
    """
    if not hasattr(model, "_arguments") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # timm's features_only wrapper
    name = _name or _describe(source)
    state_dict = read_state_dict(source, trusted=trusted)
    report = LoadReport(source=name)
    own = model.state_dict()
    stages = len(getattr(model, "stages", ())) or 4

    model_deploy = getattr(model, "deploy", False)
    file_train = is_train_form(state_dict)
    if model_deploy and file_train:
        state_dict = _to_deploy_state_dict(state_dict, model, name, strict, report)
        report.adapted.append("train-form blocks re-parameterised into the deploy form")
    elif not model_deploy and not file_train and any(k.startswith("stages.") for k in state_dict):
        if any(k.startswith("stages.") and k not in own for k in state_dict):
            raise CheckpointError(
                f"{name}: holds a deploy-form (re-parameterised) model but the model is in train form; build it "
                f"with deploy=True (or call model.reparameterize()) before loading"
            )

    # stages the model was pruned of (features_only with out_indices)
    pruned = [k for k in state_dict if k not in own and _pruned_stage(k, stages)]
    for key in pruned:
        state_dict.pop(key)
    if pruned:
        report.dropped.append(f"{len(pruned)} tensors of stages the model was pruned of (stage {stages + 1} on)")

    # stem: adapt the first conv to the model's input channels
    if _STEM_KEY in state_dict and _STEM_KEY in own:
        have, want = state_dict[_STEM_KEY], own[_STEM_KEY]
        if have.shape != want.shape and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            state_dict[_STEM_KEY] = adapt_input_conv(want.shape[1], have.float(), base_chans=have.shape[1]).to(
                have.dtype
            )
            report.adapted.append(f"{_STEM_KEY}: {have.shape[1]} -> {want.shape[1]} input channels")

    # head: drop when the model has none or a different class count
    for key in ("head.weight", "head.bias"):
        if key in state_dict and (key not in own or own[key].shape != state_dict[key].shape):
            shape = tuple(state_dict.pop(key).shape)
            where = "the model has no classifier" if key not in own else f"the model's is {tuple(own[key].shape)}"
            report.dropped.append(f"{key} {shape} ({where})")

    # norms the model does not have: features-mode norms, or the head norm of a model pruned for features
    for key in [k for k in state_dict if re.match(r"^norm[0-3]?\.", k) and k not in own]:
        state_dict.pop(key)
        hint = "features-mode norm; build with output_norms=True to keep it" if key[4] != "." else "no head norm"
        report.dropped.append(f"{key} ({hint})")

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state_dict
        if k in own and state_dict[k].shape != own[k].shape
    ]
    optional_missing = [k for k in missing if _OPTIONAL.search(k)]
    hard_missing = [k for k in missing if not _OPTIONAL.search(k)]
    report.kept_initialised += [k for k in optional_missing if not k.endswith("num_batches_tracked")]
    report.missing += hard_missing
    report.unexpected += unexpected
    report.mismatched += mismatched

    if strict and (report.missing or report.unexpected or report.mismatched):
        parts = [f"{name}: checkpoint does not fit the model"]
        if report.missing:
            parts.append(f"missing {len(report.missing)}: {_preview(report.missing)}")
        if report.unexpected:
            parts.append(f"unexpected {len(report.unexpected)}: {_preview(report.unexpected)}")
        if report.mismatched:
            parts.append(f"mis-shaped {len(report.mismatched)}: {_preview(report.mismatched)}")
        config = getattr(model, "config", None)
        if config:
            parts.append(
                f"model: depths={config['depths']} dims={config['dims']} in_chans={config['in_chans']} "
                f"deploy={config['deploy']}"
            )
        raise CheckpointError("; ".join(parts))

    usable = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    for k in missing:
        usable[k] = own[k]
    model.load_state_dict(usable, strict=True)
    report.loaded = len(usable) - len(missing)
    return report
