#!/usr/bin/env python3
"""Compare two output trees of scripts/side_by_side/run.sh file by file.

    python compare.py A B [--max-diff-lines N] [--ignore-messages]

Run it with an interpreter that has numpy, Pillow, safetensors-free parsing is built in; torch is needed only to
compare ``*.pt`` files whose bytes differ (the project's .venv/bin/python has all of them).

What is compared, and how (after "normalization", see below):
  * every file under A and B (and every directory, so that an empty folder made by one side counts);
  * ``*.json``          as data (volatile values replaced), then its layout (indentation, separators);
  * ``*.csv``           as rows, with volatile columns dropped;
  * ``*.md, *.txt, *.out, *.cmd, *.env`` and other text  as text lines;
  * ``*.npz``           bytes; when they differ, the arrays (names, dtype, shape, values), naming those that differ;
  * ``*.safetensors``   bytes; when they differ, the tensors (dtype, shape, raw data) and the metadata as data;
  * ``*.pt``            bytes; when they differ, ``torch.load(weights_only=True)`` contents as data;
  * ``*.png, *.jpg``, everything else: bytes (for images that differ, the pixel difference is described).

Normalization (each applied to both sides, so that only genuinely volatile things are ignored):
  * the roots: A's and B's source tree (TREE in log/meta.env) become ``<TREE>``, their OUT roots ``<OUT>``;
  * JSON keys (anywhere in a document, also in safetensors metadata and resume.pt): the values of ``seconds``,
    ``time_s`` (wall-clock timings), ``created`` (a date), ``run_id`` (a random uuid per training run),
    ``versions`` (library versions, platform) and ``mtime_ns`` (an export json's input stamp: each side makes
    its synthetic inputs anew) become "<volatile>" (the key itself must be on both sides);
    ISO dates inside strings become ``<DATE>`` (config.json's ``resumes[].time``);
  * atlas-state.json ``options.inputs`` (a sha256 over the absolute image paths): recomputed from the dataset
    and replaced by a marker when it matches on a side;
  * an export manifest's ``digest`` (a sha256 over the rest, timings included): recomputed and replaced by a
    marker when it matches on a side;
  * safetensors metadata: key order ignored (the format does not keep it);
  * CSV columns: ``time_s``, ``seconds``;
  * text: the synth summary's ``in X s (N images/s)`` and the training log's per-epoch ``  X.Xs``;
  * files not compared: log/timings.tsv (wall times), log/meta.env (the interpreter's path).

Sections of the report: outputs (files; stdout of each step, log/*.out, is an output), missing/extra files, and
"messages / exit codes" (log/*.rc, log/*.err, log/*.cmd, log/env.txt), which a refactor may change on purpose.

Exit status: 0 all identical; 1 outputs differ (or files missing/extra); 3 outputs identical but messages or exit
codes differ (0 with --ignore-messages); 2 bad usage.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import re
import struct
import sys
import zipfile
from pathlib import Path

#: keys whose values are volatile: the value is replaced by "<volatile>" (the key must still be on both sides)
VOLATILE_KEYS = frozenset({"seconds", "time_s", "created", "run_id", "versions", "mtime_ns"})
#: a wall-clock date anywhere in a JSON string (e.g. config.json's resumes[].time)
ISO_DATE = re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")
VOLATILE_COLUMNS = frozenset({"time_s", "seconds"})
SKIP_FILES = frozenset({"log/timings.tsv", "log/meta.env"})
TEXT_SUFFIXES = frozenset({".md", ".txt", ".out", ".err", ".cmd", ".env", ".rc", ".tsv", ".html", ".yaml", ".yml"})
TEXT_PATTERNS = [
    # mcloss synth: "... to DIR in 0.3 s (174 images/s)"
    (re.compile(r" in \d+(?:\.\d+)? s \(\d+ images/s\)"), " in <T> s (<N> images/s)"),
    # mcloss train, one line per epoch: "... test FC 33.3% MC 33.3%  0.2s"
    (re.compile(r"(MC \d+(?:\.\d+)?%)  \d+(?:\.\d+)?s$", re.M), r"\1  <T>s"),
]


# --------------------------------------------------------------------------------------------- normalization
class Roots:
    """Substitutes one tree's roots by placeholders."""

    def __init__(self, top: Path):
        meta = {}
        env = top / "log" / "meta.env"
        if env.is_file():
            for line in env.read_text().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    meta[k] = v
        pairs = []
        for key, mark in (("OUT", "<OUT>"), ("TREE", "<TREE>")):
            value = meta.get(key) or (str(top) if key == "OUT" else None)
            if not value:
                continue
            for form in {value, os.path.realpath(value), os.path.abspath(value)}:
                pairs.append((form.rstrip("/"), mark))
        pairs.append((str(top.resolve()), "<OUT>"))
        # the longest first, so that a root inside another is replaced before its parent
        self.pairs = sorted(set(pairs), key=lambda p: -len(p[0]))

    def text(self, s: str) -> str:
        for old, new in self.pairs:
            if old:
                s = s.replace(old, new)
        return s


def norm_text(s: str, roots: Roots) -> str:
    s = roots.text(s)
    for pattern, repl in TEXT_PATTERNS:
        s = pattern.sub(repl, s)
    return s


def norm_data(obj, roots: Roots):
    """JSON-like data with volatile keys dropped and roots substituted in strings (JSON-in-strings decoded)."""
    if isinstance(obj, dict):
        return {norm_data(k, roots) if isinstance(k, str) else k: "<volatile>" if k in VOLATILE_KEYS else norm_data(v, roots)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [norm_data(v, roots) for v in obj]
    if isinstance(obj, str):
        return ISO_DATE.sub("<DATE>", roots.text(obj))
    return obj


def data_diff(a, b, path="$", out=None, limit=12, ordered=True):
    """Paths where two JSON-like values differ (at most ``limit``); ``ordered``: a dict's key order counts."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k}: only in B ({short(b[k])})")
            elif k not in b:
                out.append(f"{path}.{k}: only in A ({short(a[k])})")
            else:
                data_diff(a[k], b[k], f"{path}.{k}", out, limit, ordered)
            if len(out) >= limit:
                break
        if ordered and list(a) != list(b) and set(a) == set(b) and len(out) < limit:
            out.append(f"{path}: same keys, other order")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            data_diff(x, y, f"{path}[{i}]", out, limit, ordered)
            if len(out) >= limit:
                break
    elif a != b or type(a) is not type(b):
        if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
            return out  # nan == nan
        out.append(f"{path}: {short(a)} vs {short(b)}")
    return out


def short(v, n=100) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def text_diff(a: str, b: str, name: str, limit: int) -> list[str]:
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"A/{name}", f"B/{name}", n=0, lineterm=""))
    return lines[:limit] + ([f"... ({len(lines) - limit} more diff lines)"] if len(lines) > limit else [])


# ------------------------------------------------------------------------------------------------ per kind
def cmp_json(pa, pb, ra, rb, limit):
    try:
        a, b = json.loads(pa.read_text()), json.loads(pb.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"not valid JSON on one side ({exc}); compared as text"] + cmp_text(pa, pb, ra, rb, limit)
    if pa.name == "atlas-state.json":
        a, b = atlas_inputs_digest(a, pa), atlas_inputs_digest(b, pb)
    a, b = sealed_digest(a), sealed_digest(b)
    diffs = data_diff(norm_data(a, ra), norm_data(b, rb), limit=limit)
    if not diffs and json_layout(pa) != json_layout(pb):
        diffs = ["same data, other layout (indentation, separators or line breaks)"]
    return diffs


def json_layout(p: Path) -> str:
    """A JSON file's text with every string and number literal blanked: its layout."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', p.read_text())
    return re.sub(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", "0", text)


def sealed_digest(doc: object) -> object:
    """An export manifest's ``digest`` is the sha256 of the rest of the document (its canonical JSON), which holds
    volatile fields (``seconds``), so it differs between any two runs. Recompute it; when it matches, replace it by
    a marker, else leave it (and it shows as a difference)."""
    import hashlib

    if not isinstance(doc, dict) or not isinstance(doc.get("digest"), str):
        return doc
    rest = {k: v for k, v in doc.items() if k != "digest"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if hashlib.sha256(canonical).hexdigest() != doc["digest"]:
        return doc
    return rest | {"digest": "<sha256 of the rest: recomputed, matches>"}


def atlas_inputs_digest(state: dict, path: Path) -> dict:
    """atlas-state.json's ``options.inputs`` is sha256(json.dumps([paths, labels])) over the split's absolute
    image paths, so it changes with the OUT root. Recompute it from the dataset named in the sibling atlas.json
    (CUB index files); when it matches, replace it by a marker, else leave it (and it shows as a difference)."""
    import hashlib

    try:
        digest = state["options"]["inputs"]
        config = json.loads((path.parent / "atlas.json").read_text())["config"]
        root, split = Path(config["data"]), config["split"]
        lines = lambda name: [l.split(None, 1) for l in (root / name).read_text().splitlines() if l.strip()]  # noqa: E731,E741
        images = dict(lines("images.txt"))
        labels = {k: int(v) for k, v in lines("image_class_labels.txt")}
        is_train = {k: int(v) for k, v in lines("train_test_split.txt")}
        ids = [k for k in images if split == "all" or is_train[k] == (1 if split == "train" else 0)]
        expected = [[str(root / "images" / images[k]) for k in ids], [labels[k] - 1 for k in ids]]
        if hashlib.sha256(json.dumps(expected).encode()).hexdigest() == digest:
            state = json.loads(json.dumps(state))
            state["options"]["inputs"] = "<sha256 of the split's paths and labels: recomputed, matches>"
    except (KeyError, OSError, ValueError, TypeError):
        pass
    return state


def read_csv(p: Path, roots: Roots):
    rows = list(csv.reader(io.StringIO(p.read_text(encoding="utf-8"))))
    if not rows:
        return rows
    drop = {i for i, h in enumerate(rows[0]) if h in VOLATILE_COLUMNS}
    return [[roots.text(c) for i, c in enumerate(r) if i not in drop] for r in rows]


def cmp_csv(pa, pb, ra, rb, limit):
    a, b = read_csv(pa, ra), read_csv(pb, rb)
    if a == b:
        return []
    to = lambda rows: "\n".join(",".join(r) for r in rows)  # noqa: E731
    return text_diff(to(a), to(b), pa.name, limit)


def cmp_text(pa, pb, ra, rb, limit):
    a = norm_text(pa.read_bytes().decode("utf-8", "replace"), ra)
    b = norm_text(pb.read_bytes().decode("utf-8", "replace"), rb)
    return [] if a == b else text_diff(a, b, pa.name, limit)


def cmp_npz(pa, pb, ra, rb, limit):
    import numpy as np

    out = []
    with np.load(pa, allow_pickle=False) as za, np.load(pb, allow_pickle=False) as zb:
        ka, kb = set(za.files), set(zb.files)
        for k in sorted(ka - kb):
            out.append(f"array {k}: only in A")
        for k in sorted(kb - ka):
            out.append(f"array {k}: only in B")
        for k in sorted(ka & kb):
            x, y = za[k], zb[k]
            if x.dtype != y.dtype or x.shape != y.shape:
                out.append(f"array {k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            elif not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
                out.append(f"array {k}: values differ ({array_delta(x, y)})")
    if not out:  # same arrays: say what else differs (zip member order, names, timestamps)
        ma, mb = zip_members(pa), zip_members(pb)
        if [m[0] for m in ma] != [m[0] for m in mb]:
            out.append(f"same arrays, other member order: {[m[0] for m in ma]} vs {[m[0] for m in mb]}")
        elif any(x[2] != y[2] for x, y in zip(ma, mb, strict=True)):
            out.append("same arrays, but a member's raw .npy bytes differ (header)")
        else:
            return ["EQUIV: same arrays and member bytes; only zip metadata (timestamps) differs"]
    return out[:limit]


def zip_members(p: Path):
    with zipfile.ZipFile(p) as z:
        return [(i.filename, i.date_time, z.read(i.filename)) for i in z.infolist()]


def array_delta(x, y) -> str:
    import numpy as np

    try:
        neq = ~((x == y) | (np.isnan(x) & np.isnan(y))) if x.dtype.kind in "fc" else x != y
        n = int(np.count_nonzero(neq))
        if x.dtype.kind in "fciub":
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            return f"{n} of {x.size} elements, max |Δ| {np.nanmax(d):.3g}"
        return f"{n} of {x.size} elements"
    except Exception as exc:  # noqa: BLE001
        return str(exc)


def read_safetensors(p: Path):
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    decoded = {}
    for k, v in meta.items():
        try:
            decoded[k] = json.loads(v)
        except (TypeError, ValueError):
            decoded[k] = v
    return tensors, decoded


def cmp_safetensors(pa, pb, ra, rb, limit):
    try:
        ta, ma = read_safetensors(pa)
        tb, mb = read_safetensors(pb)
    except Exception as exc:  # noqa: BLE001
        return [f"bytes differ and one side does not parse as safetensors ({exc})"]
    out = []
    for k in sorted(set(ta) - set(tb)):
        out.append(f"tensor {k}: only in A")
    for k in sorted(set(tb) - set(ta)):
        out.append(f"tensor {k}: only in B")
    for k in sorted(set(ta) & set(tb)):
        (da, sa, xa), (db, sb, xb) = ta[k], tb[k]
        if (da, sa) != (db, sb):
            out.append(f"tensor {k}: {da}{sa} vs {db}{sb}")
        elif xa != xb:
            out.append(f"tensor {k}: values differ{tensor_delta(xa, xb, da)}")
    # the metadata's key order is not kept by safetensors (a hash map): compared without order
    out += [f"metadata {d}" for d in data_diff(norm_data(ma, ra), norm_data(mb, rb), "$", limit=limit, ordered=False)]
    if not out:
        return ["EQUIV: same tensors and metadata (after normalization); header order or volatile metadata differ"]
    return out[:limit]


def tensor_delta(xa: bytes, xb: bytes, dtype: str) -> str:
    try:
        import numpy as np

        dt = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}[dtype]  # fmt: skip
        return f" ({array_delta(np.frombuffer(xa, dt), np.frombuffer(xb, dt))})"
    except Exception:  # noqa: BLE001
        return ""


def torch_plain(obj):
    """torch.load output as comparable plain data: tensors become (dtype, shape, bytes)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": str(t.dtype), "shape": list(t.shape),
                "data": t.reshape(-1).view(torch.uint8).numpy().tobytes().hex() if t.numel() else ""}  # fmt: skip
    if isinstance(obj, dict):
        return {str(k): torch_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [torch_plain(v) for v in obj]
    return obj


def cmp_pt(pa, pb, ra, rb, limit):
    try:
        import torch
    except ImportError:
        return ["bytes differ (torch not available to compare contents)"]
    try:
        a = torch_plain(torch.load(pa, map_location="cpu", weights_only=True))
        b = torch_plain(torch.load(pb, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001
        return [f"bytes differ and one side does not load ({exc})"]
    diffs = data_diff(norm_data(a, ra), norm_data(b, rb), limit=limit)
    diffs = [d if len(d) < 300 else d[:297] + "..." for d in diffs]
    return diffs or ["EQUIV: same contents (after normalization); pickle bytes differ"]


def cmp_image(pa, pb, ra, rb, limit):
    try:
        import numpy as np
        from PIL import Image

        with Image.open(pa) as ia, Image.open(pb) as ib:
            if (ia.mode, ia.size) != (ib.mode, ib.size):
                return [f"bytes differ; image {ia.mode} {ia.size} vs {ib.mode} {ib.size}"]
            xa, xb = np.asarray(ia), np.asarray(ib)
            if np.array_equal(xa, xb):
                return [f"bytes differ ({pa.stat().st_size} vs {pb.stat().st_size} B) but pixels are identical "
                        f"(metadata/encoding; A info {sorted(ia.info)} B info {sorted(ib.info)})"]  # fmt: skip
            return [f"bytes differ; pixels differ: {array_delta(xa, xb)}"]
    except Exception as exc:  # noqa: BLE001
        return [f"bytes differ ({exc})"]


def cmp_bytes(pa, pb, ra, rb, limit):
    return [f"bytes differ ({pa.stat().st_size} vs {pb.stat().st_size} B)"]


def comparator(rel: str):
    suffix = Path(rel).suffix.lower()
    if suffix == ".json":
        return cmp_json
    if suffix == ".csv":
        return cmp_csv
    if suffix in TEXT_SUFFIXES:
        return cmp_text
    if suffix == ".npz":
        return cmp_npz
    if suffix == ".safetensors":
        return cmp_safetensors
    if suffix == ".pt":
        return cmp_pt
    if suffix in (".png", ".jpg", ".jpeg"):
        return cmp_image
    return cmp_bytes


# -------------------------------------------------------------------------------------------------- driver
def listing(top: Path) -> tuple[set[str], set[str]]:
    files, dirs = set(), set()
    for root, dnames, fnames in os.walk(top):
        r = Path(root).relative_to(top)
        for d in dnames:
            dirs.add(str(r / d))
        for f in fnames:
            files.add(str(r / f))
    return files - SKIP_FILES, dirs


def is_message(rel: str) -> bool:
    return rel.startswith("log/") and (rel.endswith((".rc", ".err", ".cmd")) or rel == "log/env.txt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compare two run.sh output trees (see the module docstring).")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--max-diff-lines", type=int, default=12, help="diff lines shown per file (default 12)")
    ap.add_argument("--ignore-messages", action="store_true", help="exit 0 when only messages/exit codes differ")
    args = ap.parse_args(argv)
    A, B = Path(args.a), Path(args.b)
    for p in (A, B):
        if not (p / "log").is_dir():
            print(f"compare.py: {p} is not a run.sh output (no log/)", file=sys.stderr)
            return 2
    ra, rb = Roots(A), Roots(B)
    fa, da = listing(A)
    fb, db = listing(B)
    missing, extra = sorted(fa - fb), sorted(fb - fa)
    dmissing, dextra = sorted(da - db), sorted(db - da)

    identical, equivalent, outputs, messages = 0, {}, {}, {}
    for rel in sorted(fa & fb):
        pa, pb = A / rel, B / rel
        if pa.read_bytes() == pb.read_bytes():
            identical += 1
            continue
        diffs = comparator(rel)(pa, pb, ra, rb, args.max_diff_lines)
        if not diffs:
            equivalent.setdefault(Path(rel).suffix or rel, []).append(rel)
            continue
        if len(diffs) == 1 and diffs[0].startswith("EQUIV: "):
            equivalent.setdefault(Path(rel).suffix, []).append(rel)
            continue
        (messages if is_message(rel) else outputs)[rel] = diffs

    # rc files as one table
    rc_changes = []
    for rel in sorted(r for r in messages if r.endswith(".rc")):
        rc_changes.append((rel[4:-3], (A / rel).read_text().strip(), (B / rel).read_text().strip()))

    total = len(fa | fb)
    print(f"compare {A}  vs  {B}")
    print(f"files: {total} in all, {len(fa & fb)} on both sides; {identical} byte-identical, "
          f"{sum(map(len, equivalent.values()))} identical after normalization, {len(outputs)} outputs differ, "
          f"{len(messages)} messages/exit codes differ, {len(missing)} missing in B, {len(extra)} extra in B")  # fmt: skip
    if equivalent:
        print("\nidentical after normalization (bytes differ only in volatile fields):")
        for kind, rels in sorted(equivalent.items()):
            print(f"  {kind:<14} {len(rels):4d}  e.g. {rels[0]}")
    if missing or extra or dmissing or dextra:
        print("\n== missing / extra")
        for rel in missing:
            print(f"  missing in B: {rel}")
        for rel in extra:
            print(f"  extra in B:   {rel}")
        for rel in dmissing:
            print(f"  directory missing in B: {rel}/")
        for rel in dextra:
            print(f"  directory extra in B:   {rel}/")
    if outputs:
        print(f"\n== OUTPUT DIFFERENCES ({len(outputs)} files)")
        for rel, diffs in outputs.items():
            print(f"-- {rel}")
            for d in diffs:
                print(f"     {d}")
    if messages:
        print(f"\n== messages / exit codes ({len(messages)} files)")
        if rc_changes:
            print("  exit codes:")
            for name, x, y in rc_changes:
                print(f"    {name:<30} {x} -> {y}")
        for rel, diffs in messages.items():
            if rel.endswith(".rc"):
                continue
            print(f"-- {rel}")
            for d in diffs:
                print(f"     {d}")
    out_same = not (outputs or missing or extra or dmissing or dextra)
    if out_same and not messages:
        print("\nRESULT: IDENTICAL")
        return 0
    if out_same:
        print("\nRESULT: outputs identical; messages/exit codes differ")
        return 0 if args.ignore_messages else 3
    print("\nRESULT: OUTPUTS DIFFER")
    return 1


if __name__ == "__main__":
    sys.exit(main())
