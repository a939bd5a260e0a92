"""Bring your own model: read MC-Loss and CE checkpoints written by other projects, safely, into an MCModel.

Each project's layout is one :class:`Layout` in :data:`LAYOUTS`: how its keys map onto mcloss's (the rules are
written from reading each project's code), how F, the groups and the head follow from its tensors, and the input
transform its scripts evaluate with. Files are read with safetensors or ``torch.load(weights_only=True)``; a
file that needs unpickling (a whole pickled model) is refused, never run.

Layouts (``--from`` source in brackets):

- ``official-vgg16`` [official]: PRIS-CV ``model_bn``: ``features_1`` (VGG16-BN's first 34 layers, conv4_3 at ξ·C)
  and ``features_2`` (conv5_x, conv5_3 at ξ·C); head 2 × 2 max-pool, BN1d, Linear→512, BN1d, ELU, Linear.
- ``official-vgg16-early`` [official]: the first scripts' ``model_bn``, whose ``features`` is the whole VGG16-BN
  ``features`` (one Sequential, conv5_3 alone widened).
- ``official-resnet`` [official]: ``features`` = a ResNet's children up to layer4 (ResNet-18: layer4 at ξ·C
  planes and stride 1; ResNet-50: torchvision's own 2048 channels split 10/11), head MaxPool2d(14), BN1d, ….
- ``fgvclib-vgg16`` [fgvclib]: FGVCLib's MCL: ``backbone.features`` (VGG16 without BN, conv4_3 and conv5_3 at
  ξ·C), an unused ``backbone.classifier``, 2 × 2 max-pool, ``heads.classifiers.0`` (BN1d, Linear, BN1d, ReLU,
  Linear).
- ``kurumi`` [kurumi]: Kurumi233's ``ckpt.pth`` ``{'net', 'metric', 'acc', 'epoch'}``: from scratch, VGG16-BN up to
  conv5_2 then ``last_conv`` to ξ·C; pretrained, a ResNet's children up to layer4 with an adaptive max-pool;
  the metric ``dense`` (the official head) or ``linear``. Its ``setting.txt`` gives the input size.
- ``torchvision`` [torchvision]: a torchvision ResNet or VGG16(-BN) classifier fine-tuned with its own head (a CE
  model): its channels are split over the classes as the official code splits them.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mcloss.core.checkpoint import FORMAT, MAX_CLASSES, MAX_IMG_SIZE, MIN_IMG_SIZE
from mcloss.core.errors import MclossError, ParameterError, first_line
from mcloss.core.files import file_sha256, printable
from mcloss.core.groups import split_channels
from mcloss.core.model import VGG_WIDEN, HeadSpec, MCModel, build_model, check_class_names, vgg16_conv_index
from mcloss.core.transforms import NORMALIZATIONS, EvalTransform
from mcloss.data.cub import clean_class_name, find_cub_root, read_class_names

__all__ = [
    "LAYOUTS",
    "SOURCES",
    "TRANSFORM_PRESETS",
    "Layout",
    "SourceError",
    "SourceWeights",
    "detect_layout",
    "import_checkpoint",
    "import_model",
    "parse_class_names",
    "read_class_list",
    "read_source",
    "unwrap_keys",
]

#: Most non-tensor entries of a file kept for the card (Kurumi233's ``acc`` and ``epoch``).
MAX_EXTRAS = 16
#: The ``--from`` choices besides ``auto``.
SOURCES = ("official", "fgvclib", "kurumi", "torchvision")
#: What torch.load says of a TorchScript archive under ``weights_only``: it warns ("… looks like a TorchScript
#: archive …"), then refuses to read it ("… with TorchScript archives …").
_TORCHSCRIPT = "TorchScript archive"
#: Largest source file read (an official VGG16 state dict at 200 classes is about 120 MB, FGVCLib's about 0.6 GB).
MAX_SOURCE_BYTES = 4 << 30


class SourceError(MclossError, ValueError):
    """A source checkpoint cannot be imported; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class SourceWeights:
    """A source file's tensors, its keys with every ``module.`` segment removed (DataParallel's), nested state
    dicts flattened with their key as prefix (``{'net': …, 'metric': …}`` → ``net.…``, ``metric.…``).

    Attributes:
        path: the file.
        state: key → tensor.
        extras: the file's non-tensor top-level entries (e.g. Kurumi233's ``acc`` and ``epoch``).
        sha256: the file's digest.
        key_prefix: the wrapper's prefix removed from every key (``model.`` of a Lightning module, ``net.`` of a
            ``{'net': state_dict, 'acc': …}`` file), where the keys fit a layout only without it.
        left_out: what was not read: state dicts beside the wrapper's (``state_dict_ema``), the keys a chosen
            prefix leaves out (``model_ema.``, ``criterion.``), an ``AveragedModel``'s ``n_averaged``.
        infixed: the keys of ``state`` that carried ``module.`` (saved from a DataParallel model, or an
            ``AveragedModel``'s).
        averaged: the keys read are an ``AveragedModel``'s (EMA or SWA weights: ``module.`` and ``n_averaged``),
            so their ``module.`` is its, not DataParallel's.
    """

    path: Path
    state: dict[str, torch.Tensor]
    extras: dict = field(default_factory=dict)
    sha256: str = ""
    key_prefix: str = ""
    left_out: list[str] = field(default_factory=list)
    infixed: frozenset[str] = field(default=frozenset(), repr=False)
    averaged: bool = False

    @property
    def module_infix(self) -> bool:
        """Whether the keys read carried DataParallel's ``module.`` (not an ``AveragedModel``'s)."""
        return bool(self.infixed) and not self.averaged

    def under(self, prefix: str) -> SourceWeights:
        """The keys under ``prefix``, without it (``prefix`` added to :attr:`key_prefix`)."""
        state = {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}
        infixed = frozenset(k[len(prefix) :] for k in self.infixed if k.startswith(prefix))
        return replace(self, state=state, key_prefix=self.key_prefix + prefix, infixed=infixed)

    @property
    def label(self) -> str:
        return str(self.path)


_MODULE = re.compile(r"(^|\.)module\.")
#: Wrapper keys whose value is the whole state dict.
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net_state_dict")


def read_source(path: str | os.PathLike) -> SourceWeights:
    """Read a state dict from ``.safetensors`` or a PyTorch file, without unpickling anything.

    Raises:
        SourceError: missing, empty, corrupt, a pickled model (with how to re-save a state dict), or no tensors.
    """
    p = Path(path)
    label = str(path)
    if p.is_dir():
        raise SourceError(f"{label}: is a directory, not a checkpoint file")
    if not p.is_file():
        raise SourceError(f"{label}: no such file")
    size = p.stat().st_size
    if size < 8:
        raise SourceError(f"{label}: empty or truncated file, not a checkpoint")
    if size > MAX_SOURCE_BYTES:
        raise SourceError(f"{label}: {size / 2**30:.1f} GiB, more than the {MAX_SOURCE_BYTES >> 30} GiB a model file may be")
    raw = _load(p, label)
    state, extras, beside = _flatten(raw, label)
    for key, tensor in state.items():
        if tensor.layout != torch.strided or tensor.is_quantized:  # sparse, quantized: no model's plain weights
            kind = "quantized" if tensor.is_quantized else str(tensor.layout).removeprefix("torch.")
            raise SourceError(f"{label}: tensor {key!r} is {kind}, not a dense weight")
        # a view claims no more memory than its storage holds (a stride-0 view can claim terabytes)
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise SourceError(f"{label}: tensor {key!r} claims more elements than its storage holds")
    infixed = frozenset(_MODULE.sub(r"\1", k) for k in state if _MODULE.search(k))
    normalized = {_MODULE.sub(r"\1", k): v for k, v in state.items()}
    if len(normalized) != len(state):
        raise SourceError(f"{label}: keys collide once DataParallel's 'module.' is removed")
    return SourceWeights(p, normalized, extras, file_sha256(p), left_out=beside, infixed=infixed)


def _load(p: Path, label: str) -> object:
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(p), framework="pt") as f:
                ours = (f.metadata() or {}).get("format") == FORMAT
            state = None if ours else load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SourceError(f"{label}: not a valid safetensors file ({first_line(exc)})") from None
        if ours:
            raise SourceError(f"{label}: already an mcloss checkpoint ({FORMAT}); use it as it is, no import needed")
        return state
    try:
        with torch.serialization.safe_globals(_plain_value_types()), warnings.catch_warnings():
            # torch's note on a pickle protocol it did not write: the file is refused or read all the same
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise SourceError(f"{label}: {_not_torch_saved(p) or 'not a readable PyTorch file (corrupt, or not a checkpoint)'}") from None
        resave = (
            f"where you trust it, save its weights: torch.save(torch.load({label!r}, weights_only=False)['state_dict'], "
            "'weights.pth')" if p.suffix == ".ckpt"  # Lightning: objects in hyper_parameters, weights under state_dict
            else "re-save the weights from the script that trained it: torch.save(net.state_dict(), 'weights.pth')"
        )  # fmt: skip
        raise SourceError(
            f"{label}: holds pickled Python objects ({found.group(1)}), not a state dict, and mcloss never unpickles "
            f"code; {resave}"
        ) from None
    except Exception as exc:  # truncated zip, not a PyTorch file at all, a TorchScript archive
        if _TORCHSCRIPT in str(exc):  # torch's refusal, or its warning before it where warnings are errors
            raise SourceError(
                f"{label}: a TorchScript archive (torch.jit.save), which mcloss does not load; where you trust it, "
                f"save its weights: torch.save(torch.jit.load({label!r}).state_dict(), 'weights.pth')"
            ) from None
        reason = _not_torch_saved(p) or f"not a readable PyTorch file ({type(exc).__name__}: {first_line(exc, 120)})"
        raise SourceError(f"{label}: {reason}") from None


#: torch.save's older format begins with its magic number, pickled (``LONG1``, 10 bytes, little-endian).
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
#: The bytes of a refused file that :func:`_not_torch_saved` reads to tell a plain pickle (bounded time and memory).
PICKLE_PROBE_BYTES = 1 << 20


def _not_torch_saved(p: Path) -> str | None:
    """Why a file torch.load refused is not one torch.save wrote, where its bytes say so, or None (it looks like
    torch.save's, and is corrupt or truncated). A plain pickle (``pickle.dump``, any protocol) is found by walking
    the opcodes of its first :data:`PICKLE_PROBE_BYTES` (which runs nothing): they end in STOP, or run on well
    formed to the end of that probe in a longer file."""
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            probe = f.read(PICKLE_PROBE_BYTES)
    except OSError:
        return None
    if probe.startswith(b"PK") or _LEGACY_MAGIC in probe[:32]:
        return None
    stream = io.BytesIO(probe)
    try:
        for op, _, _ in pickletools.genops(stream):
            if op.name == "STOP":
                return _PLAIN_PICKLE
    except Exception:  # a malformed opcode, a length past the probe's end, or the probe's end inside one
        if size > len(probe) and stream.tell() >= len(probe) - 16:
            return _PLAIN_PICKLE
    if not probe.startswith(b"\x80"):
        return "not a PyTorch file (neither torch.save's zip archive nor its older format)"
    return None


_PLAIN_PICKLE = (
    "a plain pickle (pickle.dump), not a file torch.save wrote, and mcloss never unpickles; re-save the weights "
    "from the script that made it: torch.save(net.state_dict(), 'weights.pth')"
)


class _RunArguments:
    """Read in place of a training run's ``argparse.Namespace``: a plain object whose attributes are themselves
    read under ``weights_only``'s restrictions (and never used)."""


def _plain_value_types() -> list:
    """What training scripts save beside the weights and ``weights_only`` may rebuild without running code: numpy
    scalars (``best_acc = np.float64(...)``: a dtype and raw bytes) and the run's ``argparse.Namespace`` (read as
    :class:`_RunArguments`)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    numeric = [type(np.dtype(c)) for c in "?bhilqBHILQefdg"]  # the dtype classes (numpy 2) a scalar's dtype is built as
    return [np.dtype, *dict.fromkeys(numeric), scalar, (_RunArguments, "argparse.Namespace")]


def _flatten(raw: object, label: str, depth: int = 0) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """The file's tensors (a wrapper's whole state dict, else every tensor and dict of tensors, the dicts' keys
    prefixed), its scalar entries, and the other state dicts beside a wrapper's (timm's ``state_dict_ema``).
    A file with no tensors of its own is read inside its one wrapper (``{'model': {'state_dict': …}}``)."""
    if not isinstance(raw, dict):
        raise SourceError(f"{label}: holds a {type(raw).__name__}, not a state dict")
    raw = {k: _plain(v) for k, v in raw.items()}
    tensor_dicts = [k for k, v in raw.items() if isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())]
    for key in _WRAPPERS:
        if key in tensor_dicts:
            extras = {str(k)[:80]: v[:200] if isinstance(v, str) else v for k, v in raw.items() if k != key and _is_scalar(v)}
            beside = [str(k)[:80] for k in tensor_dicts if k != key and raw[k]]
            return {str(k): v for k, v in raw[key].items()}, dict(list(extras.items())[:MAX_EXTRAS]), beside
    state: dict[str, torch.Tensor] = {}
    extras = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            state |= {f"{key}.{k}": v for k, v in value.items()}
        elif _is_scalar(value) and len(extras) < MAX_EXTRAS:
            extras[str(key)[:80]] = value[:200] if isinstance(value, str) else value
    inner = [k for k in _WRAPPERS if isinstance(raw.get(k), dict)]
    if not state and len(inner) == 1 and depth < 2:
        return _flatten(raw[inner[0]], label, depth + 1)
    if not state:
        raise SourceError(f"{label}: holds no tensors (keys: {', '.join(map(str, list(raw)[:6]))})")
    return state, extras, []


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _plain(value: object) -> object:
    """A numpy scalar as the Python number it holds, a NaN or infinity as its name (extras go into the card's
    JSON, which has neither); anything else as is."""
    import numpy as np

    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


# --------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Plan:
    """How one source file becomes an MCModel: the model to build and the key rules.

    Attributes:
        rules: (source prefix, mcloss prefix, index shift) in order; the shift is added to the integer that
            follows the prefix (``features_2.6.`` → ``features.40.``).
        dropped: source prefixes that the source model never uses in its forward (left out, and recorded).
        preset: the input transform its scripts evaluate with (:data:`TRANSFORM_PRESETS`).
        default_size: the input side its scripts use.
        head_pool: the pool before its head (max: the official 2 × 2 or 14 × 14 max-pool; avg: torchvision's).
        head_act: the activation of an official-shaped head (ELU in the official code, ReLU in FGVCLib's).
        pool_kernel: the fixed max-pool kernel before the source's head (2 for the VGG heads' 2 × 2 pool, 14 for
            the official ResNets' MaxPool2d(14)); mcloss's adaptive pool reads the same cells only when F is
            exactly kernel × grid. None: the source pools adaptively or globally (any size).
        own_layer4: a ResNet trunk as wide as the backbone's own is the backbone's own layer4 (stride 2), its
            channels split over the classes. False for the official ResNet-18 script, which rebuilds layer4 at
            ξ·C planes and stride 1 whatever ξ·C is (the weights cannot tell the stride).
    """

    backbone: str
    rules: tuple[tuple[str, str, int], ...]
    dropped: tuple[str, ...] = ()
    preset: str = "official"
    default_size: int = 224
    head_pool: str = "max"
    head_act: str = "elu"
    pool_kernel: int | None = 2
    own_layer4: bool = True

    @property
    def resnet_own_layer4(self) -> bool:
        """A ResNet that keeps its backbone's own layer4 (stride 2), whose own channels are split over the classes
        when F is that wide (the official ResNet-50 script's MC model)."""
        return self.backbone.startswith("resnet") and self.own_layer4


@dataclass(frozen=True)
class Layout:
    """One project's checkpoint layout.

    Attributes:
        name: its name (``official-vgg16``, …).
        source: its ``--from`` value.
        description: one line for messages and the card.
        matches: whether a file's keys are of this layout.
        plan: the model and key rules for a file of this layout.
    """

    name: str
    source: str
    description: str
    matches: Callable[[dict[str, torch.Tensor]], bool]
    plan: Callable[[SourceWeights, str | None], Plan]


def _has(state: dict, *keys: str) -> bool:
    return all(k in state for k in keys)


def _any_prefix(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


#: torchvision ResNet stage names → MCModel trunk positions (stem conv, bn, relu, maxpool, then layer1..4).
_RESNET_RULES = (("conv1.", "features.0.", 0), ("bn1.", "features.1.", 0)) + tuple(
    (f"layer{i}.", f"features.{3 + i}.", 0) for i in range(1, 5)
)
#: torchvision ResNets by (blocks per stage, bottleneck).
_RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


def _resnet_arch(state: dict, prefix: str, label: str, arch: str | None) -> str:
    """The torchvision ResNet whose stages a trunk's keys (``prefix`` + 4..7) have."""
    blocks = tuple(
        len({k[len(p) :].split(".")[0] for k in state if k.startswith(p)}) for p in (f"{prefix}{s}." for s in range(4, 8))
    )
    bottleneck = f"{prefix}7.0.conv3.weight" in state
    name = _RESNETS.get((blocks, bottleneck))
    if name is None:
        raise SourceError(f"{label}: a ResNet with stages of {list(blocks)} blocks is not one torchvision builds")
    if arch and arch != name:
        raise SourceError(f"{label}: the weights are a {name}, not the {arch} of --arch")
    return name


def _official_vgg(src: SourceWeights, arch: str | None) -> Plan:
    rules = (("features_1.", "features.", 0), ("features_2.", "features.", 34), ("classifier.", "head.classifier.", 0))
    return Plan(_vgg_arch(src, arch, "vgg16_bn"), rules)


def _official_vgg_early(src: SourceWeights, arch: str | None) -> Plan:
    rules = (("features.", "features.", 0), ("classifier.", "head.classifier.", 0))
    return Plan(_vgg_arch(src, arch, "vgg16_bn"), rules)


def _official_resnet(src: SourceWeights, arch: str | None) -> Plan:
    name = _resnet_arch(src.state, "features.", src.label, arch)
    rules = (("features.", "features.", 0), ("classifier.", "head.classifier.", 0))
    bottleneck = name not in ("resnet18", "resnet34")
    # the official ResNet-50 script: Resize((600, 600)) + CenterCrop(448); ResNet-18 from scratch: 224 × 224
    preset = "official-crop" if bottleneck else "official"
    return Plan(name, rules, preset=preset, default_size=448 if bottleneck else 224, pool_kernel=14, own_layer4=bottleneck)


def _fgvclib_vgg(src: SourceWeights, arch: str | None) -> Plan:
    rules = (("backbone.features.", "features.", 0), ("heads.classifiers.0.", "head.classifier.", 0))
    return Plan(_vgg_arch(src, arch, "vgg16"), rules, dropped=("backbone.classifier.",), head_act="relu")


def _kurumi(src: SourceWeights, arch: str | None) -> Plan:
    metric = (("metric.dense.", "head.classifier.", 0), ("metric.fc.", "head.classifier.0.", 0))
    if _any_prefix(src.state, "net.last_conv."):
        # BaseModel_scratch: vgg16_bn features[:-4] (up to conv5_2's ReLU), then conv5_3 to ξ·C, BN, ReLU
        rules = (("net.backbone.", "features.", 0), ("net.last_conv.", "features.", 40), *metric)
        return Plan(_vgg_arch(src, arch, "vgg16_bn"), rules, preset="kurumi")
    if "net.backbone.0.0.weight" in src.state:
        raise SourceError(
            f"{src.label}: Kurumi233's pretrained vgg16bn (a VGG16 whose F is the map after its last pool) is not a "
            "layout mcloss builds"
        )
    name = _resnet_arch(src.state, "net.backbone.", src.label, arch)
    return Plan(name, (("net.backbone.", "features.", 0), *metric), preset="kurumi", default_size=448, pool_kernel=None)


def _torchvision(src: SourceWeights, arch: str | None) -> Plan:
    if "conv1.weight" in src.state:
        stages = {f"features.{3 + int(k[5])}.{k[7:]}": 0 for k in src.state if re.match(r"layer[1-4]\.", k)}
        name = _resnet_arch(stages, "features.", src.label, arch)
        conv2 = src.state.get("layer1.0.conv2.weight")
        if name not in ("resnet18", "resnet34") and conv2 is not None and tuple(conv2.shape[:2]) != (64, 64):
            raise SourceError(
                f"{src.label}: a ResNeXt or wide ResNet (layer1.0.conv2 is {list(conv2.shape)}, a {name}'s is "
                "[64, 64, 3, 3]); mcloss imports torchvision's plain ResNets and VGG16"
            )
        rules = (*_RESNET_RULES, (_resnet_fc(src), "head.classifier.0.", 0))
        return Plan(name, rules, preset="torchvision", head_pool="avg", pool_kernel=None)
    convs = sum(1 for k, v in src.state.items() if re.fullmatch(r"features\.\d+\.weight", k) and v.dim() == 4)
    bn = "features.1.running_mean" in src.state
    if convs != 13:
        found = {8: "VGG11", 10: "VGG13", 16: "VGG19"}.get(convs, "VGG")
        raise SourceError(
            f"{src.label}: a torchvision {found}{'-BN' if bn else ''} ({convs} convolutions); mcloss imports VGG16 "
            "(13) and torchvision's plain ResNets"
        )
    name = _vgg_arch(src, arch, "vgg16_bn" if bn else "vgg16")
    return Plan(name, (("features.", "features.", 0), ("classifier.", "head.classifier.", 0)), preset="torchvision")


def _resnet_fc(src: SourceWeights) -> str:
    """The prefix of a torchvision ResNet's head Linear: ``fc.``, or ``fc.<i>.`` where fine-tuning made ``fc`` a
    Sequential around one Linear (``Sequential(Dropout, Linear)``; its layers without weights are taken as
    Dropout, the identity at evaluation)."""
    owners = sorted({k.rsplit(".", 1)[0] for k in src.state if k.startswith("fc.")})
    weight = src.state.get(f"{owners[0]}.weight") if len(owners) == 1 else None
    if weight is None or weight.dim() != 2:
        held = ", ".join(owners[:4]) or "nothing"
        raise SourceError(f"{src.label}: its fc holds {held}, not one Linear layer, the only head mcloss imports")
    return f"{owners[0]}."


def _vgg_arch(src: SourceWeights, arch: str | None, name: str) -> str:
    if arch and arch != name:
        raise SourceError(f"{src.label}: the weights are a {name}, not the {arch} of --arch")
    return name


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "official-vgg16", "official", "PRIS-CV model_bn, VGG16 in features_1/features_2",
        lambda s: _has(s, "features_1.0.weight", "classifier.1.weight") and _any_prefix(s, "features_2."),
        _official_vgg,
    ),
    Layout(
        "official-vgg16-early", "official", "PRIS-CV model_bn of the first scripts, one features = VGG16-BN's",
        lambda s: _has(s, "features.0.weight", "features.40.weight", "classifier.0.running_mean")
        and "features.7.0.conv1.weight" not in s,
        _official_vgg_early,
    ),
    Layout(
        "official-resnet", "official", "PRIS-CV model_bn on a ResNet (ResNet-18 from scratch, ResNet-50 pretrained)",
        lambda s: _has(s, "features.0.weight", "features.7.0.conv1.weight", "classifier.1.weight"),
        _official_resnet,
    ),
    Layout(
        "fgvclib-vgg16", "fgvclib", "FGVCLib MCL: backbone.features VGG16 without BN, heads.classifiers.0",
        lambda s: _has(s, "backbone.features.0.weight", "heads.classifiers.0.1.weight"),
        _fgvclib_vgg,
    ),
    Layout(
        "kurumi", "kurumi", "Kurumi233 ckpt.pth {'net', 'metric', 'acc', 'epoch'}",
        lambda s: (_has(s, "net.backbone.0.weight") or _has(s, "net.backbone.0.0.weight"))
        and (_any_prefix(s, "metric.dense.") or "metric.fc.weight" in s),
        _kurumi,
    ),
    Layout(
        "torchvision", "torchvision", "a torchvision ResNet or VGG16 classifier with its own head (a CE model)",
        lambda s: _has(s, "conv1.weight", "layer4.0.conv1.weight") and _any_prefix(s, "fc.")
        or _has(s, "features.0.weight", "classifier.0.weight", "classifier.6.weight"),
        _torchvision,
    ),
)


def detect_layout(src: SourceWeights, source: str = "auto") -> Layout:
    """The one layout (of ``source``, or of any with ``auto``) whose keys the file has.

    Raises:
        SourceError: no layout fits, or more than one does (the message names them).
    """
    if source != "auto" and source not in SOURCES:
        raise ParameterError(f"layout must be auto or one of {', '.join(SOURCES)}, got {source!r}", parameter="layout")
    fits = _fitting(src.state, source)
    if len(fits) > 1:
        names = " and ".join(lay.name for lay in fits)
        raise SourceError(f"{src.label}: fits two layouts, {names}; choose one with --from")
    if not fits:
        example = ", ".join(list(src.state)[:3])
        within = "any known layout" if source == "auto" else f"{'an' if source[0] in 'aeiou' else 'a'} {source} layout"
        raise SourceError(f"{src.label}: not {within} (keys begin {example}); see mcloss import --help")
    return fits[0]


def _fitting(state: dict, source: str) -> list[Layout]:
    return [lay for lay in LAYOUTS if source in ("auto", lay.source) and lay.matches(state)]


def unwrap_keys(src: SourceWeights, source: str = "auto", prefix: str | None = None) -> SourceWeights:
    """The source with a wrapper's prefix taken off its keys.

    Without ``prefix``, only a prefix that every key shares, and only where the keys fit a layout without it
    and not with it: a Lightning module's ``model.``, a ``{'net': state_dict, 'acc': …}`` file's ``net.``
    (nested wrappers too, at most :data:`MAX_WRAPPER_DEPTH` segments). No known layout keeps all its
    keys under one name, so a shared first segment is always a wrapper's. Keys beside the model's (an EMA
    copy, a loss's class weights) are never left out unasked: the message names the prefixes whose keys fit,
    to choose with ``prefix``, unless a layer's weights lie beside them (a head of the user's own beside a
    torchvision backbone is not a model mcloss can import, and its backbone's unused fc is not its head).

    With ``prefix`` (``model.``, ``model_ema.``): the keys under it, the rest left out (recorded in
    :attr:`SourceWeights.left_out`, named to the prefix's depth). An ``AveragedModel``'s update count
    (``n_averaged``) is left out either way.

    Raises:
        SourceError: no key under ``prefix``; or nothing fits as saved but the keys under some prefixes do.
    """
    if prefix:
        prefix = _MODULE.sub(r"\1", prefix if prefix.endswith(".") else f"{prefix}.")  # as the keys were read
        chosen = src.under(prefix)
        if not chosen.state:
            firsts = ", ".join(printable(name) for name in _segments(src.state, 1)[:6])
            raise SourceError(f"{src.label}: no key begins {printable(prefix)!r} (the keys' first segments: {firsts})")
        left_out = _segments([k for k in src.state if not k.startswith(prefix)], prefix.count("."))
        src = replace(chosen, left_out=[*src.left_out, *left_out])
    fitting = _prefixes_that_fit(src.state, source, "", 0)  # [""] where the keys fit as saved
    if len(fitting) != 1 or not all(k.startswith(fitting[0]) for k in src.state):
        if fitting and not src.key_prefix:  # a chosen prefix gets the layout's own message
            _suggest_prefixes(src, source, fitting)
        return src
    src = src.under(fitting[0]) if fitting[0] else src
    count = src.state.get(_AVERAGED_COUNT)
    if count is not None and count.numel() == 1:  # an AveragedModel's (EMA, SWA) update count, not a weight
        kept = {k: v for k, v in src.state.items() if k != _AVERAGED_COUNT}
        src = replace(
            src, state=kept, left_out=[*src.left_out, src.key_prefix + _AVERAGED_COUNT], averaged=bool(src.infixed)
        )
    return src


#: The update count that torch.optim.swa_utils.AveragedModel (EMA and SWA weights) keeps beside ``module.``.
_AVERAGED_COUNT = "n_averaged"
#: Deepest wrapper prefix looked for (Lightning's ``model.`` + torch.compile's ``_orig_mod.`` is two).
MAX_WRAPPER_DEPTH = 4


def _segments(keys, depth: int) -> list[str]:
    """The keys' first ``depth`` segments, in order, with a dot where keys go on (``model.head.``, ``n_averaged``)."""
    out = []
    for key in keys:
        parts = key.split(".", depth)
        out.append(".".join(parts[:depth]) + "." if len(parts) > depth else key)
    return list(dict.fromkeys(out))


def _suggest_prefixes(src: SourceWeights, source: str, fitting: list[str]) -> None:
    """Raise, naming them, where the keys under the ``fitting`` prefixes fit a layout though the whole file
    does not and nothing beside them is a layer's weight (only then are they plainly the model, and the rest
    not)."""
    beside = [k for k in src.state if not k.startswith(tuple(fitting))]
    if any(src.state[k].dim() >= 2 for k in beside):  # a head (or another network) beside what fits
        return
    named = " and ".join(repr(printable(f)) for f in fitting[:4])
    depth = max(f.count(".") for f in fitting)
    rest = ", ".join(printable(name) for name in _segments(beside, depth)[:4])
    layout = "no layout" if source == "auto" else f"no {source} layout"
    raise SourceError(
        f"{src.label}: the keys as saved fit {layout}, but those under {named} {'each fit' if len(fitting) > 1 else 'fit'} "
        f"one{f' (beside {rest})' if rest else ''}; choose the model's keys with mcloss import --prefix"
    )


def _prefixes_that_fit(state: dict, source: str, prefix: str, depth: int) -> list[str]:
    """The prefixes (``prefix`` and below, at most :data:`MAX_WRAPPER_DEPTH` segments deep) whose keys fit a
    layout; the shallowest of each branch."""
    if _fitting(state, source):
        return [prefix]
    if depth == MAX_WRAPPER_DEPTH:
        return []
    groups: dict[str, dict] = {}
    for key, value in state.items():
        if "." in key:
            segment, rest = key.split(".", 1)
            groups.setdefault(segment, {})[rest] = value
    return [
        found for segment, sub in groups.items() for found in _prefixes_that_fit(sub, source, f"{prefix}{segment}.", depth + 1)
    ]


# --------------------------------------------------------------------------------------------------- mapping


def _map_keys(src: SourceWeights, plan: Plan, layout: Layout) -> dict[str, torch.Tensor]:
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in src.state.items():
        if key.startswith(plan.dropped):
            continue
        for prefix, target, shift in plan.rules:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                if shift:
                    index, _, tail = rest.partition(".")
                    if not index.isdigit():  # no layer number where the layout has one
                        raise _no_place(src, key, layout)
                    rest = f"{int(index) + shift}.{tail}"
                mapped[target + rest] = tensor
                break
        else:
            raise _no_place(src, key, layout)
    return mapped


def _check_biases(src: SourceWeights) -> None:
    """Every layer's bias as long as its weight's first axis (a file whose head was edited by hand can disagree,
    and the class count read from it would be wrong)."""
    for key, bias in src.state.items():
        weight = src.state.get(key.removesuffix("bias") + "weight") if key.endswith(".bias") else None
        if weight is not None and bias.dim() == 1 and weight.dim() >= 1 and weight.shape[0] != bias.shape[0]:
            raise SourceError(
                f"{src.label}: layer {key.removesuffix('.bias')!r} has a weight of {list(weight.shape)} but a bias of "
                f"{list(bias.shape)}"
            )


def _no_place(src: SourceWeights, key: str, layout: Layout) -> SourceError:
    return SourceError(f"{src.label}: key {key!r} has no place in layout {layout.name}")


def _trunk_width(backbone: str, mapped: dict[str, torch.Tensor], label: str) -> tuple[int, list[str] | None]:
    """K (F's channels) from the trunk's last layer, and the VGG16 convolutions widened to it."""
    if backbone.startswith("vgg16"):
        c43, c53 = (mapped.get(f"features.{vgg16_conv_index(n, backbone == 'vgg16_bn')}.weight") for n in VGG_WIDEN)
        if c43 is None or c53 is None:
            raise SourceError(f"{label}: the VGG16 trunk lacks conv4_3 or conv5_3")
        k = int(c53.shape[0])
        widen = [n for n, conv in (("conv4_3", c43), ("conv5_3", c53)) if int(conv.shape[0]) == k and k != 512]
        return k, widen
    last = "features.7.0.conv3.weight" if "features.7.0.conv3.weight" in mapped else "features.7.0.conv2.weight"
    if last not in mapped:
        raise SourceError(f"{label}: the ResNet trunk lacks {last}")
    return int(mapped[last].shape[0]), None


def _head_spec(mapped: dict[str, torch.Tensor], k: int, plan: Plan, label: str) -> tuple[HeadSpec, int]:
    """The head the mapped keys describe (official BN/Linear/BN/act/Linear, a single Linear, or VGG's MLP), and C."""
    weights = [key for key in mapped if re.fullmatch(r"head\.classifier\.\d+\.weight", key) and mapped[key].dim() == 2]
    linears = sorted(int(key.split(".")[2]) for key in weights)
    if not linears:
        raise SourceError(f"{label}: no head Linear layer found")
    first = mapped[f"head.classifier.{linears[0]}.weight"]
    first_bn = mapped.get("head.classifier.0.running_mean")
    width = int(first_bn.shape[0]) if first_bn is not None else int(first.shape[1])
    cells, rem = divmod(width, k)
    side = math.isqrt(cells)
    if rem or side * side != cells:
        raise SourceError(f"{label}: the head reads {width} inputs, not K = {k} channels × a square grid")
    classes = int(mapped[f"head.classifier.{linears[-1]}.weight"].shape[0])
    if first_bn is not None:  # the official head: BN, Linear→H, BN, activation, Linear
        layers = ("bn", f"linear:{first.shape[0]}", "bn", plan.head_act, "linear")
        return HeadSpec("max", (side, side), layers), classes
    if linears == [0]:
        return HeadSpec(plan.head_pool, (side, side), ("linear",)), classes
    if linears == [0, 3, 6]:  # torchvision's VGG classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        hidden = [mapped[f"head.classifier.{i}.weight"].shape[0] for i in (0, 3)]
        layers = (f"linear:{hidden[0]}", "relu", "dropout", f"linear:{hidden[1]}", "relu", "dropout", "linear")
        return HeadSpec("max", (side, side), layers), classes
    raise SourceError(f"{label}: a head with Linear layers at {linears} is not one mcloss knows")


def _official(size: int) -> tuple[EvalTransform, str]:
    return EvalTransform((size, size), None, *NORMALIZATIONS["half"]), f"resize to {size} × {size}, no crop, mean and std 0.5"


def _official_crop(size: int) -> tuple[EvalTransform, str]:
    side = round(size * 600 / 448)
    return (
        EvalTransform((side, side), (size, size), *NORMALIZATIONS["half"]),
        f"resize to {side} × {side}, centre crop {size}, mean and std 0.5",
    )


def _kurumi_crop(size: int) -> tuple[EvalTransform, str]:
    return (
        EvalTransform((600, 600), (size, size), *NORMALIZATIONS["imagenet"]),
        f"resize to 600 × 600, centre crop {size}, ImageNet mean and std",
    )


def _torchvision_preset(size: int) -> tuple[EvalTransform, str]:
    short = round(size * 256 / 224)
    return (
        EvalTransform(short, (size, size), *NORMALIZATIONS["imagenet"]),
        f"resize the shorter side to {short}, centre crop {size}, ImageNet mean and std",
    )


def _kurumi(size: int) -> tuple[EvalTransform, str]:
    """Kurumi233's dataload.py: at 224 the official transform, at any other size its 600 × 600 + crop."""
    return _official(size) if size == 224 else _kurumi_crop(size)


#: Input transforms by name, each a function of the input side: the official scripts' from scratch (and FGVCLib's),
#: the official ResNet-50's, Kurumi233's (by size, or its crop), torchvision's eval.
TRANSFORM_PRESETS: dict[str, Callable[[int], tuple[EvalTransform, str]]] = {
    "official": _official,
    "official-crop": _official_crop,
    "kurumi": _kurumi,
    "kurumi-crop": _kurumi_crop,
    "torchvision": _torchvision_preset,
}


def _kurumi_setting(src: SourceWeights, setting: str | os.PathLike | None) -> dict[str, str]:
    """Kurumi233's ``setting.txt`` (``k:v`` lines) beside the checkpoint, or the one given."""
    path = Path(setting) if setting else src.path.with_name("setting.txt")
    if not path.is_file():
        if setting:
            raise SourceError(f"{path}: no such setting file")
        return {}
    values = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({first_line(exc)})") from None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def import_model(
    source: str | os.PathLike,
    *,
    classes: Sequence[str] | str | os.PathLike | None = None,
    layout: str = "auto",
    arch: str | None = None,
    img_size: int | None = None,
    setting: str | os.PathLike | None = None,
    preset: str | None = None,
    prefix: str | None = None,
) -> MCModel:
    """Build an MCModel from another project's checkpoint, with the same logits and F as the source model.

    Args:
        source: the file (``.pth``, ``.pt``, ``.ckpt``, ``.bin`` or ``.safetensors``).
        classes: class names in the source's class order (default ``class_000``, …), or where to read them
            (:func:`read_class_list`: a names file, a CUB root or an ImageFolder root).
        layout: ``auto`` or a source (:data:`SOURCES`); ``auto`` recognises the layout from the keys.
        arch: the backbone, checked against the weights (``resnet50``, ``vgg16_bn``, …).
        img_size: the input side (default: the one the source's scripts evaluate at).
        setting: Kurumi233's ``setting.txt`` (default: the one beside the checkpoint).
        preset: the input transform (:data:`TRANSFORM_PRESETS`; default: the one the source's scripts evaluate
            with). A model fine-tuned with other preprocessing than its project's default says so here.
        prefix: read only the keys under this prefix (``model.``, ``model_ema.``), where the file holds more than
            the model (:func:`unwrap_keys`); a prefix every key shares is taken off without it.

    Raises:
        SourceError: the file cannot be read or mapped; ParameterError: a bad argument.
    """
    src = unwrap_keys(read_source(source), layout, prefix)
    lay = detect_layout(src, layout)
    _check_biases(src)
    plan = lay.plan(src, arch)
    mapped = _map_keys(src, plan, lay)
    k, widen = _trunk_width(plan.backbone, mapped, src.label)
    head, num_classes = _head_spec(mapped, k, plan, src.label)
    if setting is not None and lay.source != "kurumi":
        raise ParameterError(f"setting: only Kurumi233 checkpoints come with a setting.txt; {src.label} is {lay.name}", parameter="setting")
    kurumi = _kurumi_setting(src, setting) if lay.source == "kurumi" else {}
    size = _input_size(img_size, kurumi, plan, src, setting)
    baseline = _ce_baseline(lay, plan, k, num_classes, src.label)
    xi, groups = _groups(lay, plan, k, num_classes, src.label, split=baseline)
    if kurumi.get("eps") and xi is not None and kurumi["eps"].isdigit() and int(kurumi["eps"]) != xi:
        raise SourceError(f"{src.label}: setting.txt says eps {kurumi['eps']} but the weights have {xi} channels per class")
    names = _class_names(classes, num_classes, src.label)
    preset = preset or plan.preset
    if preset not in TRANSFORM_PRESETS:
        raise ParameterError(f"preset must be one of {', '.join(TRANSFORM_PRESETS)}, got {preset!r}", parameter="preset")
    def build(side: int) -> tuple[MCModel, str]:
        transform, described = TRANSFORM_PRESETS[preset](side)
        built = _build(
            plan, lay, src, num_classes, xi, class_names=names, img_size=side, transform=transform, head=head,
            vgg_widen=widen,
        )
        return built, described

    model, described = build(size)
    implied = _implied_size(model, head, plan)
    inferred = img_size is None and not kurumi.get("inp_size") and implied not in (None, size)
    if inferred and MIN_IMG_SIZE <= implied <= MAX_IMG_SIZE:  # a lone Kurumi233 ckpt.pth trained at 448 px
        size = implied
        model, described = build(size)
    if model.groups != groups:
        raise SourceError(f"{src.label}: mcloss would split the channels differently from the source")
    origin = "as given" if img_size is not None else "setting.txt's inp_size" if kurumi.get("inp_size") else "the layout's default"
    _check_grid(model, head, plan, src.label, origin, torchvision=lay.source == "torchvision")
    _load_mapped(model, mapped, src, lay)
    model.card = _card(src, lay, plan, f"{preset}: {described}", kurumi)
    model.card["source"]["groups"] = _groups_note(lay, k, num_classes, split=xi is None)
    if baseline:
        model.card["loss"] = "ce"
        model.card["source"]["groups"] += (
            "; the official script's cross-entropy baseline (its VGG16's own 512 channels): no class owned channels in "
            "training, so the split is for display only, as for any CE model"
        )
    if inferred:
        model.card["source"]["input_size"] = f"{size} px, the size its head's fixed {plan.pool_kernel} × {plan.pool_kernel} pool implies"
    assumed = _assumed(lay, plan, k, groups, size, given=img_size is not None or bool(kurumi.get("inp_size")) or inferred)
    if assumed:
        model.card["source"]["assumed"] = assumed
    return model.eval()


#: The class count the official scripts' supervisor is written for: its Mask and groups cover 200 classes whatever
#: ``classes_num`` the head is built with.
OFFICIAL_CLASSES = 200
#: The official scripts' groups: VGG16 and ResNet-18 from scratch, 200 groups of cnum = 3 in 600 channels;
#: MC_ResNet50.py, ``[10] * 152 + [11] * 48`` over 2048.
_OFFICIAL_GROUPS = {"cnum": "200 groups of 3 channels (cnum = 3)", "split": "200 groups ([10] * 152 + [11] * 48)"}


def _official_groups(plan: Plan) -> str:
    return _OFFICIAL_GROUPS["split" if plan.resnet_own_layer4 else "cnum"]


def _assumed(lay: Layout, plan: Plan, k: int, groups: list[int], size: int, *, given: bool) -> list[str]:
    """What the import took on trust because the file cannot tell it, one sentence each (the card's
    ``source.assumed``; ``mcloss import`` and the app show them). An official file of other than 200 classes
    whose F is still the script's width (600 channels; 2048 for the ResNet-50) may come from a script whose
    groups were left as they were (its Mask multiplies exactly that width): its groups are then not one per class."""
    said = []
    script_width = 2048 if plan.resnet_own_layer4 else 600
    if lay.source == "official" and len(groups) != OFFICIAL_CLASSES and k == script_width:
        sizes = sorted(set(groups))
        read = f"{len(groups)} groups of {'/'.join(map(str, sizes))} channels"
        said.append(
            f"the official script trains {_official_groups(plan)} whatever classes_num is; this file has "
            f"{len(groups)} classes, read as {read}, one per class: right only if the script's groups were changed "
            "to match (with classes_num alone changed, its maps and MC head are not these)"
        )
    if lay.source == "kurumi" and not given and plan.pool_kernel is None:
        said.append(
            f"input {size} px: no setting.txt says inp_size, and a ResNet's global pool reads any size; Kurumi233's "
            "README trains ResNet-50 at 448 (its train.py defaults to 224); give --img-size or --setting if yours differs"
        )
    return said


def _ce_baseline(lay: Layout, plan: Plan, k: int, num_classes: int, label: str) -> bool:
    """Whether an official file is its script's cross-entropy baseline: F at the backbone's own 512 channels (the
    scripts say to keep the vanilla width for it), which do not split evenly over the classes (CUB's 200).

    Raises:
        SourceError: the official ResNet-18 script's baseline, whose layer4 it keeps at stride 1, which mcloss
            does not build for a split of a ResNet's own channels.
    """
    # the ResNet-50 script's MC model splits its own 2048 channels: never a baseline
    if lay.source != "official" or plan.resnet_own_layer4 or k != _native_width(plan.backbone) or k % num_classes == 0:
        return False
    if plan.backbone.startswith("resnet") and not plan.own_layer4:
        raise SourceError(
            f"{label}: {k} channels over {num_classes} classes, an official script's cross-entropy baseline on "
            f"{plan.backbone} (layer4 at its own {k} planes but stride 1); mcloss splits a ResNet's own channels only at its own "
            "stride 2, which would read other features, so it does not import it"
        )
    return True


def _groups(lay: Layout, plan: Plan, k: int, num_classes: int, label: str, *, split: bool = False) -> tuple[int | None, list[int]]:
    """ξ (None for a split of the backbone's own channels) and the group sizes: the official consecutive groups
    of ξ = K / C, or K split over C as the official ResNet-50 splits its 2048 (torchvision CE models and the
    official scripts' CE baselines, ``split``, too)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise SourceError(f"{label}: {num_classes} classes, outside the 1..{MAX_CLASSES} mcloss takes")
    native = plan.resnet_own_layer4 and k == _native_width(plan.backbone)
    if lay.source == "torchvision" or native or split:
        if k < num_classes:
            raise SourceError(f"{label}: {k} channels cannot give each of {num_classes} classes a group")
        return None, split_channels(k, num_classes)
    if k % num_classes:
        lazy = ""
        if lay.source == "official" and num_classes < OFFICIAL_CLASSES and k == 600:
            lazy = (
                f" (an official script run with only classes_num changed trains {_official_groups(plan)} and leaves "
                f"{OFFICIAL_CLASSES - num_classes} of them to no class, which mcloss does not read)"
            )
        raise SourceError(f"{label}: {k} channels do not split into {num_classes} equal class groups{lazy}")
    return k // num_classes, [k // num_classes] * num_classes


def _groups_note(lay: Layout, k: int, num_classes: int, *, split: bool) -> str:
    """How the class groups were found, for the card."""
    if not split:
        return f"{k} channels in {num_classes} groups of {k // num_classes}, consecutive (class c owns [ξc, ξc + ξ))"
    note = f"{k} channels split over {num_classes} classes as the official code splits them (the larger groups last)"
    if lay.source == "kurumi":
        note += (
            "; assumed: Kurumi233's train.py keeps cnums and cgroups as constants, not in setting.txt, and its README "
            "trains ResNet-50 with cnums [10, 11] over cgroups [152, 48], this split"
        )
    return note


def _native_width(backbone: str) -> int:
    return 512 if backbone in ("resnet18", "resnet34") or backbone.startswith("vgg") else 2048


def _class_names(classes: Sequence[str] | str | os.PathLike | None, num_classes: int, label: str) -> list[str] | None:
    if classes is None:
        return None
    names = read_class_list(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
    if len(names) != num_classes:
        raise SourceError(f"{label}: the weights have {num_classes} classes but {len(names)} class names were given")
    return names


def _build(plan: Plan, lay: Layout, src: SourceWeights, num_classes: int, xi: int | None, **options) -> MCModel:
    try:
        return build_model(plan.backbone, num_classes, xi=xi, **options)
    except ParameterError as exc:
        raise SourceError(f"{src.label}: cannot build the {lay.name} model ({exc})") from None


def _check_grid(model: MCModel, head: HeadSpec, plan: Plan, label: str, origin: str, *, torchvision: bool = False) -> None:
    """A source whose head max-pools with a fixed kernel reads the same cells as mcloss's adaptive pool only when
    F is exactly kernel × grid (the source's own input size); refuse any other size rather than differ.
    ``origin``: where the input size came from, for the message. ``torchvision``: torchvision's VGG, which runs at
    any size (an adaptive average to 7 × 7 after its last max-pool) but is the head mcloss builds only at 224 px."""
    fh, fw = model.config["feature_hw"]
    k = plan.pool_kernel
    if k and torchvision and (fh, fw) != (k * head.grid[0], k * head.grid[1]):
        raise SourceError(
            f"{label}: at {model.config['img_size']} px ({origin}) torchvision's VGG pools its max-pooled "
            f"{fh // k} × {fw // k} cells adaptively to {head.grid[0]} × {head.grid[1]}, a head mcloss does not build; mcloss "
            f"reads a torchvision VGG16 at 224 px (img_size 224), where that average changes nothing"
        )
    if k and (fh, fw) != (k * head.grid[0], k * head.grid[1]):
        size = model.config["img_size"]
        implied = _implied_size(model, head, plan)
        hint = f" (img_size {implied})" if implied else ""
        raise SourceError(
            f"{label}: at {size} px ({origin}) F is {fh} × {fw}, but the source's head max-pools "
            f"{k} × {k} cells into a {head.grid[0]} × {head.grid[1]} grid, which needs F of {k * head.grid[0]} × "
            f"{k * head.grid[1]}; import at the source's input size{hint}"
        )


def _implied_size(model: MCModel, head: HeadSpec, plan: Plan) -> int | None:
    """The input side at which F is exactly the source head's fixed pool kernel × its grid (the size the source
    was trained at), from the stride ``model`` shows at its own size; None without a fixed pool."""
    k, size = plan.pool_kernel, model.config["img_size"]
    fh, fw = model.config["feature_hw"]
    if not k or size % fh or size % fw:
        return None
    sides = {k * head.grid[0] * (size // fh), k * head.grid[1] * (size // fw)}
    return sides.pop() if len(sides) == 1 else None


def _input_size(img_size: int | None, setting: dict[str, str], plan: Plan, src: SourceWeights, path) -> int:
    """The input side: given, else Kurumi233's ``inp_size``, else the layout's; within mcloss's bounds."""
    if img_size is None and setting.get("inp_size"):
        value = setting["inp_size"]
        if not value.isdigit() or not MIN_IMG_SIZE <= int(value) <= MAX_IMG_SIZE:
            where = path or src.path.with_name("setting.txt")
            raise SourceError(f"{where}: inp_size must be an integer in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}, got {value!r}")
        img_size = int(value)
    size = plan.default_size if img_size is None else int(img_size)
    if not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        raise ParameterError(f"img_size must be in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}, got {size}", parameter="img_size")
    return size


def _load_mapped(model: MCModel, mapped: dict[str, torch.Tensor], src: SourceWeights, lay: Layout) -> None:
    own = model.state_dict()
    unexpected = [k for k in mapped if k not in own]
    if unexpected:
        raise SourceError(f"{src.label}: {len(unexpected)} tensors have no place in the {lay.name} model (e.g. {unexpected[0]})")
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise SourceError(f"{src.label}: {len(missing)} tensors of the {lay.name} model are missing (e.g. {missing[0]})")
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise SourceError(f"{src.label}: tensor for {key} has shape {tuple(tensor.shape)}, the model needs {tuple(own[key].shape)}")
    state = {k: v.to(own[k].dtype) for k, v in mapped.items()}
    state |= {k: own[k] for k in own if k not in state}  # num_batches_tracked of files saved before it existed
    model.load_state_dict(state)


def _card(src: SourceWeights, lay: Layout, plan: Plan, preset: str, setting: dict[str, str]) -> dict:
    rules = [[p, t] if not s else [f"{p}<i>", f"{t}<i+{s}>"] for p, t, s in plan.rules]
    card = {
        "imported": True,
        "training": None,
        "loss": "ce" if lay.source == "torchvision" else "mc",
        "source": {
            "format": lay.source,
            "layout": lay.name,
            "description": lay.description,
            "file": src.path.name,
            "sha256": src.sha256,
            "data_parallel_keys": src.module_infix,
            "averaged_model": src.averaged,
            "key_prefix": src.key_prefix,
            "left_out": src.left_out,
            "key_mapping": rules,
            "dropped": list(plan.dropped),
            "extras": src.extras,
        },
        "transform_preset": preset,
    }
    if setting:
        card["source"]["setting"] = setting
    return card


# ----------------------------------------------------------------------------------------------- class names


#: Largest class-names file read.
MAX_NAMES_BYTES = 16 << 20


def read_class_list(spec: str | os.PathLike) -> list[str]:
    """Class names in a source's class order, from a text file (one per line), a CUB root (``classes.txt``), or
    an ImageFolder root (its sorted sub-folder names, the order torchvision's ImageFolder and the official
    scripts use; a numeric ``001.`` prefix is dropped from the shown name, not from the order).

    Raises:
        SourceError: missing, empty, duplicate or unreadable names.
    """
    path = Path(spec)
    label = str(spec)
    if path.is_dir():
        cub = find_cub_root(path)
        if cub is not None or (path / "classes.txt").is_file():
            names = read_class_names(cub or path)
        else:
            folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))
            names = [clean_class_name(n) for n in folders]
    elif path.exists():  # a file, or a pipe (``--classes <(cut -d' ' -f2 classes.txt)``)
        try:
            with path.open("rb") as f:
                data = f.read(MAX_NAMES_BYTES + 1)
        except OSError as exc:
            raise SourceError(f"{label}: cannot read the class names ({first_line(exc)})") from None
        if len(data) > MAX_NAMES_BYTES:
            raise SourceError(f"{label}: more than {MAX_NAMES_BYTES >> 20} MiB, not a list of class names")
        return parse_class_names(data, label)
    else:
        raise SourceError(f"{label}: no such class-names file or folder")
    return _checked_names(names, label)


def parse_class_names(data: bytes, label: str) -> list[str]:
    """Class names from the bytes of a text file, one per line (blank lines skipped; a byte-order mark, as
    Notepad and Excel write, dropped). A file of ``<id> <name>`` lines numbered 1, 2, … (or 0, 1, …) in order,
    as CUB's ``classes.txt``, gives the names, their ``001.`` prefix dropped as the CUB reader drops it.

    Raises:
        SourceError: not UTF-8, no names, or a name twice; the message names ``label``.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"{label}: not a UTF-8 text file of class names") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [line.split(maxsplit=1) for line in lines]
    if all(len(row) == 2 and row[0].isdigit() for row in rows) and rows:
        ids = [int(row[0]) for row in rows]
        if ids in (list(range(1, len(ids) + 1)), list(range(len(ids)))):
            lines = [clean_class_name(name) for _, name in rows]
    return _checked_names(lines, label)


def _checked_names(names: list[str], label: str) -> list[str]:
    if not names:
        raise SourceError(f"{label}: no class names found")
    try:
        return check_class_names(names)
    except ParameterError as exc:
        raise SourceError(f"{label}: {str(exc).removeprefix('class_names: ')}") from None


def import_checkpoint(source: str | os.PathLike, out: str | os.PathLike, **options) -> MCModel:
    """:func:`import_model`, then write the model as an ordinary mcloss checkpoint at ``out`` (atomically).

    Raises:
        SourceError, ParameterError: as :func:`import_model`; ParameterError: ``out`` is not ``*.safetensors``
            or is the source itself.
    """
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise ParameterError(f"out must be a .safetensors file, got {out}", parameter="out")
    if out_path.exists() and out_path.resolve() == Path(source).resolve():
        raise ParameterError(f"out {out} is the source file itself", parameter="out")
    from mcloss.core.checkpoint import save_checkpoint

    model = import_model(source, **options)
    save_checkpoint(model, out_path)
    return model
