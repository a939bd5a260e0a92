"""Input files of a batch job: files, directories (searched recursively for images) and glob patterns,
each with a unique, safe output stem."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "InputFile", "collect_inputs", "output_path", "sanitize_component"]

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif", ".jpe"]
)
_SAFE = re.compile(r"[^A-Za-z0-9._+@=,-]+")


@dataclass(frozen=True)
class InputFile:
    """One input: its path as given (``source``) and its output stem relative to --out (``key``)."""

    source: str
    key: str


def sanitize_component(part: str) -> str:
    """One safe path component: no separators, no '.'/'..', no leading dot, nothing outside [A-Za-z0-9._+@=,-]."""
    safe = _SAFE.sub("_", part).strip()
    safe = safe.lstrip(".") or "_"
    return safe[:200]


def _key_for(parts: Sequence[str]) -> str:
    return "/".join(sanitize_component(p) for p in parts if p not in ("", ".", ".."))


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand files, directories (recursive, image extensions only) and globs into unique outputs keys.

    A name that matches nothing is kept as a file, so it is reported as an error later.
    """
    found: list[tuple[str, str]] = []  # (source, key)
    seen: set[str] = set()
    for raw in inputs:
        if os.path.isdir(raw):
            root = Path(raw)
            prefix = [root.resolve().name]
            for path in sorted(root.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((str(path), _key_for(prefix + list(path.relative_to(root).parts))))
        elif not os.path.exists(raw) and glob.has_magic(raw):
            for match in sorted(glob.glob(raw, recursive=True)):
                if os.path.isfile(match):
                    found.append((match, _key_for([Path(match).name])))
        else:
            found.append((raw, _key_for([Path(raw).name])))
    out: list[InputFile] = []
    used: set[str] = set()
    for source, key in found:
        ident = os.path.abspath(source)
        if ident in seen:
            continue
        seen.add(ident)
        unique, n = key or "_", 1
        while unique.lower() in used:
            n += 1
            unique = f"{key}~{n}"
        used.add(unique.lower())
        out.append(InputFile(source, unique))
    return out


def output_path(out_dir: Path, key: str) -> Path:
    """``out_dir / key``, refusing a key that would land outside ``out_dir``."""
    path = (out_dir / key).resolve()
    root = out_dir.resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise ValueError(f"output {key!r} would escape {out_dir}")
    return out_dir / key
