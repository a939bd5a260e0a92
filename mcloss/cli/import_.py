"""``mcloss import``: turn another project's MC-Loss or CE checkpoint into an mcloss checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mcloss.cli._common import run, writing_to
from mcloss.core.files import printable
from mcloss.interop.sources import LAYOUTS, SOURCES, TRANSFORM_PRESETS, import_checkpoint, read_class_list

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    layouts = "; ".join(f"{lay.name} ({lay.source}): {lay.description}" for lay in LAYOUTS)
    p = argparse.ArgumentParser(
        prog="mcloss import",
        description="Import a state dict saved by the official PRIS-CV scripts, FGVCLib, Kurumi233's "
        "re-implementation or a torchvision classifier fine-tuned elsewhere, as an ordinary mcloss checkpoint "
        "with the same logits and F. Files are read with safetensors or torch.load(weights_only=True); nothing is "
        f"unpickled. Layouts: {layouts}.",
    )
    p.add_argument("source", help="the source checkpoint (.pth, .pt, .ckpt, .bin or .safetensors)")
    p.add_argument("--out", required=True, help="the mcloss checkpoint to write (*.safetensors)")
    p.add_argument(
        "--classes", required=True,
        help="class names in the source's order: a text file (one per line), an ImageFolder root (its sorted "
        "sub-folders, the official scripts' order) or a CUB root (classes.txt)",
    )
    p.add_argument("--from", dest="layout", choices=("auto", *SOURCES), default="auto",
                   help="the source project (default auto: recognised from the key names and shapes)")
    p.add_argument("--arch", default=None, help="the backbone, checked against the weights (resnet50, vgg16_bn, ...)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the source's: 224; 448 for the official ResNet-50)")
    p.add_argument("--preset", choices=tuple(TRANSFORM_PRESETS), default=None,
                   help="input transform (default: the source's): official = resize to N x N, mean and std 0.5; "
                   "official-crop = resize to N*600/448 square, centre crop N; kurumi-crop = resize to 600 x 600, "
                   "centre crop N, ImageNet normalization; kurumi = official at 224, else kurumi-crop; torchvision = shorter side N*256/224, centre crop N, ImageNet")
    p.add_argument("--setting", default=None, help="Kurumi233's setting.txt (default: the one beside SOURCE)")
    p.add_argument("--prefix", default=None,
                   help="read only the keys under this prefix, where the file holds more than the model (model., "
                   "model_ema.); a prefix every key shares (Lightning's model., a {'net': ...} file's net.) is taken "
                   "off without it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Import and say what was written; 2 on an unreadable or unknown source, or bad arguments."""
    return run("import", build_parser(), argv, _import)


def _import(args: argparse.Namespace) -> int:
    names = read_class_list(args.classes)
    with writing_to(args.out):
        model = import_checkpoint(
            args.source, args.out, classes=names, layout=args.layout, arch=args.arch, img_size=args.img_size,
            setting=args.setting, preset=args.preset, prefix=args.prefix,
        )
    src = model.card["source"]
    groups = sorted(set(model.groups))
    xi = str(groups[0]) if len(groups) == 1 else "/".join(map(str, groups))
    read_as = [src["layout"]]
    if src["data_parallel_keys"]:
        read_as.append("DataParallel keys")
    if src["averaged_model"]:
        read_as.append("AveragedModel keys")
    if src["key_prefix"]:
        read_as.append(f"keys under {printable(src['key_prefix'])!r}")
    if src["left_out"]:
        read_as.append(f"left out {', '.join(map(printable, src['left_out']))}")
    print(
        f"imported {src['file']} ({', '.join(read_as)}) as "
        f"{model.config['backbone']}: {model.num_classes} classes x {xi} channels, F {model.config['feature_hw'][0]} x "
        f"{model.config['feature_hw'][1]}, head {'+'.join(model.config['head']['layers'])}; input "
        f"{model.card['transform_preset']}; wrote {args.out}"
    )
    for said in src.get("assumed", []):
        print(f"assumed: {said}")
    return 0
