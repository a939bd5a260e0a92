"""Our own transcriptions of other projects' MC-Loss and CE models, to test ``mcloss import`` against.

Each builder returns a module whose ``forward(x)`` gives ``(logits, F)`` as the source's eval forward computes them,
and a ``save(path)`` that writes its checkpoint the way that project does. Written from reading:

- PRIS-CV/Mutual-Channel-Loss ``CUB-200-2011.py`` (``model_bn`` on a VGG whose conv4_3 and conv5_3 have ξ·C
  channels, features split at layer 34, each submodule wrapped in DataParallel under CUDA), its first versions
  (one ``features`` = the VGG's features, only conv5_3 widened), ``CUB-200-2011_ResNet18.py`` (layer4 at ξ·C planes,
  stride 1, MaxPool2d(14) head) and the removed ``MC_ResNet50.py`` (torchvision ResNet-50, 448 px);
- FGVCLib's ``backbones/vgg.py`` (no BN, conv4_3 and conv5_3 at 600, no last pool, an unused classifier),
  ``encoders/pooling.py`` (2 × 2 max-pool) and ``heads/classifier_2fc.py`` (BN, Linear, BN, ReLU, Linear);
- Kurumi233/Mutual-Channel-Loss ``models/BaseModel_scratch.py``, ``models/BaseModel.py``, ``models/metric.py``
  and ``train.py`` (``{'net', 'metric', 'acc', 'epoch'}`` in ``ckpt.pth``, ``setting.txt`` in ``k:v`` lines).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet


def _vgg_layers(cfg: list, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    channels = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers.append(nn.Conv2d(channels, item, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU(inplace=True))
        channels = item
    return layers


def _dense(width: int, classes: int, act: type[nn.Module] = nn.ELU) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 512), nn.BatchNorm1d(512), act(), nn.Linear(512, classes))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial BN statistics, in eval mode; activations kept at a sane scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.num_batches_tracked.fill_(1000)
    return model.eval()


class OfficialVGG(nn.Module):
    """PRIS-CV ``model_bn`` on VGG16-BN; ``early`` is the first scripts' variant: ``net = VGG('VGG16').features``
    kept whole as ``self.features`` (one Sequential), with only conv5_3 widened."""

    def __init__(self, classes: int = 200, xi: int = 3, *, early: bool = False, width: int | None = None) -> None:
        super().__init__()
        k = width or classes * xi  # width: the script run with only classes_num changed keeps its 600
        conv4_3 = 512 if early else k
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, conv4_3, "M", 512, 512, k]
        layers = [*_vgg_layers(cfg, True), nn.AvgPool2d(1, 1)]
        self.early = early
        if early:
            self.features = nn.Sequential(*layers)
        else:
            self.features_1 = nn.Sequential(*layers[:34])
            self.features_2 = nn.Sequential(*layers[34:])
        self.max = nn.MaxPool2d(2, 2)
        self.classifier = _dense(k * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x) if self.early else self.features_2(self.features_1(x))
        return self.classifier(self.max(f).flatten(1)), f

    def save(self, path, *, data_parallel: bool = True) -> None:
        """``torch.save(net.state_dict())`` after the script's DataParallel wrapping (``module.`` infix)."""
        if data_parallel:
            for name in ("features", "classifier") if self.early else ("features_1", "features_2", "classifier"):
                setattr(self, name, nn.DataParallel(getattr(self, name)))
        torch.save(self.state_dict(), path)


def _official_resnet18(planes: int) -> tv_resnet.ResNet:
    """The script's ResNet-18: torchvision's blocks, layer4 at ``planes`` with stride 1."""
    net = tv_resnet.ResNet(tv_resnet.BasicBlock, [2, 2, 2, 2])
    net.inplanes = 256
    net.layer4 = net._make_layer(tv_resnet.BasicBlock, planes, 2, stride=1)
    return net


class OfficialResNet(nn.Module):
    """PRIS-CV ``model_bn`` on a ResNet: ``features`` = children[:-2], MaxPool2d(14), BN1d head."""

    def __init__(self, arch: str = "resnet18", classes: int = 200, xi: int = 3, *, width: int | None = None) -> None:
        super().__init__()
        width = (width or classes * xi) if arch == "resnet18" else 2048  # width: the script's CE baseline keeps 512
        net = _official_resnet18(width) if arch == "resnet18" else torchvision.models.resnet50(weights=None)
        self.features = nn.Sequential(*list(net.children())[:-2])
        self.max = nn.MaxPool2d(14, 14)
        self.classifier = _dense(width, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(self.max(f).flatten(1)), f

    def save(self, path, *, data_parallel: bool = True) -> None:
        if data_parallel:
            self.features = nn.DataParallel(self.features)
            self.classifier = nn.DataParallel(self.classifier)
        torch.save(self.state_dict(), path)


class FGVCLibMCL(nn.Module):
    """FGVCLib's MCL: VGG16 without BN (conv4_3, conv5_3 at ξ·C, no last pool), 2 × 2 max-pool, classifier_2fc."""

    def __init__(self, classes: int = 200, xi: int = 3) -> None:
        super().__init__()
        k = classes * xi
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, k, "M", 512, 512, k]
        self.backbone = nn.Module()
        self.backbone.features = nn.Sequential(*_vgg_layers(cfg, False))
        self.backbone.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True),
            nn.Dropout(), nn.Linear(4096, 1000),
        )
        self.encoder = nn.MaxPool2d(2, 2)
        self.heads = nn.Module()
        self.heads.classifiers = nn.ModuleList([_dense(k * 7 * 7, classes, nn.ReLU)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone.features(x)
        return self.heads.classifiers[0](self.encoder(f).flatten(1)), f

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)


class Kurumi(nn.Module):
    """Kurumi233's BaseModel_scratch (VGG16-BN to conv5_2, ``last_conv`` to C·eps) or BaseModel (a pretrained
    ResNet's children[:-2], adaptive max-pool to 1 × 1), with its ``dense`` or ``linear`` metric."""

    def __init__(self, classes: int = 200, eps: int = 3, *, pretrained: str | None = None, metric: str = "dense") -> None:
        super().__init__()
        self.net = nn.Module()
        if pretrained is None:
            self.net.backbone = nn.Sequential(*list(torchvision.models.vgg16_bn(weights=None).features.children())[:-4])
            self.net.last_conv = nn.Sequential(
                nn.Conv2d(512, classes * eps, 3, 1, 1), nn.BatchNorm2d(classes * eps), nn.ReLU(True), nn.AvgPool2d(1, 1)
            )
            self.net.maxpool = nn.MaxPool2d(2, 2)
            width = classes * eps * 7 * 7
        else:  # BaseModel: its 'vgg16bn' is torchvision's vgg16 (no BN), features and avgpool kept
            net = torchvision.models.get_model("vgg16" if pretrained == "vgg16bn" else pretrained, weights=None)
            self.net.backbone = nn.Sequential(*list(net.children())[:-2])
            self.net.maxpool = nn.AdaptiveMaxPool2d((1, 1))
            width = 2048 if pretrained == "resnet50" else 512
        self.metric = nn.Module()
        if metric == "dense":
            self.metric.dense = _dense(width, classes)
        else:
            self.metric.fc = nn.Linear(width, classes)
        self.kind = metric

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.backbone(x)
        if hasattr(self.net, "last_conv"):
            f = self.net.last_conv(f)
        out = self.net.maxpool(f).flatten(1)
        return (self.metric.dense if self.kind == "dense" else self.metric.fc)(out), f

    def save(self, path, setting: dict | None = None) -> None:
        torch.save({"net": self.net.state_dict(), "metric": self.metric.state_dict(), "acc": 0.6617, "epoch": 211}, path)
        if setting is not None:
            lines = "".join(f"{k}:{v}\n" for k, v in setting.items())
            (path.parent / "setting.txt").write_text(lines)


class TorchvisionCE(nn.Module):
    """A torchvision classifier fine-tuned with its own head (``fc`` or ``classifier[6]`` replaced)."""

    def __init__(self, arch: str = "resnet50", classes: int = 200, *, dropout: float | None = None) -> None:
        super().__init__()
        self.net = torchvision.models.get_model(arch, weights=None)
        if arch.startswith("resnet"):
            self.net.fc = nn.Linear(self.net.fc.in_features, classes)
            if dropout is not None:  # the common fine-tuning head: fc = Sequential(Dropout, Linear)
                self.net.fc = nn.Sequential(nn.Dropout(dropout), self.net.fc)
        else:
            self.net.classifier[6] = nn.Linear(4096, classes)
        self.arch = arch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        if self.arch.startswith("resnet"):
            f = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))
            return n.fc(torch.flatten(n.avgpool(f), 1)), f
        f = n.features[:-1](x)  # F before the last pool, as mcloss reads it
        return n.classifier(torch.flatten(n.avgpool(n.features[-1](f)), 1)), f

    def save(self, path) -> None:
        torch.save(self.net.state_dict(), path)
