#!/usr/bin/env bash
# Run `ermoe study` with its methods split across N worker processes (one GPU or many cores), then the final pass
# that reuses every finished run and writes the report. Extra arguments go to every `ermoe study` call, e.g.
#   benchmarks/study_parallel.sh 4 --out_dir=runs/study-h100 --report=docs/results_h100.md
#   STUDY_METHODS="ermoe switch" benchmarks/study_parallel.sh 2 --quick
# Each worker trains whole runs (a method's seeds); the report's wall time is the sum of the runs' own times.
set -euo pipefail
workers=${1:?usage: study_parallel.sh N_WORKERS [ermoe study arguments]}
shift
ermoe=${ERMOE:-ermoe}
# Split the cores between the workers: oversubscribed BLAS threads make the whole study several times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 1 ? $(nproc) / workers : 1 ))}
# STUDY_METHODS="a b c" runs those methods only (default: the study's own, from --config / --methods / defaults)
methods=${STUDY_METHODS:-$($ermoe study "$@" --list-methods)}
read -ra all <<<"$methods"
only=()
if [[ -n ${STUDY_METHODS:-} ]]; then only=("--methods=[$(IFS=,; echo "${all[*]}")]"); fi
pids=()
for ((w = 0; w < workers; w++)); do
  mine=()
  for ((i = w; i < ${#all[@]}; i += workers)); do mine+=("${all[i]}"); done
  ((${#mine[@]})) || continue
  list=$(IFS=,; echo "${mine[*]}")
  $ermoe study "$@" "--methods=[$list]" "--report=${TMPDIR:-/tmp}/study_worker_$w/results.md" >"${TMPDIR:-/tmp}/study_worker_$w.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if ((status)); then echo "a worker failed: see ${TMPDIR:-/tmp}/study_worker_*.log" >&2; exit 1; fi
$ermoe study "$@" "${only[@]}"
