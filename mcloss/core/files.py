"""File primitives every layer uses: atomic writes, sha256 of a file, figures written as files, and the
shared JSON/CSV encoders."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "new_figure",
    "save_figure",
    "csv_text",
    "default_mode",
    "file_sha256",
    "printable",
    "json_safe",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The process umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = _current_umask()


def default_mode(directory: bool = False) -> int:
    """The permission bits ``open()``/``mkdir()`` would give a new file or directory under the process umask."""
    return (0o777 if directory else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, else removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, default_mode())  # mkstemp makes 0600; the result should read like any other new file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def new_figure(size: tuple[float, float], dpi: int = 100) -> Any:
    """A matplotlib Figure on the Agg backend (no pyplot state), for figures written as files."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=dpi)


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Lay out a matplotlib Figure tightly and write it to ``path`` as PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plain(obj: Any) -> Any:
    """A numpy scalar or array, or a path, as plain Python (lists, str); anything else unchanged."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    if plain is obj:
        raise TypeError(f"cannot serialize {type(obj).__name__}")
    return plain


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON data, recursively: NaN → None, numpy and paths → plain Python, tuples → lists."""
    obj = _plain(obj)
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def csv_text(
    header: Sequence[str],
    rows: Iterable[Sequence[Any] | Mapping[str, Any]],
    *,
    float_format: str = ".6g",
    nan: str = "",
) -> str:
    """CSV text with ``\\n`` line ends: the header, then one line per row.

    Args:
        header: the column names.
        rows: each a sequence in ``header`` order, or a mapping read by column name (a missing key is empty).
        float_format: how floats are written (``format(value, float_format)``).
        nan: how NaN is written; None is always an empty cell, anything else is written with ``str``.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = [row.get(c) for c in header] if isinstance(row, Mapping) else row
        writer.writerow([_csv_cell(v, float_format, nan) for v in values])
    return buf.getvalue()


def _csv_cell(value: Any, float_format: str, nan: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return nan if math.isnan(value) else format(value, float_format)
    return printable(str(value))


def printable(text: str) -> str:
    """``text`` as valid UTF-8 text: a file name's bytes that are not UTF-8 (which Python carries as lone
    surrogates) become ``\\xNN``; any other text is returned as it is. JSON needs none of this: it writes such
    characters as ``\\udcNN`` escapes, which read back to the same name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text
