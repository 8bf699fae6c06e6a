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
  they no longer have are dropped and reported;
* files written by ``UniPerceiver.save_pretrained`` (``model.safetensors``): the ``backbone.*`` tensors are loaded and
  the adapters and heads dropped (reported). A model of several modalities stores one stem per modality
  (``downsample_layers.0.0.convs.<modality>.*``); a model with one plain stem takes the stem named by ``stem=``, else
  the only one, else the only one whose input channels equal the model's ``in_chans`` (stems with identical tensors
  count once); any other case is ambiguous and raises, naming the stems and their channels. The chosen stem is
  adapted to ``in_chans`` like any other, and the other modalities' stems are dropped (reported).

Anything else that does not fit raises :class:`~backbones.errors.CheckpointError` listing the missing, unexpected
and mis-shaped keys: every tensor of a file is loaded, or dropped by one of the rules above and reported in the
:class:`LoadReport`, or the load fails.

:func:`download_from_hub` finds a checkpoint file of a Hugging Face Hub repository in the Hugging Face cache or
downloads it there (see its docstring for the network rules and time limits).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from timm.models import adapt_input_conv

from .errors import CheckpointError

__all__ = ["LoadReport", "download_from_hub", "load_checkpoint", "read_state_dict", "is_train_form"]

_logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
_STEM_KEY = "downsample_layers.0.0.weight"
# one stem per modality, as a UniPerceiver of several modalities stores its first convolution
_MODALITY_STEM = re.compile(r"^downsample_layers\.0\.0\.convs\.([^.]+)\.(weight|bias)$")
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
    when a ``backbone.`` prefix is present, drops everything outside the backbone (necks, decode heads, the adapters
    and heads of a ``UniPerceiver`` file).

    Files are read with ``torch.load(weights_only=True)``, which cannot run code. Training checkpoints that also
    pickle Python objects (argument namespaces, ...) need ``trusted=True``: only for files from a trusted source.
    """
    return _read_backbone_tensors(source, trusted)[0]


def _read_backbone_tensors(source: Source, trusted: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """:func:`read_state_dict`, plus the names of the tensors it left out because they lie outside the backbone."""
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
    outside: List[str] = []
    if any(k.startswith("backbone.") for k in tensors):
        outside = [k for k in tensors if not k.startswith("backbone.")]
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors, outside


def _summarise_outside(keys: List[str]) -> str:
    """``"12 tensors outside the backbone (adapters.*, heads.*)"``."""
    prefixes = sorted({k.split(".", 1)[0] + ".*" for k in keys})
    return f"{len(keys)} tensors outside the backbone ({_preview(prefixes)})"


def _channels(count: int) -> str:
    return f"{count} channel" + ("" if count == 1 else "s")


def _take_modality_stem(
    state_dict: Dict[str, torch.Tensor], in_chans: int, stem: Optional[str], name: str, report: "LoadReport"
) -> None:
    """Replace a file's per-modality stems by the one a model with a plain stem takes (in place; rules in the
    module docstring)."""
    stems: Dict[str, Dict[str, torch.Tensor]] = {}
    for key in [k for k in state_dict if _MODALITY_STEM.match(k)]:
        modality, kind = _MODALITY_STEM.match(key).groups()
        stems.setdefault(modality, {})[kind] = state_dict.pop(key)
    if not stems:
        if stem is not None:
            raise CheckpointError(
                f"{name}: stem={stem!r} names a modality's stem, but the file has one plain stem, not one per modality"
            )
        return
    if _STEM_KEY in state_dict:
        raise CheckpointError(f"{name}: holds a plain stem ({_STEM_KEY}) and per-modality stems; expected one kind")
    incomplete = sorted(m for m, tensors in stems.items() if "weight" not in tensors)
    if incomplete:
        raise CheckpointError(f"{name}: the stems of {', '.join(incomplete)} have a bias but no weight")
    channels = {m: int(tensors["weight"].shape[1]) for m, tensors in stems.items()}
    described = ", ".join(f"{m} ({_channels(c)})" for m, c in sorted(channels.items()))

    if stem is not None:
        if stem not in stems:
            raise CheckpointError(f"{name}: has no stem for {stem!r}; its stems: {described}")
        chosen = stem
    elif len(stems) == 1:
        chosen = next(iter(stems))
    else:
        matching = sorted(m for m, c in channels.items() if c == in_chans)
        if len(matching) > 1 and all(
            stems[m].keys() == stems[matching[0]].keys()
            and all(torch.equal(stems[m][k], stems[matching[0]][k]) for k in stems[m])
            for m in matching[1:]
        ):
            matching = matching[:1]
        if len(matching) != 1:
            how_many = "several of them take" if matching else "none of them takes"
            raise CheckpointError(
                f"{name}: holds one stem per modality ({described}) and {how_many} the model's "
                f"{_channels(in_chans)}; choose one with backbones.load_checkpoint(model, path, stem=<modality>)"
            )
        chosen = matching[0]

    for kind, tensor in stems[chosen].items():
        state_dict[f"downsample_layers.0.0.{kind}"] = tensor
    report.adapted.append(f"stem: the {chosen} stem ({_channels(channels[chosen])}) of a file with one per modality")
    others = sorted(set(stems) - {chosen})
    if others:
        report.dropped.append(f"stems of the other modalities: {', '.join(others)}")


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
    model: nn.Module,
    source: Source,
    strict: bool = True,
    trusted: bool = False,
    stem: Optional[str] = None,
    _name: str = None,
) -> LoadReport:
    """Load a checkpoint into a :class:`~backbones.unireplknet.UniRepLKNet` and report what was adapted.

    Args:
        model: the model to fill (train or deploy form, any ``in_chans``, any ``num_classes``, pruned for features,
            or timm's ``features_only`` wrapper around one).
        source: a file path or an in-memory state dict.
        strict: raise :class:`CheckpointError` if any tensor is missing, unexpected or mis-shaped after the
            adaptations listed in the module docstring; with ``False`` load what fits and report the rest.
        trusted: allow files that pickle Python objects besides tensors (see :func:`read_state_dict`).
        stem: for a file with one stem per modality (a ``UniPerceiver`` of several modalities), the modality whose
            stem a model with one plain stem takes; ``None`` chooses by the rules in the module docstring.

    Returns:
        a :class:`LoadReport`.
    """
    if not hasattr(model, "_arguments") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # timm's features_only wrapper
    name = _name or _describe(source)
    state_dict, outside = _read_backbone_tensors(source, trusted=trusted)
    report = LoadReport(source=name)
    if outside:
        report.dropped.append(_summarise_outside(outside))
    own = model.state_dict()
    stages = len(getattr(model, "stages", ())) or 4

    # a file with one stem per modality into a model with one plain stem
    if _STEM_KEY in own and not any(_MODALITY_STEM.match(k) for k in own):
        _take_modality_stem(state_dict, int(own[_STEM_KEY].shape[1]), stem, name, report)

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
        if state_dict and not set(state_dict) & set(own):
            parts.append(
                f"none of its {len(state_dict)} tensors has a name of this UniRepLKNet (first: "
                f"{_preview(sorted(state_dict), 3)}): it is not a UniRepLKNet checkpoint"
            )
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def download_from_hub(
    repo_id: str,
    filename: str,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    fallback_dir: Union[str, os.PathLike, None] = None,
) -> Path:
    """Path of ``filename`` of the Hugging Face Hub model repository ``repo_id`` in the Hugging Face cache,
    downloaded there with ``huggingface_hub.hf_hub_download`` when it is not there yet.

    The cache is ``cache_dir`` or huggingface_hub's own (``HF_HUB_CACHE``, else ``$HF_HOME/hub``). Network rules:

    * offline (``HF_HUB_OFFLINE=1``): the cached copy, or :class:`~backbones.errors.CheckpointError`; no request.
    * online: the Hub is asked once for the file's metadata, with ``HF_HUB_ETAG_TIMEOUT`` seconds (10 by default)
      as the limit and no retry. If that fails, the cached copy is used (with a warning), or
      :class:`CheckpointError` is raised at once. Otherwise ``hf_hub_download`` fetches (or re-validates) the file;
      each of its reads times out after ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (10 by default) without data.

    The error names the file, the repository, its download URL, the cache folder and ``fallback_dir``, a folder
    where the file may be placed by hand instead.
    """
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{filename}: downloading from the Hugging Face Hub ({repo_id}) needs the huggingface_hub package "
            f"(pip install 'huggingface_hub>=0.24')"
        ) from None

    url = hf_hub_url(repo_id, filename, revision=revision)
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    repo_folder = cache / ("models--" + repo_id.replace("/", "--"))
    is_offline_mode = getattr(constants, "is_offline_mode", None)
    offline = is_offline_mode() if callable(is_offline_mode) else bool(constants.HF_HUB_OFFLINE)
    timeout = float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10) or 10)

    def unavailable(reason: str) -> CheckpointError:
        by_hand = f"download {url} and "
        if fallback_dir:
            by_hand += f"place it in {str(fallback_dir)!r} (the folder named by UNIPERCEPTION_WEIGHTS) or "
        return CheckpointError(
            f"{filename} (Hugging Face repository {repo_id}) is not in the Hugging Face cache {str(repo_folder)!r} "
            f"and cannot be downloaded: {reason}. Fetch it into that cache where the Hub is reachable "
            f"(`hf download {repo_id} {filename}{f' --revision {revision}' if revision else ''}`; HF_HOME or "
            f"HF_HUB_CACHE choose the cache), or {by_hand}pass its "
            f"path (timm.create_model: pretrained_cfg_overlay=dict(file='/path/to/{filename}'))"
        )

    def cached() -> Optional[Path]:
        try:
            found = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except LocalEntryNotFoundError:
            return None
        except Exception as exc:  # an invalid repository id or file name, an unreadable cache
            raise CheckpointError(f"{filename} (Hugging Face repository {repo_id}): {_first_line(exc)}") from None
        return Path(found)

    if offline:
        found = cached()
        if found is None:
            raise unavailable("offline mode is on (HF_HUB_OFFLINE)")
        return found

    try:
        get_hf_file_metadata(url, timeout=timeout)
    except Exception as exc:  # unreachable, timed out, no such file, access denied
        found = cached()
        if found is None:
            raise unavailable(f"asking the Hub failed ({_first_line(exc)}; time limit {timeout:g} s)") from None
        _logger.warning("%s: the Hub cannot be reached (%s); using the cached copy %s", filename, _first_line(exc),
                        found)
        return found

    try:
        downloaded = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, etag_timeout=timeout)
    except Exception as exc:  # the connection broke off, the disk is full, ...
        found = cached()
        if found is None:
            raise unavailable(f"the download failed ({_first_line(exc)})") from None
        return found
    return Path(downloaded)
