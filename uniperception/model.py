"""``UniPerceiver``: adapters, one backbone and heads, from raw files to answers.

::

    from uniperception import UniPerceiver

    model = UniPerceiver(modality="audio", backbone="unireplknet_a", num_classes=35)
    results = model.predict(["yes.wav", "no.flac"])          # label, class name, probabilities per file
    model.save_pretrained("commands")                        # config.json + model.safetensors
    same = UniPerceiver.from_pretrained("commands")

    both = UniPerceiver(modality=["audio", "image"], num_classes={"audio": 35, "image": 10})
    logits = both({"audio": spectrograms, "image": photos})   # one shared backbone, a stem and head per modality

A model has one adapter per modality (``modalities``), one backbone (any UniRepLKNet variant or any other timm model
name, so the paper's kernel-size ablation is one argument) built with ``num_classes=0`` so it returns pooled features,
and one head per modality (``uniperception.heads``). With several modalities the backbone's first convolution, the only
layer that depends on the number of input channels, is replaced by one convolution per modality
(:class:`ModalityStems`); every other backbone tensor is shared.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from backbones.checkpoint import read_state_dict
from backbones.errors import BackboneError, CheckpointError
from modalities import create_adapter, list_modalities

from .errors import UniPerceptionError
from .files import atomic_write, umask
from .heads import ClassificationHead, EmbeddingHead, ForecastingHead

__all__ = ["ModalityStatistics", "ModalityStems", "UniPerceiver", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TASKS = ("classification", "forecasting", "embedding")
# the modality whose stem the current forward pass uses: per thread (and per task), so concurrent calls on one
# model with different modalities do not pick each other's stems
_ACTIVE_STEM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("uniperception_stem", default=None)
# predict and embed switch a model to evaluation mode for their duration: one at a time
_PREDICT_LOCK = threading.RLock()


class ModalityStems(nn.Module):
    """The backbone's first convolution, one per modality: same output channels, kernel, stride and padding, each with
    the input channels of its modality. :meth:`select` picks the one the next forward pass uses."""

    def __init__(self, template: nn.Conv2d, channels: Dict[str, int]):
        super().__init__()
        from timm.models import adapt_input_conv

        self.convs = nn.ModuleDict()
        for modality, in_chans in channels.items():
            # a copy keeps what a Conv2d subclass adds (timm's Conv2dSame padding, StdConv2d standardisation)
            conv = copy.deepcopy(template)
            conv.in_channels = in_chans
            weight = adapt_input_conv(in_chans, template.weight.detach().clone(), base_chans=template.in_channels)
            conv.weight = nn.Parameter(weight.to(template.weight.dtype))
            self.convs[modality] = conv
        self.active = next(iter(channels))

    def select(self, modality: str) -> contextvars.Token:
        """Use ``modality``'s convolution in this thread's next forward passes (returns the context token)."""
        if modality not in self.convs:
            raise UniPerceptionError(f"no stem for modality {modality!r}; stems: {sorted(self.convs)}")
        return _ACTIVE_STEM.set(modality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modality = _ACTIVE_STEM.get() or self.active
        conv = self.convs[modality]
        if x.shape[1] != conv.in_channels:
            raise UniPerceptionError(
                f"the {modality} stem takes {conv.in_channels} channel(s), got an input of shape {tuple(x.shape)}"
            )
        return conv(x)


class ModalityStatistics(nn.Module):
    """Each modality's own BatchNorm running statistics in a backbone shared by several modalities.

    A spectrogram and a photo give the shared layers very different activations, so one set of running means and
    variances, updated by batches of every modality in turn, fits none of them at evaluation. The affine weights stay
    shared; the statistics are kept here per modality (``modality_statistics.<modality>.<layer>_mean`` / ``_var``)
    and put into the BatchNorm layers before each forward pass of that modality (:meth:`use`), then, in training,
    taken back with the updates the pass made (:meth:`keep`).
    """

    def __init__(self, backbone: nn.Module, modalities: Sequence[str]):
        super().__init__()
        self.layers = [name for name, module in backbone.named_modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
        self.per_modality = nn.ModuleDict({m: nn.Module() for m in modalities})
        for holder in self.per_modality.values():
            for name in self.layers:
                layer = backbone.get_submodule(name)
                holder.register_buffer(self._key(name, "mean"), layer.running_mean.detach().clone())
                holder.register_buffer(self._key(name, "var"), layer.running_var.detach().clone())

    @staticmethod
    def _key(layer: str, kind: str) -> str:
        return f"{layer.replace('.', '_')}_{kind}"

    def _pairs(self, backbone: nn.Module, modality: str):
        """``(layer, buffer name, kept statistics)`` of every BatchNorm layer."""
        holder = self.per_modality[modality]
        for name in self.layers:
            layer = backbone.get_submodule(name)
            for kind, buffer in (("mean", "running_mean"), ("var", "running_var")):
                yield layer, buffer, getattr(holder, self._key(name, kind))

    @torch.no_grad()
    def use(self, backbone: nn.Module, modality: str) -> None:
        """Put ``modality``'s statistics into the backbone's BatchNorm layers.

        Each layer gets new tensors rather than having its own overwritten: a training step that runs the backbone
        on two modalities keeps the first pass's statistics, which autograd saved, unchanged."""
        for layer, buffer, kept in self._pairs(backbone, modality):
            setattr(layer, buffer, kept.clone())

    @torch.no_grad()
    def keep(self, backbone: nn.Module, modality: str) -> None:
        """Take the backbone's (updated) statistics back as ``modality``'s."""
        for layer, buffer, kept in self._pairs(backbone, modality):
            kept.copy_(getattr(layer, buffer))

    @torch.no_grad()
    def reset(self, backbone: nn.Module) -> None:
        """Every modality starts from the backbone's current statistics (e.g. of loaded weights)."""
        for modality in self.per_modality:
            self.keep(backbone, modality)

    def differ(self) -> bool:
        """True when the modalities' statistics are no longer all the same."""
        holders = list(self.per_modality.values())
        return any(not torch.equal(a, b) for other in holders[1:]
                   for a, b in zip(holders[0].buffers(), other.buffers(), strict=True))


def _per_modality(value: Any, modalities: Sequence[str], what: str) -> Dict[str, Any]:
    """``value`` for each modality: a dict keyed by modality, or one value for a single modality."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(modalities))
        if unknown:
            raise UniPerceptionError(f"{what} names modalities the model does not have: {unknown}")
        return {m: value.get(m) for m in modalities}
    if len(modalities) > 1 and value is not None:
        raise UniPerceptionError(f"with several modalities give {what} as a dict keyed by modality, got {value!r}")
    return {m: value for m in modalities}


class UniPerceiver(nn.Module, ModelHubMixin, library_name="uniperception", license="apache-2.0",
                   paper_url="https://arxiv.org/abs/2311.15599", tags=["unireplknet", "multimodal"]):
    """Raw data of one or more modalities to class probabilities, forecasts or embeddings.

    Args:
        modality: a registered modality (``modalities.list_modalities()``) or a list of them.
        backbone: ``unireplknet_a`` ... ``unireplknet_xl`` or any other timm model name (``convnext_tiny``,
            ``resnet50``, ...).
        num_classes: classes (classification); a dict keyed by modality when there are several. Taken from
            ``class_names`` when omitted.
        task: ``"classification"``, ``"forecasting"`` (time series) or ``"embedding"``. By default classification
            when ``num_classes`` or ``class_names`` is given, else embedding: ``UniPerceiver(modality="audio")`` is
            a model that turns audio into vectors (:meth:`embed`).
        pretrained: start the backbone from published weights: a tag of the backbone's timm configurations
            (``"in1k"``, ``"in22k_ft_in1k_384"``, ``"in22k"`` for UniRepLKNet) or ``True`` for its default tag.
            They are fetched through ``huggingface_hub``'s cache (offline from that cache); the first convolution
            is adapted to each modality's channel count with timm's ``adapt_input_conv``.
        class_names: names of the classes, kept with the model (a dict keyed by modality for several).
        kernel_sizes: UniRepLKNet kernel plan: one int per stage, one tuple per stage, or one int for the last stage
            only (``kernel_sizes=11``).
        drop_path_rate: stochastic depth of the backbone.
        head_dropout: dropout before the classifier or forecaster.
        adapters: adapter configurations keyed by modality (for several modalities).
        **adapter_config: the adapter's configuration (one modality), e.g. ``target_frames=1024``.
    """

    def __init__(
        self,
        modality: Union[str, Sequence[str]] = "image",
        backbone: str = "unireplknet_a",
        num_classes: Union[int, Dict[str, int], None] = None,
        task: Optional[str] = None,
        class_names: Union[Sequence[str], Dict[str, Sequence[str]], None] = None,
        kernel_sizes: Any = None,
        drop_path_rate: float = 0.0,
        head_dropout: float = 0.0,
        adapters: Optional[Dict[str, Dict[str, Any]]] = None,
        pretrained: Union[bool, str, None] = None,
        **adapter_config: Any,
    ):
        super().__init__()
        if task is None:
            task = "embedding" if num_classes is None and class_names is None else "classification"
        modalities = [modality] if isinstance(modality, str) else list(modality)
        known = list_modalities()
        if not modalities or len(set(modalities)) != len(modalities):
            raise UniPerceptionError(f"modality must name one or more distinct modalities, got {modality!r}")
        for name in modalities:
            if name not in known:
                raise UniPerceptionError(f"unknown modality {name!r}; known modalities: {', '.join(known)}")
        if task not in TASKS:
            raise UniPerceptionError(f"task must be one of {TASKS}, got {task!r}")
        if task == "forecasting" and modalities != ["time_series"]:
            raise UniPerceptionError(f"task='forecasting' needs modality='time_series' alone, got {modalities}")
        if adapters is not None and adapter_config:
            raise UniPerceptionError("give adapter settings either as keyword arguments (one modality) or as "
                                     f"adapters={{modality: {{...}}}}, not both: {sorted(adapter_config)}")
        if adapter_config and len(modalities) > 1:
            raise UniPerceptionError(f"with several modalities give adapter settings as adapters={{modality: {{...}}}}"
                                     f", got {sorted(adapter_config)}")
        if adapters is None:
            adapter_configs = {modalities[0]: dict(adapter_config)} if adapter_config else {}
        elif isinstance(adapters, dict):
            adapter_configs = _per_modality(adapters, modalities, "adapters")
        else:
            raise UniPerceptionError(f"adapters must be a dict keyed by modality, got {type(adapters).__name__}")
        self.modalities, self.task, self.backbone_name = modalities, task, backbone
        self.kernel_sizes, self.drop_path_rate, self.head_dropout = kernel_sizes, drop_path_rate, head_dropout
        if pretrained is not None and not isinstance(pretrained, (bool, str)):
            raise UniPerceptionError(f"pretrained must be a tag such as 'in1k', True or None, got {pretrained!r}")
        self.pretrained = (pretrained or None) if pretrained is not True else "default"

        self.adapters = nn.ModuleDict()
        for name in modalities:
            config = dict(adapter_configs.get(name) or {})
            if name == "time_series":
                config.setdefault("task", "forecasting" if task == "forecasting" else "classification")
            self.adapters[name] = create_adapter(name, **config)

        names = _per_modality(class_names, modalities, "class_names")
        counts = _per_modality(num_classes, modalities, "num_classes")
        self.class_names: Dict[str, List[str]] = {}
        if task == "classification":
            for name in modalities:
                given, count = names[name], counts[name]
                if isinstance(given, str) or (given is not None and len(set(map(str, given))) != len(given)):
                    raise UniPerceptionError(f"{name}: class_names must be a list of distinct names, got {given!r}")
                if count is None and given is None:
                    raise UniPerceptionError(f"classification needs num_classes or class_names for {name!r}")
                if given is not None and count is not None and len(given) != count:
                    raise UniPerceptionError(
                        f"{name}: num_classes={count} but {len(given)} class_names were given"
                    )
                count = int(count if count is not None else len(given))
                if count < 1:
                    raise UniPerceptionError(f"{name}: num_classes must be at least 1, got {count}")
                self.class_names[name] = [str(c) for c in given] if given is not None else [str(i) for i in
                                                                                          range(count)]

        self.backbone = self._build_backbone()
        self.modality_statistics: Optional[ModalityStatistics] = None
        if len(modalities) > 1:
            self._install_stems()
            statistics = ModalityStatistics(self.backbone, modalities)
            self.modality_statistics = statistics if statistics.layers else None
        # pooled features: a pre-logits layer (MobileNetV3, GhostNet) makes them head_hidden_size wide
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.heads = nn.ModuleDict()
        for name in modalities:
            adapter = self.adapters[name]
            if task == "classification":
                self.heads[name] = ClassificationHead(width, len(self.class_names[name]), adapter.maps_per_sample,
                                                      head_dropout)
            elif task == "forecasting":
                self.heads[name] = ForecastingHead(width, adapter.horizon, adapter.num_variables, adapter.num_nodes,
                                                   head_dropout)
            else:
                self.heads[name] = EmbeddingHead(adapter.maps_per_sample)
        # where the weights come from: nothing yet, published backbone weights, or training / a loaded state
        self._backbone_origin: Optional[str] = f"published weights ({self.pretrained})" if self.pretrained else None
        self._trained = False
        self._warned_untrained = False
        self.register_load_state_dict_post_hook(_note_loaded)

    # ---------------------------------------------------------------------------------------------------------------
    # where the weights come from

    def mark_trained(self) -> "UniPerceiver":
        """Record that every weight has been trained (the :class:`~uniperception.engine.Trainer` calls this) or
        loaded; loading a state dict records it by itself."""
        self._trained = True
        return self

    @property
    def untrained(self) -> Optional[str]:
        """``None`` when the parts that make the model's answers were trained or loaded; else what is not."""
        if self._trained:
            return None
        if self.task == "embedding":
            return self._untrained_backbone()
        backbone = f"the backbone holds {self._backbone_origin}" if self._backbone_origin else \
            "the backbone is randomly initialised too"
        return f"its {self.task} head was never trained or loaded ({backbone})"

    def _untrained_backbone(self) -> Optional[str]:
        """What embeddings depend on: ``None`` once trained, loaded or started from published weights."""
        return None if self._trained or self._backbone_origin else "its weights were never trained or loaded"

    def _warn_if_untrained(self, embedding: bool = False) -> None:
        # embeddings need a trained or published backbone, not the heads
        problem = self._untrained_backbone() if embedding else self.untrained
        if problem is None or self._warned_untrained:
            return
        self._warned_untrained = True
        warnings.warn(f"this UniPerceiver ({', '.join(self.modalities)}, {self.task}): {problem}, so its answers "
                      "carry no meaning yet. Train it (uniperception.engine.Trainer, `uniperception train`) or load "
                      "a trained model (UniPerceiver.from_pretrained)", UserWarning, stacklevel=3)

    def extra_repr(self) -> str:
        state = "trained or loaded" if self._trained else (f"UNTRAINED: {self.untrained}" if self.untrained else
                                                           f"backbone from {self._backbone_origin}")
        return f"modalities={self.modalities}, task={self.task!r}, backbone={self.backbone_name!r}, weights: {state}"

    # ---------------------------------------------------------------------------------------------------------------
    # construction

    @property
    def is_unireplknet(self) -> bool:
        return self.backbone_name.startswith("unireplknet")

    def _build_backbone(self) -> nn.Module:
        import backbones  # noqa: F401  (registers the UniRepLKNet variants with timm)

        if not timm.is_model(self.backbone_name):
            variants = [n for n in timm.list_models("unireplknet*")]
            raise UniPerceptionError(
                f"unknown backbone {self.backbone_name!r}; UniRepLKNet variants: {', '.join(variants)}; or any timm "
                f"model name (timm.list_models())"
            )
        # with several modalities the stems are made from the backbone's own first convolution: a 3-channel one
        # when it comes from published (RGB) weights, so each modality adapts the original kernel
        several = len(self.modalities) > 1
        in_chans = 3 if several and self.pretrained else self.adapters[self.modalities[0]].out_channels
        kwargs: Dict[str, Any] = dict(in_chans=in_chans, num_classes=0)
        if self.drop_path_rate:
            kwargs["drop_path_rate"] = self.drop_path_rate
        if self.kernel_sizes is not None:
            if not self.is_unireplknet:
                raise UniPerceptionError(f"kernel_sizes applies to UniRepLKNet backbones, not {self.backbone_name!r}")
            kwargs["kernel_sizes"] = self._kernel_plan(self.kernel_sizes)
        name = self.backbone_name
        if self.pretrained:
            name = name if self.pretrained == "default" else f"{name}.{self.pretrained}"
            tags = timm.list_pretrained(f"{self.backbone_name}.*")
            if self.pretrained != "default" and name not in tags:
                raise UniPerceptionError(f"no published weights {name!r}; the tags of {self.backbone_name} are: "
                                         f"{', '.join(t.split('.', 1)[1] for t in tags) or 'none'}")
            kwargs["pretrained"] = True
        try:
            return timm.create_model(name, **kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, (UniPerceptionError, BackboneError)):
                raise
            raise UniPerceptionError(f"cannot build backbone {name!r} with {kwargs}: {exc}") from exc

    def _kernel_plan(self, kernel_sizes: Any) -> Any:
        """One int means the last stage (e.g. the video recipe's 11); anything else goes to UniRepLKNet as given."""
        if isinstance(kernel_sizes, int):
            from backbones.unireplknet import default_kernel_sizes

            plan = [list(stage) for stage in default_kernel_sizes(self._depths())]
            plan[-1] = [kernel_sizes] * len(plan[-1])
            return [tuple(stage) for stage in plan]
        return kernel_sizes

    def _depths(self) -> Sequence[int]:
        with torch.device("meta"):
            return timm.create_model(self.backbone_name, num_classes=0).depths

    def _first_conv_path(self) -> str:
        path = (getattr(self.backbone, "pretrained_cfg", None) or {}).get("first_conv")
        if isinstance(path, (list, tuple)):
            path = path[0]
        if not path:
            raise UniPerceptionError(f"backbone {self.backbone_name!r} does not name its first convolution "
                                     "(pretrained_cfg['first_conv']), so it cannot take several modalities")
        return path

    def _install_stems(self) -> None:
        path = self._first_conv_path()
        template = self.backbone.get_submodule(path)
        if not isinstance(template, nn.Conv2d):
            raise UniPerceptionError(f"{self.backbone_name}: {path} is a {type(template).__name__}, not a Conv2d")
        parent_path, _, leaf = path.rpartition(".")
        parent = self.backbone.get_submodule(parent_path) if parent_path else self.backbone
        stems = ModalityStems(template, {m: self.adapters[m].out_channels for m in self.modalities})
        setattr(parent, leaf, stems)
        if hasattr(self.backbone, "check_input"):
            self.backbone.in_chans = None  # UniRepLKNet: the channel count depends on the stem of each call
        self._stems = [stems]  # a plain list: not registered twice

    @property
    def stems(self) -> Optional[ModalityStems]:
        """The per-modality first convolutions (several modalities), else None."""
        return self._stems[0] if getattr(self, "_stems", None) else None

    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay (timm's optimizer factory reads this): the backbone's own list
        (layer scales, GRN parameters) under ``backbone.``; timm also skips every 1-D parameter (norms, biases)."""
        names = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in (names() if callable(names) else ())}

    # ---------------------------------------------------------------------------------------------------------------
    # forward

    def _modality(self, modality: Optional[str]) -> str:
        if modality is None:
            if len(self.modalities) == 1:
                return self.modalities[0]
            raise UniPerceptionError(f"this model has several modalities {self.modalities}: pass modality= or a dict "
                                     "of batches keyed by modality")
        if modality not in self.adapters:
            raise UniPerceptionError(f"unknown modality {modality!r} for this model; it has {self.modalities}")
        return modality

    def features(self, batch: torch.Tensor, modality: Optional[str] = None):
        """Pooled backbone features ``(B * maps_per_sample, C)`` of a preprocessed batch and the adapter's context."""
        modality = self._modality(modality)
        maps, context = self.adapters[modality].encode(batch)
        if self.stems is None:
            return self.backbone(maps), context
        token = self.stems.select(modality)
        statistics = self.modality_statistics
        try:
            if statistics is not None:
                statistics.use(self.backbone, modality)
            features = self.backbone(maps)
            if statistics is not None and self.training:
                statistics.keep(self.backbone, modality)
            return features, context
        finally:
            _ACTIVE_STEM.reset(token)

    def forward(self, batch: Union[torch.Tensor, Dict[str, torch.Tensor]], modality: Optional[str] = None,
                with_embedding: bool = False):
        """A preprocessed batch (``adapter.collate`` of ``adapter.prepare`` outputs) to logits ``(B, classes)``,
        forecasts ``(B, T, D)`` or embeddings ``(B, C)``; a dict of batches keyed by modality gives a dict.
        ``with_embedding``: ``(output, embedding)`` instead, the embedding being what :meth:`embed` returns for
        the batch (the pooled features averaged over a sample's maps), so training can align modalities in the
        same forward pass."""
        if isinstance(batch, dict):
            return {name: self.forward(value, modality=name, with_embedding=with_embedding)
                    for name, value in batch.items()}
        modality = self._modality(modality)
        features, context = self.features(batch, modality)
        output = self.heads[modality](features, context)
        if not with_embedding:
            return output
        maps = context.get("maps_per_sample", 1)
        return output, features.view(-1, maps, features.shape[-1]).mean(1)

    # ---------------------------------------------------------------------------------------------------------------
    # raw sources in, answers out

    def _windows(self, adapter, source: Any):
        """The samples one source contributes (several for a long audio clip or video) and its raw form."""
        raw = adapter.load(source)
        if hasattr(adapter, "windows") and self.task != "forecasting" and adapter.name in ("audio", "video"):
            return list(adapter.windows(raw)), raw
        return [adapter.preprocess(raw)], raw

    def _run(self, sources: Any, modality: Optional[str], batch_size: int, what: str):
        modality = self._modality(modality)
        adapter = self.adapters[modality]
        # a list (or a tuple) holds several sources, except audio's (waveform, sample_rate) pair, which is one
        pair = isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[1], int) \
            and not isinstance(sources[1], bool)
        single = pair or not isinstance(sources, (list, tuple))
        items = [sources] if single else list(sources)
        if batch_size < 1:
            raise UniPerceptionError(f"batch_size must be positive, got {batch_size}")
        if not items:
            return modality, [], [], [], False
        samples, owners, raws = [], [], []
        for index, source in enumerate(items):
            windows, raw = self._windows(adapter, source)
            samples.extend(windows)
            owners.extend([index] * len(windows))
            raws.append(raw)
        parameter = next(self.parameters())
        outputs = []
        with _PREDICT_LOCK:
            was_training = self.training
            self.eval()
            try:
                outputs = self._batched(adapter, modality, samples, batch_size, what, parameter)
            finally:
                self.train(was_training)
        stacked = torch.cat(outputs)
        owners_tensor = torch.tensor(owners)
        return modality, items, raws, [stacked[owners_tensor == i] for i in range(len(items))], single

    def _batched(self, adapter, modality: str, samples: List[torch.Tensor], batch_size: int, what: str,
                 parameter: torch.Tensor) -> List[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for begin in range(0, len(samples), batch_size):
                batch = adapter.collate(samples[begin:begin + batch_size])
                # to the model's device, and its precision when it was converted (a bfloat16 model takes bfloat16)
                dtype = parameter.dtype if batch.is_floating_point() and parameter.is_floating_point() else None
                batch = batch.to(parameter.device, dtype)
                if what == "embed":
                    features, context = self.features(batch, modality)
                    per_sample = context.get("maps_per_sample", 1)
                    outputs.append(features.view(-1, per_sample, features.shape[-1]).mean(1).float().cpu())
                else:
                    outputs.append(self.forward(batch, modality).float().cpu())
        return outputs

    def predict(self, sources: Any, modality: Optional[str] = None, batch_size: int = 16) -> Any:
        """Answers for raw sources (paths, bytes, arrays, tensors; one or a list).

        Classification: ``{"source", "label", "class_name", "probabilities", "windows"}`` per source, where long
        audio clips and videos are split into windows (``adapter.windows``) whose probabilities are averaged.
        Forecasting: ``{"source", "forecast" (T, D), "timestamps" (or None), "columns"}`` from the last ``length``
        steps of each series. An embedding model (built without classes) has nothing to predict: it raises and
        points to :meth:`embed`. A model whose answering parts were never trained or loaded warns once. One source
        gives one dict, a list a list.

        With several modalities, ``sources`` may mix them: a dict ``{modality: sources}`` gives a dict of answers,
        and a list of files is sorted by file suffix (:data:`uniperception.data.FILE_SUFFIXES`) into modalities,
        the answers coming back in the list's order, each with its ``"modality"``.
        """
        from modalities.sources import describe_source

        mixed = self._mixed(sources, modality)
        if mixed is not None:
            return self._answer_mixed(mixed, sources, lambda items, m: self.predict(items, m, batch_size), list)
        if self.task == "embedding":
            raise UniPerceptionError(
                f"this model ({', '.join(self.modalities)}) was built without classes, so it embeds (embed()) and "
                "has nothing to predict: build it with num_classes= or class_names= and train it, or load a trained "
                "model (UniPerceiver.from_pretrained)")
        self._warn_if_untrained()
        modality, items, raws, pieces, single = self._run(sources, modality, batch_size, "predict")
        adapter = self.adapters[modality]
        results = []
        for source, raw, piece in zip(items, raws, pieces, strict=True):
            entry: Dict[str, Any] = {"source": describe_source(source)}
            if self.task == "forecasting":
                entry.update(forecast=piece[0], timestamps=adapter.future_timestamps(raw), columns=list(raw.columns))
            else:
                probabilities = piece.softmax(dim=-1).mean(0)
                label = int(probabilities.argmax())
                entry.update(label=label, class_name=self.class_names[modality][label], probabilities=probabilities,
                             windows=piece.shape[0])
            results.append(entry)
        return results[0] if single else results

    def embed(self, sources: Any, modality: Optional[str] = None, batch_size: int = 16) -> torch.Tensor:
        """Pooled backbone features of raw sources: ``(C,)`` for one source, ``(N, C)`` for a list (averaged over a
        sample's maps and a long clip's windows). Several modalities may be mixed as in :meth:`predict`: a dict
        gives a dict of ``(N, C)`` tensors, a list of files one ``(N, C)`` tensor in the list's order."""
        mixed = self._mixed(sources, modality)
        if mixed is not None:
            return self._answer_mixed(mixed, sources, lambda items, m: self.embed(items, m, batch_size), torch.stack)
        self._warn_if_untrained(embedding=True)
        _, items, _, pieces, single = self._run(sources, modality, batch_size, "embed")
        if not items:
            width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            return torch.empty(0, width)
        vectors = torch.stack([p.mean(0) for p in pieces])
        return vectors[0] if single else vectors

    def _mixed(self, sources: Any, modality: Optional[str]) -> Optional[Dict[str, List[int]]]:
        """For sources of several modalities: the positions of each modality's sources (a dict of sources: its
        keys), else None."""
        if modality is not None or len(self.modalities) == 1:
            return None
        if isinstance(sources, dict):
            for name in sources:
                self._modality(name)
            return {name: [] for name in sources}
        if not isinstance(sources, (list, tuple)) or not sources or \
                not all(isinstance(s, (str, os.PathLike)) for s in sources):
            return None  # a single source or in-memory data: _modality asks for modality=
        from .data import FILE_SUFFIXES

        positions: Dict[str, List[int]] = {}
        for index, source in enumerate(sources):
            suffix = Path(source).suffix.lower()
            owners = [m for m in self.modalities if suffix in FILE_SUFFIXES.get(m, ())]
            if len(owners) != 1:
                why = "no modality of this model reads" if not owners else f"{' and '.join(owners)} all read"
                raise UniPerceptionError(f"{source}: {why} {suffix or 'files without a suffix'}; pass the sources "
                                         "as a dict {modality: [files]} or give modality=")
            positions.setdefault(owners[0], []).append(index)
        return positions

    def _answer_mixed(self, positions: Dict[str, List[int]], sources: Any, answer, join):
        if isinstance(sources, dict):
            return {name: answer(items, name) for name, items in sources.items()}
        answers: List[Any] = [None] * len(sources)
        for name, indices in positions.items():
            for index, result in zip(indices, answer([sources[i] for i in indices], name), strict=True):
                answers[index] = dict(result, modality=name) if isinstance(result, dict) else result
        return join(answers)

    # ---------------------------------------------------------------------------------------------------------------
    # deploy form and export

    @property
    def deploy(self) -> bool:
        """True once :meth:`reparameterize` has turned the backbone into its deploy form."""
        return bool(getattr(self.backbone, "deploy", False) or getattr(self, "_reparameterized", False))

    def reparameterize(self) -> "UniPerceiver":
        """The backbone's deploy form (UniRepLKNet: merged kernels, no BatchNorm), in place; returns ``self``.

        A model of several modalities folds BatchNorm statistics shared by all of them: one trained jointly, whose
        modalities' statistics differ (:class:`ModalityStatistics`), has no single exact deploy form and raises."""
        from timm.utils import reparameterize_model

        if self.modality_statistics is not None:
            if self.modality_statistics.differ():
                raise UniPerceptionError(
                    "this model's modalities have their own BatchNorm statistics (it was trained on several at "
                    "once), and one deploy form folds one set of them: it would answer exactly for one modality "
                    "only. Keep the train form for this model")
            self.modality_statistics.use(self.backbone, self.modalities[0])
            self.modality_statistics = None
        if self.is_unireplknet:
            self.backbone.reparameterize()
        else:
            reparameterize_model(self.backbone, inplace=True)
        self._reparameterized = True
        return self

    def export_onnx(self, path: Union[str, os.PathLike], modality: Optional[str] = None, batch: Optional[
            torch.Tensor] = None, opset: int = 18) -> Path:
        """Write the model (adapter's learnable part, backbone, head) for preprocessed batches of ``modality`` to an
        ONNX file, atomically; the batch dimension is dynamic. ``batch`` is an example preprocessed batch
        (``adapter.collate(...)``) that fixes every other dimension of the input."""
        modality = self._modality(modality)
        path = Path(path)
        if batch is None:
            raise UniPerceptionError("export_onnx needs an example preprocessed batch (adapter.collate(...)), so the "
                                     "exported graph has the input size you will use")
        if batch.shape[0] == 1:  # the exporter fixes a dimension of size 1: give it two samples to keep it dynamic
            batch = torch.cat([batch, batch])
        was_training = self.training
        wrapper = _SingleModality(self, modality).eval()
        try:
            batch_dim = torch.export.Dim("batch", min=1, max=1024)
            with torch.no_grad():
                program = torch.onnx.export(wrapper, (batch,), dynamo=True, opset_version=opset,
                                            dynamic_shapes=({0: batch_dim},), input_names=["batch"],
                                            output_names=["output"])
            atomic_write(path, program.save)
        except Exception as exc:
            if isinstance(exc, UniPerceptionError):
                raise
            raise UniPerceptionError(f"{path}: ONNX export of the {modality} model failed: {exc}") from exc
        finally:
            self.train(was_training)
        return path

    # ---------------------------------------------------------------------------------------------------------------
    # saving and loading

    @property
    def config(self) -> Dict[str, Any]:
        """Everything :meth:`from_pretrained` needs to rebuild the model (JSON-serialisable)."""
        from . import __version__

        return {
            "library": "uniperception",
            "version": __version__,
            "modalities": list(self.modalities),
            "backbone": self.backbone_name,
            "task": self.task,
            "kernel_sizes": self.kernel_sizes,
            "drop_path_rate": self.drop_path_rate,
            "head_dropout": self.head_dropout,
            "class_names": self.class_names,
            "adapters": {m: self.adapters[m].config for m in self.modalities},
            "deploy": self.deploy,
            "pretrained": self.pretrained,
            "trained": self._trained,
        }

    def save_pretrained(self, directory: Union[str, os.PathLike], *, config: Optional[Dict[str, Any]] = None,
                        repo_id: Optional[str] = None, push_to_hub: bool = False,
                        model_card_kwargs: Optional[Dict[str, Any]] = None, **push_to_hub_kwargs: Any) -> Path:
        """Write ``config.json``, ``model.safetensors`` and, where none is there yet, a model card ``README.md``
        into ``directory`` (created if needed; other files in it are left alone): the Hugging Face Hub layout, so
        the folder can be uploaded as it is (``push_to_hub=True`` with ``repo_id``, or :meth:`push_to_hub`).
        ``config``: extra JSON-serialisable entries kept under ``"user_config"`` in ``config.json``.

        Both files are written to a hidden staging folder first. A new directory appears in one rename; in an existing
        one the weights and then the configuration replace the old files, and the configuration records the weights'
        SHA-256, so a save interrupted between the two renames leaves a pair that :meth:`from_pretrained` refuses
        rather than one it would load with the wrong weights.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise UniPerceptionError(f"{directory}: exists and is not a directory")
        parent = directory.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.resolve().name}.", suffix=".partial", dir=parent))
        try:
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            saved = dict(self.config, weights_sha256=_sha256(staging / WEIGHTS_NAME))
            if config:
                saved["user_config"] = config
            (staging / CONFIG_NAME).write_text(json.dumps(saved, indent=2) + "\n")
            if not (directory / "README.md").exists():
                self.generate_model_card(**(model_card_kwargs or {})).save(staging / "README.md")
            os.chmod(staging, 0o777 & ~umask())  # as an ordinary new directory (mkdtemp makes it owner-only)
            if directory.exists():
                os.replace(staging / WEIGHTS_NAME, directory / WEIGHTS_NAME)
                os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
                if (staging / "README.md").exists():
                    os.replace(staging / "README.md", directory / "README.md")
                staging.rmdir()
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if push_to_hub:
            self.push_to_hub(repo_id or directory.name, config=config, model_card_kwargs=model_card_kwargs,
                             **push_to_hub_kwargs)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu", *,
                        revision: Optional[str] = None, cache_dir: Union[str, os.PathLike, None] = None,
                        force_download: bool = False, token: Union[str, bool, None] = None,
                        local_files_only: bool = False) -> "UniPerceiver":
        """Rebuild a model written by :meth:`save_pretrained` (train or deploy form) with identical outputs, in
        evaluation mode (call ``.train()`` to fine-tune it).

        ``directory`` is a local folder or a Hugging Face Hub repository id (``"org/name"``, optionally at
        ``revision``), fetched through ``huggingface_hub``'s cache (offline from it with ``HF_HUB_OFFLINE=1`` or
        ``local_files_only=True``). A folder or repository that is not a complete, matching pair of configuration
        and weights raises :class:`CheckpointError`: nothing is loaded partly.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = _model_folder(directory, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                  token=token, local_files_only=local_files_only)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise CheckpointError(f"{needed}: missing; {directory} is not a directory written by save_pretrained")
        try:
            config = json.loads(config_path.read_text())
            if config.get("library") != "uniperception":
                raise ValueError("not a uniperception configuration")
            modalities, adapters = config["modalities"], config["adapters"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: not a readable model configuration ({exc})") from exc
        model = cls(
            modality=modalities if len(modalities) > 1 else modalities[0], backbone=config["backbone"],
            task=config["task"], class_names=config.get("class_names") or None,
            kernel_sizes=config.get("kernel_sizes"), drop_path_rate=config.get("drop_path_rate", 0.0),
            head_dropout=config.get("head_dropout", 0.0), adapters=adapters,
        )
        if config.get("deploy"):
            model.reparameterize()
        try:
            state_dict = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights_path}: corrupt or truncated weights file ({exc})") from exc
        expected = config.get("weights_sha256")
        if expected is not None and _sha256(weights_path) != expected:
            raise CheckpointError(f"{weights_path}: does not match {config_path} (its SHA-256 differs from the one "
                                  "recorded at saving: an interrupted save or a file copied from another model)")
        model._load_exactly(state_dict, weights_path)
        # a saved model that was never trained stays marked as such (files without the mark were trained)
        model._trained = bool(config.get("trained", True))
        model._backbone_origin = model._backbone_origin or (f"published weights ({config['pretrained']})"
                                                            if config.get("pretrained") else None)
        return model.to(map_location).eval()

    def _load_exactly(self, state_dict: Dict[str, torch.Tensor], name: Any) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            def preview(items):
                return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")

            parts = [f"missing {preview(missing)}" if missing else "",
                     f"unexpected {preview(unexpected)}" if unexpected else "",
                     f"mis-shaped {preview(shapes)}" if shapes else ""]
            raise CheckpointError(f"{name}: the weights belong to another configuration: "
                                  + "; ".join(p for p in parts if p))
        self.load_state_dict(state_dict, strict=True)

    def load_backbone_weights(self, path: Union[str, os.PathLike], trusted: bool = False) -> "UniPerceiver":
        """Load backbone weights from a checkpoint file (the official UniRepLKNet ``.pth`` files included): the first
        convolution is adapted to each modality's channel count with timm's ``adapt_input_conv``, and the file's
        classifier is dropped (the heads stay as they are). A bare file name that does not exist is looked up in
        ``$UNIPERCEPTION_WEIGHTS`` (``backbones.unireplknet.weights_dir``). For a UniRepLKNet backbone the rules of
        :func:`backbones.checkpoint.load_checkpoint` apply (wrappers, prefixes, train file into a deploy model)."""
        from timm.models import adapt_input_conv

        from backbones.checkpoint import load_checkpoint
        from backbones.unireplknet import resolve_weights_path

        path = resolve_weights_path(path)  # a bare file name is looked up in the weights directory
        state_dict = read_state_dict(path, trusted=trusted)
        if self.is_unireplknet:
            if self.stems is None:
                load_checkpoint(self.backbone, dict(state_dict), strict=True, trusted=trusted, _name=str(path))
            else:
                self._load_through_plain_stem(state_dict, path, trusted)
            self._backbone_loaded_from(path)
            return self
        # another timm backbone: strip wrappers, drop the classifier, adapt the first conv, load the rest
        for prefix in ("model.", "module.", "backbone."):
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        first = self._first_conv_path()
        classifier = (getattr(self.backbone, "pretrained_cfg", None) or {}).get("classifier", "head")
        classifier = [classifier] if isinstance(classifier, str) else list(classifier)
        state_dict = {k: v for k, v in state_dict.items()
                      if not any(k == c or k.startswith(c + ".") for c in classifier)}
        for suffix in ("weight", "bias"):
            key = f"{first}.{suffix}"
            if key not in state_dict:
                continue
            tensor = state_dict.pop(key)
            targets = ({key: self.backbone.get_submodule(first)} if self.stems is None else
                       {f"{first}.convs.{m}.{suffix}": conv for m, conv in self.stems.convs.items()})
            for name, conv in targets.items():
                name = name if self.stems is not None else key
                if suffix == "weight" and conv.in_channels != tensor.shape[1]:
                    state_dict[name] = adapt_input_conv(conv.in_channels, tensor.float(),
                                                        base_chans=tensor.shape[1]).to(tensor.dtype)
                else:
                    state_dict[name] = tensor
        try:
            missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not fit {self.backbone_name}: {exc}") from None
        if missing or unexpected:
            raise CheckpointError(f"{path}: does not fit {self.backbone_name}: missing {missing[:6]}, "
                                  f"unexpected {unexpected[:6]}")
        self._backbone_loaded_from(path)
        return self

    def _backbone_loaded_from(self, path: Path) -> None:
        """After a backbone checkpoint was loaded: record where the weights came from, and let every modality start
        from the file's BatchNorm statistics."""
        self._backbone_origin = str(path)
        if self.modality_statistics is not None:
            self.modality_statistics.reset(self.backbone)

    def _load_through_plain_stem(self, state_dict: Dict[str, torch.Tensor], path: Path, trusted: bool) -> None:
        """UniRepLKNet with per-modality stems: load the file through an ordinary 3-channel first convolution (so
        every rule of ``load_checkpoint`` applies, train file into a deploy model included), then give each modality
        that convolution adapted to its channel count, or its own stem where the file has one per modality (a
        model of several modalities saved by :meth:`save_pretrained`) of the same shape."""
        from timm.models import adapt_input_conv

        from backbones.checkpoint import load_checkpoint

        stems, first = self.stems, self._first_conv_path()
        parent_path, _, leaf = first.rpartition(".")
        parent = self.backbone.get_submodule(parent_path) if parent_path else self.backbone
        template = next(iter(stems.convs.values()))
        plain = copy.deepcopy(template)
        plain.in_channels = 3
        plain.weight = nn.Parameter(template.weight.new_zeros(template.out_channels, 3, *template.kernel_size))
        prefix = "downsample_layers.0.0.convs."
        own_stems = {key[len(prefix):].rpartition(".")[0]: key for key in state_dict
                     if key.startswith(prefix) and key.endswith(".weight")}
        # the plain convolution takes a 3-channel stem of the file where it has one, else any (adapted to 3)
        three = [m for m, key in sorted(own_stems.items()) if state_dict[key].shape[1] == 3]
        chosen = (three or sorted(own_stems) or [None])[0]
        saved = (self.backbone.in_chans, self.backbone._arguments["in_chans"])
        setattr(parent, leaf, plain)
        self.backbone.in_chans = self.backbone._arguments["in_chans"] = 3
        try:
            load_checkpoint(self.backbone, dict(state_dict), strict=True, trusted=trusted, _name=str(path),
                            stem=chosen)
        finally:
            setattr(parent, leaf, stems)
            self.backbone.in_chans, self.backbone._arguments["in_chans"] = saved
        with torch.no_grad():
            for modality, conv in stems.convs.items():
                key = own_stems.get(modality)
                if key is not None and state_dict[key].shape == conv.weight.shape:
                    conv.weight.copy_(state_dict[key])
                    bias = state_dict.get(key[:-len("weight")] + "bias")
                    if conv.bias is not None and bias is not None:
                        conv.bias.copy_(bias)
                    continue
                conv.weight.copy_(adapt_input_conv(conv.in_channels, plain.weight.detach().float(), base_chans=3))
                if conv.bias is not None and plain.bias is not None:
                    conv.bias.copy_(plain.bias.detach())


def _model_folder(name: Union[str, os.PathLike], **download: Any) -> Path:
    """A local folder as it is; a Hub repository id (``org/name``) fetched into ``huggingface_hub``'s cache."""
    path = Path(name).expanduser()
    text = str(name)
    if path.exists() or isinstance(name, Path) or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                         RepositoryNotFoundError)

    try:
        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"], **download))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text}: no such local folder, and no Hugging Face Hub model repository of that name "
                              "(or it is private: pass token=)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text}: not a local folder, and the Hugging Face Hub repository of that name is not in the local cache "
            f"({_hub_cache()}) while downloads are off or the Hub cannot be reached; download it where the network "
            f"reaches the Hub (hf download {text}) or pass a local folder written by save_pretrained"
        ) from None
    except HFValidationError:
        raise CheckpointError(f"{text}: no such local folder, and not a valid Hub repository id (org/name)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{text}: cannot fetch this model from the Hugging Face Hub ({exc})") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _note_loaded(module: "UniPerceiver", incompatible_keys) -> None:
    """A whole model's state dict was loaded: its weights are no longer the random initialisation."""
    module._trained = True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _SingleModality(nn.Module):
    """One modality of a :class:`UniPerceiver` as a plain ``batch -> output`` module (for export)."""

    def __init__(self, model: UniPerceiver, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch, modality=self.modality)
