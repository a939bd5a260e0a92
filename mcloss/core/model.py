"""MCModel: a torchvision backbone whose last feature map F carries one channel group per class."""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from mcloss.core.domain import DomainCheck
from mcloss.core.errors import OutOfRangeError, ParameterError, UnknownClassError
from mcloss.core.groups import normalize_groups, split_channels
from mcloss.core.loss import ccmp, top_share_mean
from mcloss.core.transforms import EvalTransform

__all__ = [
    "MCModel",
    "FCHead",
    "Head",
    "HeadSpec",
    "OFFICIAL_HEAD_LAYERS",
    "VGG_WIDEN",
    "vgg16_conv_index",
    "build_model",
    "check_class_names",
    "clean_class_name",
    "same_class_name",
    "same_class_names",
    "load_backbone_weights",
    "model_guard",
    "ModelConfig",
]

ModelConfig = dict[str, Any]

#: Largest default side of the FC head's max-pool grid.
HEAD_GRID_MAX = 14


#: The official prediction head's layers (see :class:`HeadSpec`).
OFFICIAL_HEAD_LAYERS = ("bn", "linear:512", "bn", "elu", "linear")
#: The activations and other width-keeping layers a head may name.
_HEAD_ACTIVATIONS = {"elu": lambda: nn.ELU(inplace=True), "relu": lambda: nn.ReLU(inplace=True), "dropout": nn.Dropout}
#: Bounds on a head's description, checked before anything is built.
MAX_HEAD_LAYERS, MAX_HEAD_WIDTH = 16, 65536


@dataclass(frozen=True)
class HeadSpec:
    """A prediction head on F: a max or average pool to a grid, flattened, then a stack of layers.

    Attributes:
        pool: "max" (the official head's 2 × 2 max-pool, as an adaptive max-pool to ``grid``) or "avg"
            (torchvision's global average pool, ``grid`` (1, 1)).
        grid: (h, w) of the pooled map.
        layers: tokens, in order: "bn" (BatchNorm1d of the current width), "linear:N" (Linear to N),
            "elu", "relu", "dropout", and a last "linear" to the class count. The official head is
            :data:`OFFICIAL_HEAD_LAYERS`; a torchvision ResNet's is ("linear",).
    """

    pool: str = "max"
    grid: tuple[int, int] = (7, 7)
    layers: tuple[str, ...] = OFFICIAL_HEAD_LAYERS

    def __post_init__(self) -> None:
        if self.pool not in ("max", "avg"):
            raise ParameterError(f"head pool must be max or avg, got {self.pool!r}", parameter="head")
        if len(self.grid) != 2 or not all(type(g) is int and 1 <= g <= 64 for g in self.grid):
            raise ParameterError(f"head grid must be two integers in 1..64, got {self.grid!r}", parameter="head")
        layers = list(self.layers)
        if not 1 <= len(layers) <= MAX_HEAD_LAYERS or layers[-1] != "linear":
            raise ParameterError(
                f"head layers must be 1..{MAX_HEAD_LAYERS} tokens ending in 'linear', got {layers!r}", parameter="head"
            )
        for token in layers[:-1]:
            if token not in ("bn", *_HEAD_ACTIVATIONS) and _linear_width(token) is None:
                raise ParameterError(f"unknown head layer {token!r}", parameter="head")

    def to_dict(self) -> dict:
        return {"pool": self.pool, "grid": list(self.grid), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> HeadSpec:
        if not isinstance(d, dict) or not isinstance(d.get("grid"), list) or not isinstance(d.get("layers"), list):
            raise ParameterError(f"head must be an object with pool, grid and layers, got {d!r}", parameter="head")
        return cls(str(d.get("pool")), tuple(d["grid"]), tuple(str(t) for t in d["layers"]))

    def tensor_shapes(self, channels: int, num_classes: int) -> dict[str, list[int]]:
        """Every tensor of the head's state dict (keys below ``head.``) with its shape, without building it."""
        width = channels * self.grid[0] * self.grid[1]
        shapes: dict[str, list[int]] = {}
        for i, token in enumerate(self.layers):
            if token == "bn":
                shapes |= {f"classifier.{i}.{k}": [width] for k in ("weight", "bias", "running_mean", "running_var")}
                shapes[f"classifier.{i}.num_batches_tracked"] = []
            elif token.startswith("linear"):
                out = num_classes if i == len(self.layers) - 1 else _linear_width(token)
                shapes |= {f"classifier.{i}.weight": [out, width], f"classifier.{i}.bias": [out]}
                width = out
        return shapes


def _linear_width(token: str) -> int | None:
    """N of a "linear:N" token (None for anything else, or N out of bounds)."""
    name, _, width = token.partition(":")
    if name != "linear" or not width.isdigit() or not 1 <= int(width) <= MAX_HEAD_WIDTH:
        return None
    return int(width)


class Head(nn.Module):
    """A prediction head built from a :class:`HeadSpec`; its state-dict keys are ``classifier.<i>.*``."""

    def __init__(self, channels: int, num_classes: int, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        self.pool = (nn.AdaptiveMaxPool2d if spec.pool == "max" else nn.AdaptiveAvgPool2d)(spec.grid)
        width = channels * spec.grid[0] * spec.grid[1]
        layers: list[nn.Module] = []
        for i, token in enumerate(spec.layers):
            if token == "bn":
                layers.append(nn.BatchNorm1d(width))
            elif token.startswith("linear"):
                out = num_classes if i == len(spec.layers) - 1 else _linear_width(token)
                layers.append(nn.Linear(width, out))
                width = out
            else:
                layers.append(_HEAD_ACTIVATIONS[token]())
        self.classifier = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(features), 1))


class FCHead(Head):
    """The official prediction head: max-pool to a grid, BN, Linear→512, BN, ELU, Linear→classes."""

    def __init__(self, channels: int, num_classes: int, grid: Sequence[int], hidden: int = 512) -> None:
        layers = ("bn", f"linear:{hidden}", "bn", "elu", "linear")
        super().__init__(channels, num_classes, HeadSpec("max", (int(grid[0]), int(grid[1])), layers))


#: Characters a class name may not hold: C0/C1 controls, and the bidirectional overrides and isolates that make
#: text display in another order than it reads.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def clean_class_name(name: str) -> str:
    """``001.Black_footed_Albatross`` → ``Black_footed_Albatross``: CUB's and many ImageFolder trees' numeric
    prefix dropped (names without one stay, stripped; a name that is a number, ``1.5``, stays whole)."""
    return re.sub(r"^\d+\.(?![\d.]*$)", "", name.strip())


def same_class_name(a: str, b: str) -> bool:
    """Whether two names name the same class, a numeric ``001.`` prefix aside (an ImageFolder tree keeps it in its
    folder names; mcloss's CUB reader and ``mcloss import`` drop it)."""
    return a == b or clean_class_name(a) == clean_class_name(b)


def same_class_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists name the same classes in the same order (:func:`same_class_name`)."""
    return len(a) == len(b) and all(same_class_name(x, y) for x, y in zip(a, b, strict=True))


def check_class_names(names: Sequence[str]) -> list[str]:
    """The class names as a list, checked: non-empty strings without control characters, each once.

    Names are data from files (a checkpoint's metadata, a names file): shown as text, used in file names.

    Raises:
        ParameterError: a name that is not a string, is empty, holds a control character, or appears twice (also
            as ``001.Crow`` and ``002.Crow``, which :func:`same_class_name` would take for one class).
    """
    out = list(names)
    seen: dict[str, int] = {}  # clean name -> the index of the name it came from
    for i, name in enumerate(out):
        if not isinstance(name, str) or not name.strip():
            raise ParameterError(f"class_names: name {i} must be a non-empty string, got {name!r}", parameter="class_names")
        bad = next((c for c in name if unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS), None)
        if bad is not None:
            raise ParameterError(f"class_names: name {i} {name!r} holds the control character U+{ord(bad):04X}", parameter="class_names")
        first = seen.setdefault(clean_class_name(name), i)
        if first != i and out[first] == name:
            raise ParameterError(f"class_names: {name!r} appears twice", parameter="class_names")
        if first != i:  # names are matched with the prefix aside
            raise ParameterError(
                f"class_names: {out[first]!r} and {name!r} are the same name (a numeric prefix and spaces aside)",
                parameter="class_names",
            )
    return out


class _Features(nn.Sequential):
    """The backbone trunk; its output is F (this module is ``MCModel.feature_layer``)."""


class MCModel(nn.Module):
    """A classifier with class-aligned channel groups.

    Attributes:
        features: the trunk producing F [B, K, h, w] (also exposed as ``feature_layer``).
        head: the official FC head (mixes every channel).
        groups: channels per class, consecutive.
        class_names: one name per class (0-based).
        transform: the eval transform (PIL RGB image → normalized tensor).
        card: provenance and metrics.
        config: everything needed to rebuild the architecture (stored in checkpoints).
        domain: the domain check (:class:`mcloss.core.domain.DomainCheck`), or None when the model has none.
    """

    def __init__(
        self,
        features: nn.Module,
        head: nn.Module,
        groups: Sequence[int],
        class_names: Sequence[str],
        transform: EvalTransform,
        config: ModelConfig,
        card: dict | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.groups = list(groups)
        if len(class_names) != len(self.groups):
            raise ParameterError(f"{len(class_names)} class names for {len(self.groups)} channel groups")
        self.class_names = check_class_names(class_names)
        self.transform = transform
        self.config = dict(config)
        self.card = dict(card or {})
        self.domain: DomainCheck | None = None

    def set_domain(self, check: DomainCheck | None) -> None:
        """Attach (or, with None, remove) the domain check; its config goes into ``config["domain"]``."""
        self.domain = check
        if check is None:
            self.config.pop("domain", None)
        else:
            self.config["domain"] = check.config()

    @property
    def feature_layer(self) -> nn.Module:
        """The module whose output is F."""
        return self.features

    @property
    def num_classes(self) -> int:
        return len(self.groups)

    @property
    def num_channels(self) -> int:
        return sum(self.groups)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """F [B, K, h, w], after the last ReLU.

        A batch runs in the channels-last memory format, on CPUs as on GPUs: every convolutional backbone
        measured runs faster in it (fp32 on a 2-core CPU: ResNet-18 1.25-1.75x, ResNet-50 1.7x, VGG16 2.1x;
        BENCHMARKS.md). The values are the same up to float rounding.
        """
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(x)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the official FC head from F."""
        return self.head(features)

    @property
    def mc_pool_share(self) -> float:
        """The share of positions the MC head averages: 1 is the official global average pooling; a model
        trained with ``--dis-topk s`` reads its classes as its L_dis did, by the mean of the top s."""
        return float(self.config.get("mc_pool_share", 1.0))

    def mc_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class-aligned logits: CCMP over each group (unmasked F), then the pool L_dis was trained with:
        global average pooling (the official), or the mean of the top ``mc_pool_share`` of the positions."""
        return top_share_mean(ccmp(features, self.groups).flatten(2), self.mc_pool_share)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the official FC head."""
        return self.head(self.forward_features(x))

    def group_slice(self, cls: int) -> slice:
        """The channel slice of class ``cls``."""
        if not 0 <= cls < self.num_classes:
            raise OutOfRangeError(f"class index {cls} out of range [0, {self.num_classes})")
        start = sum(self.groups[:cls])
        return slice(start, start + self.groups[cls])

    def class_index(self, cls: int | str, parameter: str | None = None) -> int:
        """Resolve a class given by 0-based index, numeric string or name.

        Raises:
            UnknownClassError, OutOfRangeError: no such class; with ``parameter`` (the argument that gave
                ``cls``), the error names it: ``target: unknown class 'X'``.
        """
        try:
            if isinstance(cls, int):
                self.group_slice(cls)
                return cls
            if cls in self.class_names:
                return self.class_names.index(cls)
            if cls.strip().lstrip("-").isdigit():
                return self.class_index(int(cls))
            bare = [i for i, name in enumerate(self.class_names) if same_class_name(name, cls)]
            if len(bare) == 1:  # "001.Black_footed_Albatross" for "Black_footed_Albatross", or the other way
                return bare[0]
            raise UnknownClassError(f"unknown class {cls!r}")
        except (UnknownClassError, OutOfRangeError) as exc:
            if parameter is None:
                raise
            raise type(exc)(f"{parameter}: {exc}", parameter=parameter) from None


@contextlib.contextmanager
def model_guard(model: nn.Module, *, eval_mode: bool = True, freeze: bool = False) -> Iterator[None]:
    """Run a block in eval mode (and, with ``freeze``, with every parameter's ``requires_grad`` off); restore
    each module's mode and each parameter's flag afterwards, also when the block raises.

    A model whose modules are all in eval mode already is left as it is: ``model.eval()`` is not called, so a
    module's own ``train()`` override does not run (it would have nothing to switch).

    Hooks are not this guard's business: the code that adds one removes it in its own ``finally``
    (Captum does; mcloss itself adds none).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        # each step only where something changes: nn.Module's setattr is slow, and on a GPU this guard's cost
        # is the host's, once per batch
        if eval_mode and any(mode for _, mode in modes):
            model.eval()
        if freeze:
            for p, flag in flags:
                if flag:
                    p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------- builders


def _resnet_stage(block: type[nn.Module], inplanes: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage whose output has ``width`` channels."""
    expansion = block.expansion
    planes = width // expansion
    if planes * expansion != width:
        raise ParameterError(f"{block.__name__} stage width {width} is not a multiple of {expansion}")
    downsample = None
    if stride != 1 or inplanes != width:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(width, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _resnet_trunk(net: tv_resnet.ResNet, last: nn.Module, last_stage: int = 4) -> _Features:
    """The stem, the native stages before ``last_stage``, then ``last`` in its place (later stages dropped)."""
    native = [getattr(net, f"layer{i}") for i in range(1, last_stage)]
    return _Features(net.conv1, net.bn1, net.relu, net.maxpool, *native, last)


#: The VGG16 convolutions the official code widens to K; an earlier official script and Kurumi233's widen only conv5_3.
VGG_WIDEN = ("conv4_3", "conv5_3")
#: Position of each widenable convolution among VGG16's 13.
_VGG16_CONVS = {"conv4_3": 9, "conv5_3": 12}
#: VGG16's configuration ("D"): convolution widths and "M" for the 2 × 2 max-pools.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_conv_index(name: str, batch_norm: bool) -> int:
    """The index in torchvision's VGG16 ``features`` of a widenable convolution (``conv4_3``, ``conv5_3``)."""
    position, index = _VGG16_CONVS[name], 0
    for item in _VGG16_CFG:
        if item != "M":
            if position == 0:
                return index
            position -= 1
        index += 1 if item == "M" else (3 if batch_norm else 2)
    raise ParameterError(f"VGG16 has no convolution {name!r}", parameter="vgg_widen")


def _vgg_trunk(net: nn.Module, channels: int, widen: Sequence[str]) -> _Features:
    """VGG16's features without the last pool, each of ``widen`` (conv4_3, conv5_3) widened to K channels with its
    BatchNorm (when the net has BN) and the convolution that reads it (the official layout widens both)."""
    layers = list(net.features.children())[:-1]
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    for name in widen:
        pos = _VGG16_CONVS[name]
        idx = convs[pos]
        layers[idx] = nn.Conv2d(layers[idx].in_channels, channels, 3, padding=1)
        if isinstance(layers[idx + 1], nn.BatchNorm2d):
            layers[idx + 1] = nn.BatchNorm2d(channels)
        if pos + 1 < len(convs):
            reader = convs[pos + 1]
            layers[reader] = nn.Conv2d(channels, layers[reader].out_channels, 3, padding=1)
    for i in range(len(layers)):
        if isinstance(layers[i], nn.ReLU):
            layers[i] = nn.ReLU(inplace=False) if i == len(layers) - 1 else nn.ReLU(inplace=True)
    return _Features(*layers)


def _generic_trunk(net: nn.Module) -> nn.Module:
    """The part of a torchvision classifier that produces its last spatial feature map."""
    if hasattr(net, "features") and isinstance(net.features, nn.Module):
        return net.features
    children = list(net.named_children())
    cut = next((i for i, (name, _) in enumerate(children) if name in ("avgpool", "fc", "classifier", "head")), None)
    if cut is None or cut == 0:
        raise ParameterError(f"cannot find the last feature map of {type(net).__name__}", parameter="backbone")
    return nn.Sequential(*[m for _, m in children[:cut]])


def load_backbone_weights(name: str, pretrained: str | None) -> nn.Module:
    """Build a torchvision classifier, with weights by torchvision enum name or from a local file.

    Raises:
        ParameterError: an unknown backbone or weights name, a missing weights file, weights not at hand.
    """
    if name not in torchvision.models.list_models():
        raise ParameterError(f"backbone: unknown torchvision model {name!r}", parameter="backbone")
    if pretrained is None or pretrained.lower() in ("", "none"):
        return torchvision.models.get_model(name, weights=None)
    path = Path(pretrained)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        if not path.is_file():
            raise ParameterError(f"{pretrained}: weights file not found", parameter="pretrained")
        net = torchvision.models.get_model(name, weights=None)
        _load_weights_file(net, path, name)
        return net
    try:
        weights = torchvision.models.get_model_weights(name)[pretrained]
    except (KeyError, ValueError) as exc:
        raise ParameterError(f"unknown weights {pretrained!r} for {name}", parameter="pretrained") from exc
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as exc:
        raise ParameterError(
            f"cannot fetch {name} weights {pretrained} (offline?): {exc.__class__.__name__}; "
            "download them elsewhere and pass their file instead (/path/to/weights.pth)",
            parameter="pretrained",
        ) from exc


#: Parameter-name prefixes of torchvision classifier heads; MCModel replaces the head, so these may differ.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")


def _load_weights_file(net: nn.Module, path: Path, name: str) -> None:
    """Load a local state dict (safetensors, or .pth read with ``weights_only=True``) into ``net``.

    Every trunk tensor must be present with its shape; the classifier head may differ or be absent.

    Raises:
        ParameterError: the file cannot be read or does not hold ``name`` weights (message names the file).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file, or a pickle with code (refused by weights_only)
        kind = "safetensors" if path.suffix == ".safetensors" else "weights-only PyTorch"
        raise ParameterError(f"{path}: not a readable {kind} weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ParameterError(f"{path}: not a state dict of tensors")
    own = net.state_dict()
    trunk = [k for k in own if not k.startswith(_CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")]
    missing = [k for k in trunk if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(_CLASSIFIER_PREFIXES)]
    misshaped = [k for k in trunk if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        example = (missing or unexpected or misshaped)[0]
        raise ParameterError(
            f"{path}: not {name} weights ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped tensors; e.g. {example!r})"
        )
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    net.load_state_dict(usable, strict=False)


def build_model(
    backbone: str,
    num_classes: int,
    *,
    xi: int | None = 3,
    class_names: Sequence[str] | None = None,
    img_size: int = 224,
    pretrained: str | None = None,
    transform: EvalTransform | None = None,
    head_grid: Sequence[int] | None = None,
    card: dict | None = None,
    last_stage: int | None = None,
    mc_pool_share: float = 1.0,
    head: HeadSpec | None = None,
    vgg_widen: Sequence[str] | None = None,
) -> MCModel:
    """Build an MCModel.

    Args:
        backbone: vgg16, resnet18/34 (layer4 widened to K, stride 1), resnet50 (from scratch: layer4 to K
            planes, stride 1; pretrained: its own 2048 channels with the official uneven split), or any
            torchvision classifier name (its last feature map, then a 1×1 conv + ReLU to K).
        num_classes: C.
        xi: channels per class; None splits the backbone's native width (K = 2048 for resnet50) unevenly.
        class_names: names (default "class_000", ...).
        img_size: input side, used to size the head's pooling grid.
        pretrained: torchvision weights name (e.g. IMAGENET1K_V1) or a local weights file.
        transform: eval transform (default: the official scratch transform at ``img_size``).
        head_grid: the FC head's max-pool grid (default: half the feature map, like the official 14→7, at
            most :data:`HEAD_GRID_MAX` a side so that fine maps do not blow up the head's Linear layer).
        card: provenance and metrics.
        last_stage: ResNets only: the stage (2, 3 or 4, default 4 as in the official code) that is widened
            to K at stride 1 and gives F; later stages are dropped. An earlier stage gives finer maps from
            a smaller receptive field (resnet18 at 224 px: stage 4 → 14 × 14, stage 3 → 28 × 28, 2 → 56 × 56).
        mc_pool_share: the MC head's pool (:attr:`MCModel.mc_pool_share`): 1 is the official global average;
            a model trained with ``--dis-topk s`` gets s, the pool its L_dis scored classes by.
        head: the prediction head (default: the official FC head at ``head_grid``); an imported torchvision
            classifier keeps its own (global average pool + Linear).
        vgg_widen: VGG16 only: the convolutions widened to K (default :data:`VGG_WIDEN` with a fixed ``xi``,
            none when the backbone's own channels are split).
    """
    if not 0 < mc_pool_share <= 1:
        raise ParameterError(f"mc_pool_share must be in (0, 1], got {mc_pool_share}", parameter="mc_pool_share")
    name = backbone.lower()
    net = load_backbone_weights(name, pretrained)
    stage_index = 4 if last_stage is None else int(last_stage)
    if stage_index != 4 and (not isinstance(net, tv_resnet.ResNet) or xi is None or stage_index not in (2, 3)):
        raise ParameterError(
            f"last_stage {last_stage} needs a ResNet with a fixed xi and a stage of 2, 3 or 4", parameter=("last_stage", "xi")
        )
    if xi is None:
        sizes = split_channels(_probe_channels(_native_trunk(net), img_size), num_classes)
    else:
        sizes = normalize_groups(int(xi), int(xi) * num_classes)
    k = sum(sizes)
    widen = _check_widen(name, vgg_widen, fixed_xi=xi is not None)
    trunk = _trunk(net, name, k, fixed_xi=xi is not None, stage_index=stage_index, img_size=img_size, widen=widen)
    _, width, fh, fw = _probe(trunk, img_size)
    if width != k:
        raise ParameterError(f"{name} gives F with {width} channels, not the {k} of the groups", parameter=("xi", "vgg_widen"))
    if head is None:
        grid = tuple(head_grid) if head_grid else (min(HEAD_GRID_MAX, max(1, fh // 2)), min(HEAD_GRID_MAX, max(1, fw // 2)))
        head = HeadSpec("max", (int(grid[0]), int(grid[1])))
    elif head_grid and tuple(head_grid) != head.grid:
        raise ParameterError(f"head_grid {list(head_grid)} disagrees with the head's grid {list(head.grid)}", parameter="head_grid")
    grid = head.grid
    names = list(class_names) if class_names is not None else [f"class_{i:03d}" for i in range(len(sizes))]
    config: ModelConfig = {
        "backbone": name,
        "num_classes": len(sizes),
        "xi": xi,
        "groups": sizes,
        "img_size": img_size,
        "head_grid": list(grid),
        "feature_hw": [fh, fw],
        "pretrained": pretrained,
        "last_stage": stage_index,
        "mc_pool_share": float(mc_pool_share),
        "head": head.to_dict(),
    }
    if widen is not None:
        config["vgg_widen"] = list(widen)
    tf = transform or EvalTransform.for_recipe("official-scratch", img_size)
    return MCModel(trunk, Head(k, len(sizes), head), sizes, names, tf, config, card)


def _check_widen(name: str, widen: Sequence[str] | None, *, fixed_xi: bool) -> tuple[str, ...] | None:
    """The VGG16 convolutions to widen (None for other backbones)."""
    if not name.startswith("vgg16"):
        if widen:
            raise ParameterError(f"vgg_widen applies to VGG16 only, not {name}", parameter="vgg_widen")
        return None
    if widen is None:
        return VGG_WIDEN if fixed_xi else ()
    unknown = [w for w in widen if w not in _VGG16_CONVS]
    if unknown or len(set(widen)) != len(widen):
        raise ParameterError(f"vgg_widen takes distinct names among {list(_VGG16_CONVS)}, got {list(widen)}", parameter="vgg_widen")
    return tuple(w for w in VGG_WIDEN if w in widen)


def _trunk(
    net: nn.Module, name: str, k: int, *, fixed_xi: bool, stage_index: int, img_size: int, widen: Sequence[str] | None
) -> nn.Module:
    """The part of ``net`` that gives F with ``k`` channels: VGG16 and ResNets widened as the official code does
    (a ResNet with an uneven split keeps its own layer4), any other classifier's last map (+ a 1×1 conv to K)."""
    if name.startswith("vgg16"):
        return _vgg_trunk(net, k, widen or ())
    if isinstance(net, tv_resnet.ResNet):
        if not fixed_xi:
            return _resnet_trunk(net, net.layer4)
        stage = getattr(net, f"layer{stage_index}")
        inplanes = stage[0].conv1.in_channels
        widened = _resnet_stage(type(stage[0]), inplanes, k, len(stage), stride=1)
        return _resnet_trunk(net, widened, stage_index)
    if not fixed_xi:
        return _Features(_generic_trunk(net))
    base = _generic_trunk(net)
    return _Features(base, nn.Conv2d(_probe_channels(base, img_size), k, kernel_size=1), nn.ReLU())


def _native_trunk(net: nn.Module) -> nn.Module:
    if isinstance(net, tv_resnet.ResNet):
        return _resnet_trunk(net, net.layer4)
    return _generic_trunk(net)


@torch.no_grad()
def _probe(module: nn.Module, img_size: int) -> torch.Size:
    """Output shape for one zero image, leaving the module's train/eval mode as it was."""
    was_training = module.training
    module.eval()
    try:
        return module(torch.zeros(1, 3, img_size, img_size)).shape
    finally:
        module.train(was_training)


def _probe_channels(module: nn.Module, img_size: int) -> int:
    return int(_probe(module, img_size)[1])
