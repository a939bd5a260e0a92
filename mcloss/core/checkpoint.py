"""Safe checkpoints: weights in safetensors, everything else as JSON metadata. Nothing is unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import threading
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from mcloss.core.domain import DomainCheck
from mcloss.core.errors import MclossError, ParameterError, first_line
from mcloss.core.files import atomic_write_bytes
from mcloss.core.loss import trained_pool_share
from mcloss.core.model import HeadSpec, MCModel, build_model, check_class_names
from mcloss.core.transforms import EvalTransform

__all__ = [
    "CHECKPOINT_ENV",
    "CheckpointError",
    "DIGEST_KEY",
    "FORMAT",
    "default_checkpoint",
    "project_checkpoints",
    "load_checkpoint",
    "MAX_CLASSES",
    "MAX_IMG_SIZE",
    "read_metadata",
    "rewrite_card",
    "save_checkpoint",
    "weights_digest",
]

FORMAT = "mcloss/1"
_REQUIRED = ("format", "config", "class_names", "transform", "card")
#: Environment variable that names the default checkpoint.
CHECKPOINT_ENV = "MCLOSS_CHECKPOINT"
_DEFAULT_NAME = "default.safetensors"
#: Bounds on what a checkpoint's metadata may ask for, checked before anything is built.
MAX_CLASSES = 10_000
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 1024
_CONFIG_KEYS = ("backbone", "num_classes", "xi", "groups", "img_size", "head_grid")
#: Metadata key of the sha256 of the weights (:func:`weights_digest`); checkpoints saved before it existed lack it.
DIGEST_KEY = "weights_sha256"


def project_checkpoints() -> Path:
    """The folder of the checkpoints installed with the project (the default, its model card, its samples).

    ``checkpoints/`` of the source tree the package runs from (the editable install of the README), else the
    copy a wheel installs under ``<prefix>/share/mcloss/checkpoints/``; the source-tree folder when neither
    holds the default, so that a "not found" message names where it was expected.
    """
    source_tree = Path(__file__).resolve().parents[2] / "checkpoints"
    installed = Path(sys.prefix) / "share" / "mcloss" / "checkpoints"
    return next((p for p in (source_tree, installed) if (p / _DEFAULT_NAME).is_file()), source_tree)


def default_checkpoint() -> Path:
    """The default checkpoint, resolved the same way from any working directory: ``$MCLOSS_CHECKPOINT``
    when set, otherwise ``default.safetensors`` in :func:`project_checkpoints`."""
    env = os.environ.get(CHECKPOINT_ENV)
    return Path(env) if env else project_checkpoints() / _DEFAULT_NAME


class CheckpointError(MclossError, ValueError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def save_checkpoint(model: MCModel, path: str | os.PathLike, *, half: bool = False) -> None:
    """Write the model's weights and metadata atomically as safetensors.

    Args:
        model: the model; its config, class names, transform and card go into the metadata.
        path: destination ``*.safetensors``.
        half: store floating-point weights as float16 (halves the file; loaded back as float32).
    """
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value
    metadata = {
        "format": FORMAT,
        "config": json.dumps(model.config),
        "class_names": json.dumps(model.class_names),
        "transform": json.dumps(model.transform.to_dict()),
        "card": json.dumps(model.card),
    }
    data = save_bytes(state, metadata=metadata)
    metadata[DIGEST_KEY] = _digest_of_bytes(data)
    data = save_bytes(state, metadata=metadata)  # the tensors' entries and bytes do not depend on the metadata
    atomic_write_bytes(path, data)


# ------------------------------------------------------------------------------------------------ digest
#
# The digest covers the tensors, not the metadata: the header's tensor entries (name, dtype, shape, offsets),
# canonically serialized, then the data region. A checkpoint's card can be rewritten without changing it.

_CHUNK = 1 << 20
#: Files whose digest matched, by (resolved path, device, inode, size, mtime_ns, ctime_ns, digest): a file is
#: hashed once per process while it stays the same.
_verified: set[tuple[str, int, int, int, int, int, str]] = set()
_verified_lock = threading.Lock()


def _tensor_index(header: dict) -> bytes:
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    return json.dumps(entries, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _digest_of_bytes(data: bytes) -> str:
    """The weights' digest of a safetensors file held in memory."""
    return _digest_of_file("<memory>", io.BytesIO(data))


def _header_of(label: str, f: BinaryIO) -> dict:
    """The JSON header of an open safetensors file, leaving ``f`` at the start of the data region."""
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{label}: empty or truncated file, not a safetensors checkpoint")
    (n,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(n))
    except (ValueError, MemoryError, OverflowError):
        raise CheckpointError(f"{label}: not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}: not a valid safetensors file (its header is not a JSON object)")
    return header


def _digest_of_file(label: str, f: BinaryIO) -> str:
    h = hashlib.sha256(_tensor_index(_header_of(label, f)))
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def weights_digest(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a safetensors file's tensors: their header entries and bytes, not the metadata.

    Raises:
        CheckpointError: the file cannot be read or is not safetensors.
    """
    label = str(path)
    try:
        with open(path, "rb") as f:
            return _digest_of_file(label, f)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({first_line(exc)})") from None


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file of ``header`` (its tensor entries and ``__metadata__``) and the data region ``data``.

    The header is padded with spaces to a multiple of 8 bytes, as safetensors writes it.
    """
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def rewrite_card(path: str | os.PathLike, card: dict) -> str:
    """Replace the card in an mcloss checkpoint's metadata atomically; every tensor byte stays as it was.

    The header's tensor entries (whatever tensors the file holds) and the data region are copied unchanged, the
    other metadata keys are kept, and the weights' digest (:data:`DIGEST_KEY`) is recorded: the one already
    there, or for a file saved before digests, the one computed before the rewrite.

    Returns:
        the weights' digest, the same before and after.

    Raises:
        CheckpointError: not a readable mcloss checkpoint, a card that is not a JSON object, or tensors that no
            longer match the digest the file records (a corrupted file is refused, not sealed anew).
    """
    label = str(path)
    read_metadata(path)  # an mcloss checkpoint whose metadata is valid
    if not isinstance(card, dict):
        raise CheckpointError(f"{label}: a card must be a JSON object, got {type(card).__name__}")
    try:
        text = json.dumps(card, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{label}: the card is not JSON ({first_line(exc)})") from None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({first_line(exc)})") from None
    stream = io.BytesIO(data)
    header = _header_of(label, stream)
    region = data[stream.tell():]
    before = _digest_of_bytes(data)
    metadata = dict(header.get("__metadata__") or {})
    if metadata.get(DIGEST_KEY, before) != before:
        raise CheckpointError(f"{label}: tensor bytes do not match the digest recorded when it was saved (corrupted?); "
                              "the card was not rewritten")  # fmt: skip
    metadata.update({"card": text, DIGEST_KEY: before})
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    rewritten = _safetensors_bytes({"__metadata__": metadata, **entries}, region)
    if _digest_of_bytes(rewritten) != before or not rewritten.endswith(region):
        raise CheckpointError(f"{label}: rewriting the card would change the tensors; nothing written")
    atomic_write_bytes(path, rewritten)
    return before


def _verify_weights(label: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tensors differ from the digest recorded when it was saved (none recorded: pass).

    A file that matched is not hashed again while its inode, size and modification and change times stay the same.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            recorded = (_header_of(label, f).get("__metadata__") or {}).get(DIGEST_KEY)
            if recorded is None:
                return
            if not (isinstance(recorded, str) and len(recorded) == 64 and set(recorded) <= set("0123456789abcdef")):
                raise CheckpointError(f"{label}: metadata {DIGEST_KEY} is not a sha256 hex digest ({recorded!r:.80})")
            key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, recorded)
            with _verified_lock:
                if key in _verified:
                    return
            f.seek(0)
            actual = _digest_of_file(label, f)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read ({first_line(exc)})") from None
    if actual != recorded:
        raise CheckpointError(f"{label}: tensor bytes do not match the digest recorded when it was saved (corrupted?)")
    with _verified_lock:
        _verified.add(key)


def read_metadata(path: str | os.PathLike) -> dict:
    """Return the decoded metadata of an mcloss checkpoint (config, class_names, transform, card)."""
    label = str(path)
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{label}: no such checkpoint file")
    if p.stat().st_size < 8:
        raise CheckpointError(f"{label}: empty or truncated file, not a safetensors checkpoint")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: not a valid safetensors file ({first_line(exc)})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{label}: not an mcloss checkpoint (format {raw.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{label}: metadata lacks {', '.join(missing)}")
    try:
        meta = {k: json.loads(raw[k]) for k in _REQUIRED if k != "format"}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{label}: corrupt metadata ({exc.msg})") from None
    _check_metadata(label, meta)
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mc_pool_share(config: dict, card: dict) -> float:
    """The MC head's pool: the config's; for a checkpoint saved before the key existed, the L_dis pool its card
    records (``dis_topk`` of a model trained with L_dis on, ``alpha`` > 0), else 1, the official global average."""
    if "mc_pool_share" in config:
        return float(config["mc_pool_share"])
    share, alpha = card.get("dis_topk", 1.0), card.get("alpha", 0)
    return trained_pool_share(share, alpha) if _is_number(share) and _is_number(alpha) and 0 < share <= 1 else 1.0


def _check_metadata(label: str, meta: dict) -> None:
    """Refuse metadata of the wrong types or beyond the bounds, naming the key (nothing is built yet)."""
    for key, kind in (("config", dict), ("class_names", list), ("transform", dict), ("card", dict)):
        if not isinstance(meta[key], kind):
            raise CheckpointError(f"{label}: metadata {key} is not a JSON {'object' if kind is dict else 'list'}")
    config = meta["config"]
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{label}: metadata config lacks {', '.join(missing)}")
    n = config["num_classes"]
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        raise CheckpointError(f"{label}: metadata num_classes must be an integer in 1..{MAX_CLASSES}, got {n!r}")
    size = config["img_size"]
    if not _is_int(size) or not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        raise CheckpointError(f"{label}: metadata img_size must be an integer in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}, got {size!r}")
    groups = config["groups"]
    if not isinstance(groups, list) or len(groups) != n or not all(_is_int(g) and 1 <= g <= 4096 for g in groups):
        raise CheckpointError(f"{label}: metadata groups must list {n} channel counts in 1..4096")
    xi = config["xi"]
    if xi is not None and not (_is_int(xi) and groups == [xi] * n):
        raise CheckpointError(f"{label}: metadata xi must be null or the size of every group, got {xi!r}")
    grid = config["head_grid"]
    if not isinstance(grid, list) or len(grid) != 2 or not all(_is_int(g) and 1 <= g <= 64 for g in grid):
        raise CheckpointError(f"{label}: metadata head_grid must be two integers in 1..64, got {grid!r}")
    _head_spec(label, config)
    widen = config.get("vgg_widen")
    if widen is not None and not (isinstance(widen, list) and all(isinstance(w, str) for w in widen)):
        raise CheckpointError(f"{label}: metadata vgg_widen must be a list of convolution names, got {widen!r}")
    share = config.get("mc_pool_share", 1.0)
    if not _is_number(share) or not 0 < share <= 1:
        raise CheckpointError(f"{label}: metadata mc_pool_share must be a number in (0, 1], got {share!r}")
    names = meta["class_names"]
    if len(names) != n or not all(isinstance(c, str) for c in names):
        raise CheckpointError(f"{label}: metadata class_names must be {n} strings, got {len(names)} entries")
    try:
        check_class_names(names)
    except ParameterError as exc:
        raise CheckpointError(f"{label}: metadata {exc}") from None


def _head_spec(label: str, config: dict) -> HeadSpec:
    """The prediction head the metadata describes: its ``head``, or the official FC head at ``head_grid`` for a
    checkpoint saved before heads were described."""
    if "head" not in config:
        return HeadSpec("max", tuple(config["head_grid"]))
    try:
        spec = HeadSpec.from_dict(config["head"])
    except ParameterError as exc:
        raise CheckpointError(f"{label}: metadata {exc}") from None
    if list(spec.grid) != config["head_grid"]:
        raise CheckpointError(f"{label}: metadata head grid {list(spec.grid)} disagrees with head_grid {config['head_grid']}")
    return spec


def _check_shapes(label: str, config: dict, shapes: dict[str, list[int]]) -> None:
    """The head's tensor shapes in the safetensors header must agree with the metadata's classes, groups and head."""
    spec = _head_spec(label, config)
    expected = {"head." + k: v for k, v in spec.tensor_shapes(sum(config["groups"]), config["num_classes"]).items()}
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(f"{label}: weights lack {missing[0]} (not an mcloss model with this head)")
    out_key = f"head.classifier.{len(spec.layers) - 1}.weight"
    if shapes[out_key][0] != config["num_classes"]:
        raise CheckpointError(f"{label}: metadata says {config['num_classes']} classes but the weights have {shapes[out_key][0]}")
    first = next(iter(expected))
    if shapes[first] != expected[first]:
        raise CheckpointError(
            f"{label}: metadata groups and head_grid give {expected[first][-1]} head inputs but the weights have "
            f"{shapes[first][-1:]}"
        )
    wrong = [k for k, shape in expected.items() if shapes[k] != shape]
    if wrong:
        raise CheckpointError(f"{label}: weight {wrong[0]} has shape {shapes[wrong[0]]}, the metadata's head gives {expected[wrong[0]]}")


def _header_shapes(label: str, path: str | os.PathLike) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: corrupt weights ({first_line(exc)})") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> MCModel:
    """Load an mcloss checkpoint into an MCModel in eval mode, without network access or unpickling.

    A checkpoint whose metadata records the weights' digest (:data:`DIGEST_KEY`, written by
    :func:`save_checkpoint`) must match it; one saved without a digest loads as before.

    Raises:
        CheckpointError: missing, empty, corrupt, foreign or mismatched file, or weights that differ from
            their recorded digest.
    """
    label = str(path)
    meta = read_metadata(path)
    config = meta["config"]
    _check_shapes(label, config, _header_shapes(label, path))
    _verify_weights(label, path)
    try:
        model = build_model(
            config["backbone"],
            int(config["num_classes"]),
            xi=config["xi"],
            class_names=meta["class_names"],
            img_size=int(config["img_size"]),
            pretrained=None,
            transform=EvalTransform.from_dict(meta["transform"]),
            head_grid=config["head_grid"],
            card=meta["card"],
            last_stage=config.get("last_stage"),
            mc_pool_share=_mc_pool_share(config, meta["card"]),
            head=_head_spec(label, config),
            vgg_widen=config.get("vgg_widen"),
        )
    except (KeyError, TypeError, ValueError, ParameterError) as exc:
        raise CheckpointError(f"{label}: metadata does not describe a buildable model ({first_line(exc)})") from None
    if model.groups != list(config["groups"]):
        raise CheckpointError(f"{label}: channel groups in metadata do not match the architecture")
    if config.get("domain") is not None:
        try:
            model.set_domain(DomainCheck.from_config(config["domain"], model.num_channels))
        except ParameterError as exc:
            raise CheckpointError(f"{label}: {exc}") from None
    model.config.update({k: v for k, v in config.items() if k not in model.config})
    expected = model.state_dict()
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{label}: weights do not match {config['backbone']} "
                    f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})"
                )
            for key in keys:
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key].shape:
                    raise CheckpointError(
                        f"{label}: weight {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                    )
                state[key] = tensor.to(expected[key].dtype)
    except SafetensorError as exc:
        raise CheckpointError(f"{label}: corrupt weights ({first_line(exc)})") from None
    model.load_state_dict(state)
    return model.to(device).eval()
