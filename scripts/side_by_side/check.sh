#!/usr/bin/env bash
# The side-by-side behaviour check: the same deterministic set of commands (run.sh) on the tree at BASE and on
# this working tree, every output compared (compare.py). Use it for a change that must not alter behaviour.
#
#   scripts/side_by_side/check.sh [BASE] [WORK]        (make side-by-side BASE=<rev>)
#
# BASE: a git revision (default HEAD: the uncommitted change against the last commit). WORK: where both trees'
# outputs go (default $TMPDIR/mcloss-side-by-side, replaced). About 6 minutes per tree on 2 CPU cores.
# Exit status: compare.py's (0 identical, 1 outputs differ, 3 only messages or exit codes differ).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd -P)
ROOT=$(git -C "$HERE" rev-parse --show-toplevel)
BASE=${1:-HEAD}
WORK=${2:-${TMPDIR:-/tmp}/mcloss-side-by-side}
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "check.sh: $PY is missing; run 'make test-fast' (or the README's set-up) first" >&2; exit 2; }

rm -rf -- "$WORK"
mkdir -p "$WORK/base"
git -C "$ROOT" archive --format=tar "$BASE" | tar -x -C "$WORK/base"

# The project's venv imports its editable mcloss from ROOT whatever PYTHONPATH says; the base tree runs in a
# venv that sees the same packages through a .pth line (a plain path: the editable finder is not loaded).
python3 -m venv "$WORK/venv"
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$base_site/mcloss-project-packages.pth"

echo "side-by-side: $BASE → $WORK/before" >&2
bash "$HERE/run.sh" "$WORK/base" "$WORK/venv/bin/python" "$WORK/before" >&2
echo "side-by-side: working tree → $WORK/after" >&2
bash "$HERE/run.sh" "$ROOT" "$PY" "$WORK/after" >&2
"$PY" "$HERE/compare.py" "$WORK/before" "$WORK/after"
