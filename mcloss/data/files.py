"""Input files of a batch job: files, directories (searched recursively for images) and glob patterns,
each with a unique, safe output stem."""

from __future__ import annotations

import errno
import glob
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mcloss.core.errors import ParameterError

__all__ = [
    "IMAGE_EXTENSIONS",
    "InputFile",
    "Inputs",
    "collect_inputs",
    "output_path",
    "pattern_folder",
    "sanitize_component",
    "unique_file_stems",
]

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


def unique_file_stems(names: Sequence[str]) -> list[str]:
    """One safe, distinct file stem per name (:func:`sanitize_component`): a name that is safe as it stands
    keeps it; one that sanitizing changed, or that would meet another's stem on a case-insensitive file system,
    gets ``~<its index>`` (``.`` → ``_~0``, ``..`` → ``_~1``, ``a/b`` → ``a_b~2`` beside ``a_b``)."""
    stems: list[str] = []
    taken: set[str] = set()
    for i, name in enumerate(names):
        stem = sanitize_component(name)
        if stem != name or stem.lower() in taken:  # "~" is never in a safe name: these cannot meet one
            stem = f"{stem[:190]}~{i}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def _key_for(parts: Sequence[str]) -> str:
    return "/".join(sanitize_component(p) for p in parts if p not in ("", ".", ".."))


@dataclass(frozen=True)
class Inputs:
    """What :func:`collect_inputs` found: the files, and (source, reason) for every input that gave none."""

    files: list[InputFile]
    problems: list[tuple[str, str]]


def _walk_images(root: Path, exclude: Path | None, problems: list[tuple[str, str]]) -> list[Path]:
    """Image files under ``root`` (sorted, recursive), skipping ``exclude``; unreadable folders and image
    names that are not regular files (dangling links, FIFOs, sockets) are reported in ``problems``."""
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        problems.append((str(exc.filename or root), f"{exc.filename or root}: unreadable folder ({exc.strerror})"))

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(folder)
        if exclude is not None:
            dirs[:] = [d for d in dirs if not _same_or_inside(here / d, exclude)]
        dirs.sort()
        for name in names:
            path = here / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_file():
                found.append(path)
            else:
                problems.append((str(path), _irregular(path)))
    return sorted(found)


def _irregular(path: Path) -> str:
    """Why ``path``, which is not a regular file, gives no image: a symbolic link loop, a dangling symbolic link,
    or another kind of file (a FIFO, a socket, a device)."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop"
        return f"{path}: dangling symbolic link" if path.is_symlink() else f"{path}: {exc.strerror}"
    return f"{path}: not a regular file"


def pattern_folder(raw: str) -> Path | None:
    """The folder a glob input searches (its parts before the first wildcard; ``.`` for ``*.jpg``), or None for
    an input that is not a pattern (a path that exists is taken as it is, wildcards and all)."""
    if os.path.lexists(raw) or not glob.has_magic(raw):
        return None
    return Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(raw).parts))


def _same_or_inside(path: Path, folder: Path) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(path), folder]) == str(folder)  # (Path.resolve raises on a link loop)
    except ValueError:  # different drives
        return False


def collect_inputs(inputs: Sequence[str], *, exclude: str | os.PathLike | None = None) -> Inputs:
    """Expand files, directories (recursive, image extensions only) and globs into unique output keys.

    A plain name that does not exist is kept as a file, so that decoding reports it. A folder without
    images, a glob that matches no file, an unreadable subfolder and an image name that is not a regular
    file are ``problems``. Nothing inside ``exclude`` (the output folder) is ever an input.
    """
    skip = Path(exclude).resolve() if exclude is not None else None

    def excluded(path: Path) -> bool:
        return skip is not None and _same_or_inside(path, skip)

    found: list[tuple[str, str]] = []  # (source, key)
    problems: list[tuple[str, str]] = []
    for raw in inputs:
        if os.path.isdir(raw):
            root = Path(raw)
            if excluded(root):
                problems.append((raw, f"{raw}: is the output folder (or inside it), not an input"))
                continue
            prefix = [root.resolve().name]
            images = _walk_images(root, skip, problems)
            if not images:
                problems.append((raw, f"{raw}: no image files found in this folder"))
            found += [(str(p), _key_for(prefix + list(p.relative_to(root).parts))) for p in images]
        elif pattern_folder(raw) is not None:
            every = sorted(glob.glob(raw, recursive=True))
            matches = [m for m in every if not excluded(Path(m))]
            kept = [m for m in matches if os.path.isfile(m)]
            # image names that are no regular file, as a folder's walk reports them (folders are not inputs here)
            odd = [m for m in matches if not os.path.isfile(m) and not os.path.isdir(m) and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
            problems += [(m, _irregular(Path(m))) for m in odd]
            if not kept and not odd:
                problems.append((raw, f"{raw}: no file matches this pattern" + (" outside the output folder" if every else "")))
            found += [(m, _key_for([Path(m).name])) for m in kept]
        elif os.path.lexists(raw) and excluded(Path(raw)):
            problems.append((raw, f"{raw}: is inside the output folder, not an input"))
        elif os.path.lexists(raw) and not os.path.isfile(raw):  # named as it is: a link loop, a dangling link, a FIFO
            problems.append((raw, _irregular(Path(raw))))
        else:
            found.append((raw, _key_for([Path(raw).name])))
    out: list[InputFile] = []
    seen: set[str] = set()
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
    return Inputs(out, problems)


def output_path(out_dir: Path, key: str) -> Path:
    """``out_dir / key``, refusing a key that would land outside ``out_dir``."""
    if not _same_or_inside(out_dir / key, out_dir.resolve()):
        raise ParameterError(f"output {key!r} would escape {out_dir}")
    return out_dir / key
