"""``mcloss export``: batch-export channel maps, Grad-CAM and montages for files, folders and globs.

Outputs are described in :mod:`mcloss.explainability.export` and :mod:`mcloss.explainability.outputs`.
The exit status is 1 when any input was rejected (listed in errors.csv and on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mcloss.cli._common import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
    add_checkpoint,
    add_device,
    checkpoint_path,
    defaults_of,
    progress_bar,
    run,
    say,
    writing_to,
)
from mcloss.core.checkpoint import load_checkpoint
from mcloss.core.distributed import DistContext, launched_by_torchrun
from mcloss.core.errors import MclossError, ParameterError
from mcloss.core.files import printable
from mcloss.core.model import MCModel
from mcloss.data.io import IMAGE_FORMATS
from mcloss.explainability import kinds
from mcloss.explainability.explanation import parse_maps
from mcloss.explainability.export import (
    MIN_WRITER_PROCESSES,
    MOST_WRITER_PROCESSES,
    WRITER_THREADS,
    ExportConfig,
    ExportResult,
    check_config,
    export,
    hold_output,
    merge_shards,
    parse_shard,
)
from mcloss.explainability.gradcam import GRADCAM_METHODS
from mcloss.explainability.render import (
    MAX_TILE_ASPECT,
    MAX_TILE_HEIGHT,
    MIN_TILE_HEIGHT,
    MONTAGE_MAX_PIXELS,
    Style,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    style, config = Style(), defaults_of(ExportConfig)  # each default is defined once, by the library
    p = argparse.ArgumentParser(prog="mcloss export", description="Batch-export channel maps and Grad-CAM.")
    add_checkpoint(p)
    p.add_argument("--input", nargs="+", help="image files, directories (recursive) or globs (required)")
    p.add_argument("--out", help="output directory (required)")
    p.add_argument(
        "--merge", metavar="OUT",
        help="only merge the shard files in OUT (written by --shard i/n jobs) into manifest.json, index.csv and "
        "errors.csv; under torchrun rank 0 merges by itself",
    )  # fmt: skip
    p.add_argument("--target", default=config["target"], help="pred | pred_mc | label | topK | class index or name")
    p.add_argument(
        "--maps", default=",".join(kinds.default_names()),
        help=f"comma list of {','.join(kinds.names())} (default {','.join(kinds.default_names())}); "
        f"not drawn in the montage (npz and json only): {', '.join(k.name for k in map(kinds.get, kinds.names()) if not k.in_montage)}",
    )  # fmt: skip
    p.add_argument(
        "--contrast", metavar="auto|CLASS",
        help="also explain why each target and not another class: 'auto' (the class whose FC logit is nearest the "
        "target's) or a class name or index; adds Finer-CAM and the group contrast (tiles 'A vs B', npz keys finer, "
        "contrast and versus, each target's versus in the json)",
    )  # fmt: skip
    p.add_argument("--colormap", default=style.colormap)
    p.add_argument("--alpha", type=float, default=style.alpha, help="heatmap opacity (0 = image only)")
    p.add_argument("--shared-scale", action="store_true", help="normalize a channel group by one max")
    p.add_argument(
        "--tile-height", type=int, default=style.tile_height,
        help=f"montage tile height in pixels, {MIN_TILE_HEIGHT}..{MAX_TILE_HEIGHT}; images beyond "
        f"{MAX_TILE_ASPECT:g}:1 either way are letterboxed, and a montage over {MONTAGE_MAX_PIXELS / 1e6:g} MP "
        "gets shorter tiles",
    )  # fmt: skip
    p.add_argument("--topk", type=int, default=config["topk"], help="entries in the json's topk list")
    p.add_argument("--batch-size", type=int, default=config["batch_size"])
    p.add_argument("--workers", type=int, default=config["workers"], help="DataLoader decoding workers (0 = in process)")
    p.add_argument(
        "--writers", type=int, default=config["writers"],
        help="processes that draw and write the files while the model runs the next batch (on a GPU; on a CPU "
        f"only where batches are explained one at a time); 0: {WRITER_THREADS} threads. Default: on a GPU under Linux, the CPUs left by the model and the "
        f"--workers, at most {MOST_WRITER_PROCESSES}, when at least {MIN_WRITER_PROCESSES} are; else threads",
    )  # fmt: skip
    add_device(p)
    p.add_argument(
        "--shard", default="/".join(map(str, config["shard"])),
        help="i/n: process every n-th input starting at i (under torchrun: the rank's share, set by itself)",
    )  # fmt: skip
    p.add_argument("--method", choices=GRADCAM_METHODS, default=config["method"], help="Grad-CAM implementation")
    p.add_argument(
        "--compare", metavar="CHECKPOINT",
        help="a second checkpoint with the same classes (e.g. checkpoints/ce-baseline.safetensors): explained for "
        "the same targets, drawn under the first in every montage (one scale with --shared-scale), its maps and "
        "predictions in the npz and json",
    )  # fmt: skip
    p.add_argument(
        "--no-montage", action="store_true",
        help="write only each image's npz (raw maps) and json, no montage: for exports that feed metrics",
    )  # fmt: skip
    p.add_argument(
        "--montage-format", choices=tuple(IMAGE_FORMATS), default=config["montage_format"],
        help="montage files: png (lossless, the default), jpg (libjpeg-turbo, 4:4:4; the fastest) or webp "
        "(smallest, slowest); a re-run in another format re-does each image and removes its old montages",
    )  # fmt: skip
    p.add_argument(
        "--quality", type=int, default=config["quality"],
        help=f"jpg / webp quality 1..100 (default {config['quality']}: a JPEG montage within 38 dB PSNR of its PNG)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p



def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns 0, or 1 when any input was rejected, or 2 on a usage error."""
    return run("export", build_parser(), argv, _export)


def _export(args: argparse.Namespace) -> int:
    if args.merge is not None:
        if args.input or args.out:
            raise ParameterError("--merge OUT takes no --input or --out")
        with contextlib.ExitStack() as held:
            if Path(args.merge).is_dir():  # else the merge says there is nothing to merge
                _hold(held, args.merge, what="merge", flag="--merge")
            with writing_to(args.merge, "--merge"):
                return _report(merge_shards(args.merge, lock=False), "merged")
    if not args.input or not args.out:
        raise ParameterError("the following arguments are required: --input, --out (or --merge OUT)")
    style = Style(colormap=args.colormap, alpha=args.alpha, shared_scale=args.shared_scale, tile_height=args.tile_height)
    shard = parse_shard(args.shard)
    maps = parse_maps(args.maps)  # bad options fail before the checkpoint is read
    ckpt = checkpoint_path(args.checkpoint)
    second = checkpoint_path(args.compare) if args.compare else None
    if launched_by_torchrun() and shard != (0, 1):
        raise ParameterError("--shard is set by torchrun (one shard per rank); leave it out")
    ctx, device = DistContext.setup(args.device)
    try:
        if ctx.enabled:
            shard = (ctx.rank, ctx.world_size)
        # ExportConfig checks its counts: bad values fail before the checkpoint is read
        config = ExportConfig(
            checkpoint=str(ckpt), input=list(args.input), out=str(Path(args.out)), target=args.target, maps=maps,
            style=style, topk=args.topk, batch_size=args.batch_size, workers=args.workers, device=str(device),
            shard=shard, method=args.method, compare=None if second is None else str(second),
            montage=not args.no_montage, montage_format=args.montage_format, quality=args.quality,
            contrast=args.contrast, writers=args.writers,
        )  # fmt: skip
        model = load_checkpoint(ckpt, device)
        other = None if second is None else load_checkpoint(second, device)
        check_config(model, config)  # an unusable option fails before the output folder is made
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            other = None if other is None else other.to(memory_format=torch.channels_last)
        with contextlib.ExitStack() as held:  # OUT is held until every rank's shard is merged
            if ctx.enabled:
                _hold_for_ranks(held, config, ctx)
            else:
                _hold(held, config.out, inputs=config.input, shard=config.shard)  # shards of a split run side by side
            with writing_to(config.out):
                result = _run(model, config, device, progress=not args.no_progress and ctx.is_main, compare=other)
            code = _report(result, "exported" if not ctx.enabled else f"exported by rank {ctx.rank}")
            if not ctx.enabled:
                return code
            ctx.barrier()  # every rank's shard files are written
            if ctx.is_main:
                with writing_to(config.out):
                    code = max(code, _report(merge_shards(config.out, ctx.world_size, lock=False), "merged"))
            return code
    finally:
        ctx.close()


def _hold(
    held: contextlib.ExitStack, out: str, *, inputs: Sequence[str] = (), shard: tuple[int, int] = (0, 1),
    what: str = "export", flag: str = "--out",
) -> None:  # fmt: skip
    """Hold the folder ``out`` until ``held`` closes (:func:`~mcloss.explainability.export.hold_output`); say
    whose stale lock was taken over."""
    with writing_to(out, flag):
        lock = held.enter_context(hold_output(out, inputs=inputs, shard=shard, what=what))
    for old in lock.taken_over:
        say("export", f"{out}: took over the stale lock of {old.describe()}: it is no longer running")


def _hold_for_ranks(held: contextlib.ExitStack, config: ExportConfig, ctx: DistContext) -> None:
    """Under torchrun rank 0 holds OUT for every rank of this export; when it cannot (another live export
    holds it), rank 0 says why and every rank stops."""
    refusal = None
    if ctx.is_main:
        try:
            _hold(held, config.out, inputs=config.input)
        except MclossError as exc:
            refusal = exc
    if ctx.broadcast_object(refusal is not None):
        if refusal is not None:
            raise refusal
        raise SystemExit(EXIT_USAGE)  # rank 0 says why, once


def _run(
    model: MCModel, config: ExportConfig, device: torch.device, *, progress: bool, compare: MCModel | None = None
) -> ExportResult:
    """The export of ``config`` (the caller holds OUT)."""
    with progress_bar("export", progress) as report:
        return export(model, config, device=device, progress=report, compare_model=compare, lock=False)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _report(result: ExportResult, verb: str) -> int:
    """Say what was done and list the rejected inputs; the exit code (1 when any input was rejected)."""
    reasons = result.redone_because
    because = next(iter(reasons)) if len(reasons) == 1 else ", ".join(f"{n} {why}" for why, n in reasons.items())
    redone = f" ({result.redone} re-done{': ' + because if because else ''})" if result.redone else ""
    say(
        "export",
        f"{result.written} {verb}{redone}, {result.skipped} already done, {len(result.errors)} rejected → {result.out}",
    )
    for _source, reason in result.errors:  # one line each, whatever a file name holds (a newline, an escape)
        print(f"  rejected: {_CONTROL.sub(lambda m: repr(m.group())[1:-1], printable(reason))}", file=sys.stderr)
    return EXIT_REJECTED if result.errors else EXIT_OK
