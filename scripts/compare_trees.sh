#!/usr/bin/env bash
# Old and new code timed side by side in ONE device call, rounds interleaved, so that both meet the
# same machine, card and moment (the one-GPU proxy's medians move 5 - 10% from run to run).
#
#   here:  bash scripts/compare_trees.sh build DIR NAME=REV [NAME=REV ...]
#            git archive of each REV into DIR/NAME; .whl/ goes into the first (it runs the machine)
#   there (carry DIR):
#          cd DIR/<first> && TREES="NAME NAME ..." bash scripts/compare_trees.sh run
#
# run: ROUNDS rounds (default 3) of, for each tree in turn, bench_intranode.py --sms 24 --iters 40
# --no-nccl --dispatch-kernels direct (INTRA=0 skips it) and, with LL=1, bench_low_latency.py --iters
# 100 (on the trees in LL_TREES, default all); all within CMP_S seconds (default 240), 2 ranks under
# MPS (scripts/gpu_machine.sh extra).
# Then a table: one row per operation, one column per tree, the median of each round.
# TESTS_TREE=NAME TESTS_S=N: that tree's GPU test files TEST_FILES (default the intranode and
# internode files) at 2 ranks afterwards, N seconds at most.
set -u
MODE="${1:-}"

if [ "$MODE" = build ]; then
  DIR="${2:?build DIR NAME=REV ...}"; shift 2
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  first=""
  for spec in "$@"; do
    name="${spec%%=*}"; rev="${spec#*=}"
    [[ "$spec" == *=* && -n "$name" && -n "$rev" ]] || { echo "expected NAME=REV, got $spec"; exit 2; }
    rm -rf "${DIR:?}/$name"; mkdir -p "$DIR/$name"
    git -C "$REPO" archive "$rev" | tar -x -C "$DIR/$name" || { echo "git archive $rev failed"; exit 2; }
    echo "$DIR/$name <- $rev ($(git -C "$REPO" rev-parse --short "$rev"))"
    [ -z "$first" ] && first="$name"
  done
  [ -n "$first" ] || { echo "no trees given"; exit 2; }
  if [ -d "$REPO/.whl" ]; then cp -r "$REPO/.whl" "$DIR/$first/.whl"; else echo "warning: no .whl/ to carry"; fi
  du -sh "$DIR"
  exit 0
fi

[ "$MODE" = run ] || { echo "usage: compare_trees.sh build DIR NAME=REV ... | run (see the header)"; exit 2; }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
O="${OUT:-$ROOT/out}"; mkdir -p "$O"
export TREES="${TREES:?TREES: the tree names, siblings of this one}" ROUNDS="${ROUNDS:-3}"
export INTRA="${INTRA:-1}" LL="${LL:-0}" LL_TREES=" ${LL_TREES:-$TREES} " SKIP_CPU_TIER=1
for t in $TREES; do [ -d "$ROOT/../$t/deepep_cupy" ] || { echo "no tree $ROOT/../$t"; exit 2; }; done
# evaluated inside gpu_machine.sh, where ROOT, SITE, MPIRUN, PY and OUTD are set
export EXTRA='
for round in $(seq 1 $ROUNDS); do
  for t in $TREES; do D=$ROOT/../$t
    if [ "$INTRA" = 1 ]; then
      (cd $D && PYTHONPATH="$D:$SITE/py" timeout -k 5 60 $MPIRUN -n 2 $PY scripts/bench_intranode.py --sms 24 \
          --iters 40 --no-nccl --dispatch-kernels direct > $OUTD/bi_${t}_$round.log 2>&1; echo "bench_intranode $t round $round rc=$?")
    fi
    if [ "$LL" = 1 ] && [[ "$LL_TREES" == *" $t "* ]]; then
      (cd $D && PYTHONPATH="$D:$SITE/py" timeout -k 5 70 $MPIRUN -n 2 $PY scripts/bench_low_latency.py \
          --iters 100 > $OUTD/bl_${t}_$round.log 2>&1; echo "bench_low_latency $t round $round rc=$?")
    fi
  done
done'
OUT="$O/compare" NUM_RANKS=2 timeout -k 5 "${CMP_S:-240}" bash scripts/gpu_machine.sh extra > "$O/compare.log" 2>&1
grep -E "^bench_(intranode|low_latency) .* rc=" "$O/compare.log"
python3 "$ROOT/scripts/compare_table.py" "$O/compare" $TREES
if [ -n "${TESTS_TREE:-}" ] && [ "${TESTS_S:-0}" -gt 0 ]; then
  cd "$ROOT/../$TESTS_TREE" || exit 2
  [ -d .whl ] || cp -r "$ROOT/.whl" .whl
  OUT="$O/tests_$TESTS_TREE" NUM_RANKS=2 TIER_LIMIT_S="$TESTS_S" \
      TIER_FILES="${TEST_FILES:-tests/gpu/test_intranode_gpu.py tests/gpu/test_internode_gpu.py}" \
      bash scripts/gpu_machine.sh tests 2>&1 | tail -8
fi
