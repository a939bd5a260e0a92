#!/usr/bin/env bash
# Side-by-side behaviour check of mcloss: run a fixed, deterministic set of `python -m mcloss` commands from
# the source tree TREE with the interpreter PYTHON, writing every output under OUT.
#
#   scripts/side_by_side/run.sh TREE PYTHON OUT      (scripts/side_by_side/check.sh runs it on two trees)
#
# Layout of OUT: synth/, export/, parts/, eval/, train/, atlas/, sanity/, errors/ (outputs of error cases),
# inputs/ (inputs made here), log/<step>.{cmd,rc,out,err} for every step, log/env.txt, log/timings.tsv
# (wall time per step; ignored by compare.py).  Compare two OUT trees with compare.py A B.
set -u -o pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 TREE PYTHON OUT" >&2
    exit 2
fi
TREE=$(cd "$1" && pwd -P) || { echo "run.sh: no tree $1" >&2; exit 2; }
PY=$2
OUT=$3
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
if [ -e "$OUT" ]; then
    if [ -f "$OUT/log/meta.env" ]; then
        rm -rf -- "$OUT"          # a previous run.sh output: replaced
    elif [ -n "$(ls -A "$OUT")" ]; then
        echo "run.sh: $OUT exists, is not empty and is not a run.sh output; refusing to touch it" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
LOG=$OUT/log
mkdir -p "$LOG"

# ---------------------------------------------------------------------------------------------- environment
for v in $(env | sed -n 's/^\(MCLOSS_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT MPLBACKEND TORCH_DEVICE 2>/dev/null || true
export PYTHONPATH="$TREE"          # the before tree is found through PYTHONPATH; harmless for the editable after tree
export PYTHONHASHSEED=0
export CUDA_VISIBLE_DEVICES=""     # CPU only, even where --device auto would pick CUDA
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1   # single-threaded numerics (steps may override)
export TZ=UTC LC_ALL=C.UTF-8 LANG=C.UTF-8
export PYTHONDONTWRITEBYTECODE=1   # no __pycache__ written into TREE
export TQDM_DISABLE=1
export COLUMNS=100 LINES=50      # argparse wraps --help and usage to the terminal width
export MPLCONFIGDIR="${TMPDIR:-/tmp}/mcloss-side-by-side-mplconfig"   # matplotlib's font cache, shared by runs, outside OUT
mkdir -p "$MPLCONFIGDIR"
cd "$TREE" || exit 2

{
    echo "TREE=$TREE"
    echo "OUT=$OUT"
    echo "PYTHON=$PY"
} > "$LOG/meta.env"

# The interpreter must import mcloss from TREE.
"$PY" - > "$LOG/env.txt" 2> "$LOG/env.err" <<'EOF'
import sys, os, mcloss, torch, numpy
print("mcloss", os.path.realpath(mcloss.__file__))
print("python", sys.version.split()[0])
print("torch", torch.__version__, "threads", torch.get_num_threads())
print("numpy", numpy.__version__)
EOF
if ! grep -q "^mcloss $TREE/mcloss/__init__.py\$" "$LOG/env.txt"; then
    echo "run.sh: $PY does not import mcloss from $TREE:" >&2
    cat "$LOG/env.txt" "$LOG/env.err" >&2
    exit 2
fi

printf 'step\trc\tseconds\n' > "$LOG/timings.tsv"
T0=$(date +%s.%N)

# finished NAME RC T0: record a step's exit code and wall time (log/NAME.rc, log/timings.tsv, a line on stderr)
finished() {
    local secs
    secs=$(awk "BEGIN { print $(date +%s.%N) - $3 }")
    echo "$2" > "$LOG/$1.rc"
    printf '%s\t%s\t%.1f\n' "$1" "$2" "$secs" >> "$LOG/timings.tsv"
    printf '%-28s rc=%-3s %6.1f s\n' "$1" "$2" "$secs" >&2
}

# step NAME ARGS...: run `PYTHON -m mcloss ARGS` from TREE; stdout, stderr, exit code and the command line go to
# log/NAME.{out,err,rc,cmd}. THREADS=N before `step` sets OMP/MKL threads for that step.
step() {
    local name=$1
    shift
    local threads=${THREADS:-1}
    printf '%q ' mcloss "$@" > "$LOG/$name.cmd"
    echo >> "$LOG/$name.cmd"
    [ "$threads" != 1 ] && echo "# OMP_NUM_THREADS=$threads" >> "$LOG/$name.cmd"
    local t0
    t0=$(date +%s.%N)
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$PY" -m mcloss "$@" > "$LOG/$name.out" 2> "$LOG/$name.err" < /dev/null
    finished "$name" $? "$t0"
}

# step_py NAME ARGS...: like step, but runs `PYTHON ARGS` (a script on stdin with `-`)
step_py() {
    local name=$1
    shift
    printf '%q ' python "$@" > "$LOG/$name.cmd"
    echo >> "$LOG/$name.cmd"
    local t0
    t0=$(date +%s.%N)
    "$PY" "$@" > "$LOG/$name.out" 2> "$LOG/$name.err"
    finished "$name" $? "$t0"
}

# snapshot NAME DIR: copy the small bookkeeping files of an export folder (they are rewritten by the next run)
snapshot() {
    local dest=$OUT/export/snapshots/$1
    mkdir -p "$dest"
    for f in manifest.json index.csv errors.csv; do
        [ -f "$2/$f" ] && cp "$2/$f" "$dest/$f"
    done
    (cd "$2" && find . -type f | LC_ALL=C sort) > "$dest/files.txt"
}

S=$OUT/synth
E=$OUT/export
ERR=$OUT/errors
IMG=checkpoints/samples/images
CKPT=checkpoints/default.safetensors
CE=checkpoints/ce-baseline.safetensors
CPU=(--device cpu)

# ------------------------------------------------------------------------------------------------- top level
step cli_version --version
step cli_usage
step cli_unknown nosuch
# every command's --help, in one process (a torch import per command would cost ~40 s)
step_py help_all - <<'EOF_PY'
import contextlib, io, sys
from mcloss.cli import COMMANDS, main
for name in COMMANDS:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([name, "--help"])
    print(f"===== mcloss {name} --help (rc {rc})")
    print(buf.getvalue())
EOF_PY

# ----------------------------------------------------------------------------------------------------- synth
# single (default design): 3 classes, the training set
step synth_single synth --out "$S/single" --classes 3 --per-class 4 --size 96 --seed 3
# varied: the default checkpoint's 12 classes; parts, eval, atlas, sanity and the label export read it
step synth_varied synth --out "$S/varied" --classes 12 --per-class 4 --size 224 --seed 5 --design varied --workers 2
# combo with every other option changed
step synth_combo synth --out "$S/combo" --classes 5 --per-class 3 --size 128 --seed 11 --design combo \
    --test-fraction 0.34 --jpeg-quality 75 --object-scale 0.8
# a re-run into a previous synth output (other seed), and an unusable one
step synth_rerun_a synth --out "$S/rerun" --classes 2 --per-class 2 --size 64 --seed 1
step synth_rerun_b synth --out "$S/rerun" --classes 2 --per-class 3 --size 64 --seed 2
mkdir -p "$ERR/synth_notempty" && echo "keep me" > "$ERR/synth_notempty/notes.txt"
step err_synth_notempty synth --out "$ERR/synth_notempty" --classes 2 --per-class 2 --size 64
step err_synth_classes synth --out "$ERR/synth_classes" --classes 1 --per-class 2 --size 64

# ---------------------------------------------------------------------------------------------------- export
# defaults, with the default DataLoader workers (2) and two torch threads (the CPU lanes path)
THREADS=2 step export_defaults export --input "$IMG" --out "$E/defaults" "${CPU[@]}" --no-progress
step export_maps_top2 export --input "$IMG" --out "$E/maps_top2" "${CPU[@]}" --no-progress --workers 0 \
    --maps channels,gradcam,channel_gradcam,guided --target top2
step export_compare export --input "$IMG" --out "$E/compare" "${CPU[@]}" --no-progress \
    --compare "$CE" --shared-scale
step export_no_montage export --input "$IMG" --out "$E/no_montage" "${CPU[@]}" --no-progress --workers 0 --no-montage
step export_style export --input "$IMG" --out "$E/style" "${CPU[@]}" --no-progress --workers 0 \
    --colormap viridis --alpha 0.3 --tile-height 160 --topk 3 --batch-size 5
step export_jet export --input "$IMG/0001_Common_Bird.jpg" "$IMG/0126_Forked_Tail_Pink_Belly.jpg" --out "$E/jet" \
    "${CPU[@]}" --no-progress --workers 0 --colormap jet --alpha 1 --tile-height 64 --target pred_mc --shared-scale
step export_captum export --input "$IMG/0001_Common_Bird.jpg" "$IMG/005*.jpg" --out "$E/captum" "${CPU[@]}" \
    --no-progress --workers 0 --method captum --maps channels,gradcam,channel_gradcam
step export_class_name export --input "$IMG/0026_Orange_Head_Pink_Belly.jpg" "$IMG/0101_Teal_Beak_Striped_Wing.jpg" \
    --out "$E/class_name" "${CPU[@]}" --no-progress --workers 0 --target Teal_Beak_Striped_Wing
step export_class_index export --input "$IMG/02*.jpg" --out "$E/class_index" "${CPU[@]}" --no-progress \
    --workers 0 --target 5 --batch-size 3
# CUB layout: targets from the labels, defining-part figures from the synth annotations
step export_synth_label export --input "$S/varied/images/003.Striped_Wing_Forked_Tail" \
    "$S/varied/images/008.Teal_Beak_Pink_Belly" "$S/varied/images/001.Common_Bird/Common_Bird_00001.jpg" \
    --out "$E/synth_label" "${CPU[@]}" --no-progress --workers 0 --target label --maps channels,gradcam,channel_gradcam
# shards written by separate jobs, then merged
step export_shard0 export --input "$IMG/01*.jpg" --out "$E/shards" "${CPU[@]}" --no-progress --workers 0 --shard 0/2
step export_shard1 export --input "$IMG/01*.jpg" --out "$E/shards" "${CPU[@]}" --no-progress --workers 0 --shard 1/2
step export_merge export --merge "$E/shards"
# re-runs into an existing folder: all skipped; then other options (re-done, stale files removed)
R=$E/rerun
step export_rerun_1 export --input "$IMG/02*.jpg" --out "$R" "${CPU[@]}" --no-progress --workers 0
snapshot rerun_1 "$R"
step export_rerun_2_same export --input "$IMG/02*.jpg" --out "$R" "${CPU[@]}" --no-progress --workers 0
snapshot rerun_2 "$R"
step export_rerun_3_top2 export --input "$IMG/02*.jpg" --out "$R" "${CPU[@]}" --no-progress --workers 0 --target top2
snapshot rerun_3 "$R"
step export_rerun_4_nomontage export --input "$IMG/02*.jpg" "$IMG/0001_Common_Bird.jpg" --out "$R" "${CPU[@]}" \
    --no-progress --workers 0 --no-montage
snapshot rerun_4 "$R"
# bad inputs: a truncated jpg, a jpg that is text, an empty file, a non-image (ignored), a missing path,
# a glob matching nothing, beside two good images (one in a subfolder)
BAD=$OUT/inputs/bad
mkdir -p "$BAD/sub"
cp "$IMG/0001_Common_Bird.jpg" "$BAD/good.jpg"
cp "$IMG/0276_Orange_Head_Striped_Wing.jpg" "$BAD/sub/good2.jpeg"
head -c 2000 "$IMG/0002_Common_Bird.jpg" > "$BAD/truncated.jpg"
printf 'this is not a jpeg\n' > "$BAD/corrupt.jpg"
: > "$BAD/empty.jpg"
printf 'notes\n' > "$BAD/notes.txt"
step export_bad_inputs export --input "$BAD" "$OUT/inputs/missing.jpg" "$OUT/inputs/nomatch*.png" \
    --out "$E/bad_inputs" "${CPU[@]}" --no-progress --workers 0
step export_bad_inputs_workers export --input "$BAD" --out "$E/bad_inputs_workers" "${CPU[@]}" --no-progress
step export_label_no_cub export --input "$IMG/0001_Common_Bird.jpg" "$IMG/0002_Common_Bird.jpg" \
    --out "$E/label_no_cub" "${CPU[@]}" --no-progress --workers 0 --target label

# error cases (usage errors: exit 2, one line on stderr)
head -c 4096 /dev/zero | tr '\0' 'x' > "$OUT/inputs/corrupt.safetensors"
printf '\x10\x00\x00\x00\x00\x00\x00\x00{"a":1}        ' > "$OUT/inputs/badheader.safetensors"
ONE=("$IMG/0001_Common_Bird.jpg")
step err_export_missing_ckpt export --input "${ONE[@]}" --out "$ERR/x1" "${CPU[@]}" --checkpoint "$OUT/inputs/none.safetensors"
MCLOSS_CHECKPOINT="$OUT/inputs/none.safetensors" step err_export_env_ckpt export --input "${ONE[@]}" --out "$ERR/x2" "${CPU[@]}"
step err_export_corrupt_ckpt export --input "${ONE[@]}" --out "$ERR/x3" "${CPU[@]}" --checkpoint "$OUT/inputs/corrupt.safetensors"
step err_export_badheader_ckpt export --input "${ONE[@]}" --out "$ERR/x4" "${CPU[@]}" --checkpoint "$OUT/inputs/badheader.safetensors"
step err_export_maps export --input "${ONE[@]}" --out "$ERR/x5" "${CPU[@]}" --maps channels,bogus
step err_export_target_topk export --input "${ONE[@]}" --out "$ERR/x6" "${CPU[@]}" --target top0
step err_export_target_name export --input "${ONE[@]}" --out "$ERR/x7" "${CPU[@]}" --target NoSuchBird
step err_export_target_index export --input "${ONE[@]}" --out "$ERR/x8" "${CPU[@]}" --target 99
step err_export_alpha export --input "${ONE[@]}" --out "$ERR/x9" "${CPU[@]}" --alpha 2
step err_export_colormap export --input "${ONE[@]}" --out "$ERR/x10" "${CPU[@]}" --colormap nosuch
step err_export_tile export --input "${ONE[@]}" --out "$ERR/x11" "${CPU[@]}" --tile-height 8
step err_export_shard export --input "${ONE[@]}" --out "$ERR/x12" "${CPU[@]}" --shard 2/2
step err_export_no_out export --input "${ONE[@]}" "${CPU[@]}"
step err_export_merge_input export --merge "$E/shards" --input "${ONE[@]}"
step err_export_compare_missing export --input "${ONE[@]}" --out "$ERR/x13" "${CPU[@]}" --compare "$OUT/inputs/none.safetensors"
step err_export_alpha_type export --input "${ONE[@]}" --out "$ERR/x14" "${CPU[@]}" --alpha high

# ----------------------------------------------------------------------------------------------------- parts
step parts_default parts --data "$S/varied" --out "$OUT/parts/default" "${CPU[@]}" --limit 12 --steps 4 --batch-size 8
step parts_baseline parts --data "$S/varied" --out "$OUT/parts/baseline" "${CPU[@]}" --baseline "$CE" \
    --no-faithfulness --split train --radius 0.1 --size-reference diagonal --topk-percent 5 --limit 10 --seed 3
step parts_mean_fill parts --data "$S/varied" --out "$OUT/parts/mean_fill" "${CPU[@]}" --limit 4 --steps 3 \
    --deletion-fill mean --perturbation-batch 5 --size-reference sqrt-area --split all
step err_parts_exists parts --data "$S/varied" --out "$OUT/parts/default" "${CPU[@]}" --limit 2
step err_parts_no_parts parts --data "$OUT/inputs/bad" --out "$ERR/parts_no_parts" "${CPU[@]}" --limit 2
step err_parts_radius parts --data "$S/varied" --out "$ERR/parts_radius" "${CPU[@]}" --radius 0
step err_parts_old_baseline parts --data "$S/varied" --out "$ERR/parts_old_baseline" "${CPU[@]}" --baseline mean

# ----------------------------------------------------------------------------------------------------- train
TINY=(--backbone resnet18 --xi 2 --batch-size 4 --img-size 32 --lr 0.01 --workers 0 --device cpu --seed 1)
step train_mc train --data "$S/single" --out "$OUT/train/mc" --epochs 2 "${TINY[@]}"
step train_mc_resume train --out "$OUT/train/mc" --resume --epochs 3
step train_variant train --data "$S/combo" --out "$OUT/train/variant" --epochs 2 --backbone resnet18 --last-stage 3 \
    --xi 2 --batch-size 5 --img-size 48 --optimizer adamw --schedule cosine --lr 0.001 --div-warmup 1 \
    --dis-topk 0.25 --dis-topk-from 1 --normalization imagenet --workers 0 --device cpu --seed 2
step train_ce train --data "$S/single" --out "$OUT/train/ce" --epochs 1 --loss ce --limit-batches 1 "${TINY[@]}"
step err_train_no_data train --out "$ERR/train_no_data" --epochs 1
step err_train_resume_none train --out "$ERR/train_resume_none" --resume
step err_train_finished train --data "$S/single" --out "$OUT/train/ce" --epochs 1 --loss ce --limit-batches 1 "${TINY[@]}"
step err_train_xi train --data "$S/single" --out "$ERR/train_xi" --epochs 1 --xi many

# ------------------------------------------------------------------------------------------------------ eval
step eval_default eval --checkpoint "$CKPT" --data "$S/varied" "${CPU[@]}" --workers 0 --json "$OUT/eval/default.json"
step eval_trained eval --checkpoint "$OUT/train/mc/best.safetensors" --data "$S/single" "${CPU[@]}" --batch-size 5 \
    --json "$OUT/eval/trained.json"
step err_eval_mismatch eval --checkpoint "$CKPT" --data "$S/single" "${CPU[@]}" --workers 0
step err_eval_missing eval --checkpoint "$OUT/inputs/none.safetensors" --data "$S/single" "${CPU[@]}"
step err_eval_corrupt eval --checkpoint "$OUT/inputs/corrupt.safetensors" --data "$S/single" "${CPU[@]}"

# ----------------------------------------------------------------------------------------------------- atlas
step atlas atlas --data "$S/varied" --out "$OUT/atlas/classes" --top 4 --classes 1 Striped_Wing_Forked_Tail \
    --workers 0 --no-progress "${CPU[@]}"
step atlas_resume atlas --data "$S/varied" --out "$OUT/atlas/classes" --top 4 --classes 1 Striped_Wing_Forked_Tail \
    --workers 0 --no-progress "${CPU[@]}"
step atlas_all atlas --data "$S/varied" --out "$OUT/atlas/all" --top 2 --no-stability --split train --batch-size 7 \
    --radius 0.2 --patch 0.3 --no-progress "${CPU[@]}"
step err_atlas_class atlas --data "$S/varied" --out "$ERR/atlas_class" --classes NoSuchBird --no-progress "${CPU[@]}"

# ---------------------------------------------------------------------------------------------------- sanity
step sanity sanity --data "$S/varied" --out "$OUT/sanity/default" --limit 6 --draws 2 "${CPU[@]}"
step sanity_ce sanity --checkpoint "$CE" --data "$S/varied" --out "$OUT/sanity/ce" --limit 3 --draws 1 --seed 4 \
    --batch-size 2 --split train "${CPU[@]}"
step err_sanity_limit sanity --data "$S/varied" --out "$ERR/sanity_limit" --limit 0 "${CPU[@]}"

T1=$(date +%s.%N)
printf 'total\t-\t%.1f\n' "$(awk "BEGIN { print $T1 - $T0 }")" >> "$LOG/timings.tsv"
printf 'run.sh: done in %.0f s → %s\n' "$(awk "BEGIN { print $T1 - $T0 }")" "$OUT" >&2
