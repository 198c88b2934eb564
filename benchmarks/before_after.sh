#!/usr/bin/env bash
# `make demo` and `make test` at two commits, side by side: ROUNDS rounds, the order of the
# two swapped every other round, each run from a clean tree (git clean -xdf, keeping .venv
# and node_modules) and a fresh PREFECT_HOME. Prints the medians and their ratio.
#
#   bash benchmarks/before_after.sh 077f103 b920214        # issue 22 (about 2 hours)
#   bash benchmarks/before_after.sh --summary WORK/times.tsv  # the table again
#
# WORK (default /tmp/before-after) gets two clones of this repository, `before` and `after`,
# set up with `make setup node_modules`, a log per run in WORK/logs and WORK/times.tsv.
set -u
summary() {
  python3 - "$1" <<'PY'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]), delimiter="\t") if r.get("target")]
print(f"{'target':<8}{'before: runs (s)':<28}{'median':>8}   {'after: runs (s)':<28}{'median':>8}{'ratio':>8}")
for t in dict.fromkeys(r["target"] for r in rows):
    got = {c: [float(r["seconds"]) for r in rows if r["target"] == t and r["commit"] == c]
           for c in ("before", "after")}
    med = {c: statistics.median(v) for c, v in got.items()}
    runs = {c: " ".join(f"{x:.0f}" for x in v) for c, v in got.items()}
    print(f"{t:<8}{runs['before']:<28}{med['before']:>8.0f}   {runs['after']:<28}"
          f"{med['after']:>8.0f}{med['after'] / med['before']:>8.3f}")
PY
}
if [ "${1:-}" = "--summary" ]; then summary "$2"; exit; fi
BEFORE=$1 AFTER=$2 ROUNDS=${ROUNDS:-3} WORK=${WORK:-/tmp/before-after}
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
mkdir -p "$WORK/logs" && cd "$WORK"
for c in "before:$BEFORE" "after:$AFTER"; do
  n=${c%%:*}
  [ -d $n ] || { git clone -q "$REPO" $n && git -C $n checkout -q "${c#*:}" && (cd $n && make setup node_modules >/dev/null) || exit 1; }
done
out=$WORK/times.tsv
echo -e "round\ttarget\tcommit\tseconds\trc\tload1_before\tload1_after\tsummary" > $out
for round in $(seq 1 $ROUNDS); do
  if [ $((round % 2)) = 0 ]; then order="after before"; else order="before after"; fi
  for target in demo test; do
    for n in $order; do
      (cd $n && git clean -xdfq -e .venv -e node_modules && git checkout -q .)
      export PREFECT_HOME=$(mktemp -d /tmp/before-after-prefect-XXXX)
      l0=$(cut -d' ' -f1 /proc/loadavg)
      t0=$(date +%s.%N)
      (cd $n && make $target) > logs/$round-$target-$n.log 2>&1
      rc=$?
      t1=$(date +%s.%N)
      l1=$(cut -d' ' -f1 /proc/loadavg)
      s=$(grep -E "passed|failed|test accuracy|champion" logs/$round-$target-$n.log | tail -1 | tr '\t' ' ' | cut -c1-120)
      echo -e "$round\t$target\t$n\t$(echo "$t1 - $t0" | bc)\t$rc\t$l0\t$l1\t$s" >> $out
      rm -rf "$PREFECT_HOME"
    done
  done
done
summary $out
