#!/usr/bin/env bash
# The acceptance runs of issues #11 and #12 on a one-GPU machine, in as few device calls as the
# 600 s limit allows (run from the repository root with .whl/ carried):
#
#     bash scripts/gpu_acceptance.sh                       # bench24 tier2: about 300 s (tier2: 251 s of tests)
#     PIECES=tier4 TIER4_FILES=tests/gpu bash scripts/gpu_acceptance.sh        # the second call: about 440 s
#     PIECES=tier4 TIER4_FILES=tests/multirank bash scripts/gpu_acceptance.sh  # a third, about 60 s
#     PIECES="deadrank sanitizers" bash scripts/gpu_acceptance.sh      # a third
# (Until 2026-12-07 bench24 + tier2 + tier4 fitted one call; with 330 tests tier4 alone takes about
# 310 s of tests plus its MPI shutdown.)
#
# Pieces, in the order given:
#   bench24     bench_intranode.py --sms 24 --iters 40 at 2 ranks (issue #11's four targets)
#   tier2       the whole GPU tier (tests/gpu tests/multirank) at 2 ranks
#   tier4       the same at 4 ranks (TIER4_FILES: a part of it; 2026-12-07 the whole tier at 4 ranks
#               passed 281 tests of tests/gpu in its 420 s, so it takes two calls now)
#   deadrank    the dead-rank tests (each launches its own 2- and 4-rank groups)
#   sanitizers  compute-sanitizer memcheck and synccheck over 12 small low-latency tests, racecheck over 4, 1 rank
#   copies      the direct dispatch's copy paths side by side at 2 ranks, 24 SMs: registers (16 and 8
#               loads in flight), TMA over block ranges, TMA grid-strided, in both orders (one process
#               each), then the copy probe
# Each piece is one scripts/gpu_machine.sh invocation (it starts and stops CUDA MPS for its rank
# count) with its own log folder $OUT/<piece>, and a time limit of its own (the *_S variables
# below), so a slow piece cannot eat the next one's time, and every limit is cut to what is left of
# TOTAL_S (default 580, under the device call's 600), so the summary still prints. It comes last.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_ROOT="${OUT:-$ROOT/out}"
PIECES="${PIECES:-bench24 tier2}"
export SKIP_CPU_TIER=1
declare -a SUMMARY=()
T_START=$(date +%s)
TOTAL_S="${TOTAL_S:-580}"
left() { echo $(( TOTAL_S - ($(date +%s) - T_START) - 30 )); }   # 30 s: a piece's setup, MPS stop, the summary
within() { local l; l=$(( $(left) / ${2:-1} )); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }   # min(limit, time left / n)

piece() {   # piece NAME NUM_RANKS STEPS [VAR=VALUE ...]: one gpu_machine.sh run into $OUT_ROOT/NAME
  local name=$1 ranks=$2 steps=$3; shift 3
  mkdir -p "$OUT_ROOT/$name"
  echo "=== $(date +%T) piece $name ($ranks ranks, steps $steps)"
  env "$@" OUT="$OUT_ROOT/$name" NUM_RANKS="$ranks" bash scripts/gpu_machine.sh "$steps" \
      > "$OUT_ROOT/$name/gpu_machine.log" 2>&1
  # gpu_machine.sh ends with its table; keep the lines after the separator
  SUMMARY+=("--- $name")
  while IFS= read -r line; do SUMMARY+=("$line"); done \
      < <(grep -E "^(FAILED|ERROR) |^bench_intranode rc=" "$OUT_ROOT/$name/gpu_machine.log" | sort -u | head -12;
          grep -E "^COPIES " "$OUT_ROOT/$name/extra.log" 2>/dev/null | head -60)
  while IFS= read -r line; do SUMMARY+=("$line"); done \
      < <(sed -n '/^-----/,$p' "$OUT_ROOT/$name/gpu_machine.log" | sed 1d | grep -v "^mpi launcher\|^CUDA MPS")
}

KNOWN_PIECES="bench24 tier2 tier4 deadrank sanitizers copies"
for v in TOTAL_S BENCH_S TIER2_S TIER4_S DEADRANK_S SAN_S RACE_S COPIES_S; do   # `timeout 0` would mean no limit at all
  [[ -z "${!v:-}" || "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$v=${!v}: a limit must be a whole number of seconds >= 1 (drop a piece from PIECES to skip it)"; exit 2; }
done
for p in $PIECES; do   # every name first: a typo must not cost a device call's earlier pieces
  [[ " $KNOWN_PIECES " == *" $p "* ]] || { echo "unknown piece $p ($KNOWN_PIECES)"; exit 2; }
done
for p in $PIECES; do
  if [ "$(left)" -lt 45 ]; then SUMMARY+=("--- $p: not run, TOTAL_S=$TOTAL_S spent"); continue; fi
  case "$p" in
    bench24)
      piece bench24 2 extra \
          EXTRA='timeout -k 10 '"$(within "${BENCH_S:-120}")"' $MPIRUN -n 2 $PY scripts/bench_intranode.py --sms 24 --iters 40 > $OUTD/bench_intranode.log 2>&1; echo "bench_intranode rc=$?"' ;;
    tier2) piece tier2 2 tests TIER_LIMIT_S="$(within "${TIER2_S:-320}")" ;;
    copies)   # about 90 s: two benches of 4 kernels (30 - 35 s each) and the probe (15 s); the rows
      # come back prefixed "COPIES " (the piece's summary keeps those lines)
      lim=$(within "${COPIES_S:-150}" 3)
      piece copies 2 extra \
          EXTRA='for k in direct,direct-registers8,direct-tma,direct-tma-grid direct-tma-grid,direct-tma,direct-registers8,direct; do f=$OUTD/bench_${k//,/_}.log; timeout -k 10 '"$lim"' $MPIRUN -n 2 $PY scripts/bench_intranode.py --sms 24 --iters 40 --no-nccl --dispatch-kernels $k > $f 2>&1; echo "bench_intranode rc=$? ($k)"; echo "COPIES order $k"; grep -E "^ +24 " $f | cut -c1-96 | sed "s/^/COPIES /"; done; (cd scripts && timeout -k 10 '"$lim"' $PY bench_copy_paths.py --iters 12 --perm identity 2>&1 | grep -E "tma 2x8|tma 4x8|regs16 |regs8 " | sed "s/^/COPIES probe /")' ;;
    tier4) piece tier4 4 tests TIER_LIMIT_S="$(within "${TIER4_S:-480}")" TIER_FILES="${TIER4_FILES:-tests/gpu tests/multirank}" ;;
    deadrank) piece deadrank 2 deadrank DEADRANK_LIMIT_S="$(within "${DEADRANK_S:-260}")" ;;
    # memcheck and synccheck: one small routing per mode, the receive hook and graph replay, on both
    # transports (12 tests). racecheck, far slower (2026-12-07: the 56-case routings test alone took
    # it past 100 s), gets the small routings on the NVLink transport and RACE_S. One rank, no MPS.
    # Budget: memcheck and synccheck a third of what is left each (at most SAN_S), racecheck what the
    # two leave (at most RACE_S), less their kill grace (10 s) and pause (2 s); under 30 s it is dropped.
    sanitizers)
      san=$(within "${SAN_S:-100}" 3)
      race=$(( $(left) - 2 * (san + 12) - 12 ))
      [ "$race" -gt "${RACE_S:-160}" ] && race=${RACE_S:-160}
      tools="memcheck synccheck racecheck"
      if [ "$race" -lt 30 ]; then tools="memcheck synccheck"; SUMMARY+=("--- racecheck: not run, too little of TOTAL_S left"); fi
      piece sanitizers 1 reliability REL_RANKS= AGREE_REPEATS=0 SAN_TOOLS="$tools" SAN_LIMIT_S="$san" \
          SAN_RACE_LIMIT_S="$race" \
          SAN_K="${SAN_K:-small_case_per_mode or recv_hook or cuda_graph_replay}" \
          SAN_K_RACECHECK="${SAN_K_RACECHECK:-small_case_per_mode and nvlink}" ;;
  esac
done

echo "==============================================================================="
for line in "${SUMMARY[@]}"; do echo "$line"; done
for name in $PIECES; do
  if [ -f "$OUT_ROOT/$name/tier_files.txt" ]; then
    awk '$1 == "rank" && $2 == "0"' "$OUT_ROOT/$name/tier_files.txt" | sed "s/^/$name /"
  fi
done
