#!/usr/bin/env bash
# Every GPU figure from one command, for a GPU lent for a few minutes. From the repository root:
#
#     bench/gpu_check.sh [bench/trainer_gpu.py flags, e.g. --configs recipe] > gpu.jsonl
#
# In order, each under its own time limit (together under 8 minutes, kill grace included):
#   nvidia-smi   the card's name, memory and driver, one JSON line per GPU             15 s
#   pytest       tests/trainer/test_gpu.py, a quick CUDA correctness check, if present  90 s
#   bench        bench/trainer_gpu.py, the default configurations                      330 s
# Every JSON line goes to stdout (the bench's carry the card's name as "device"); anything else
# (pytest's report, the bench's summary and warnings) goes to stderr. A step that fails or runs
# out of time prints {"check": NAME, "ok": false, "rc": N, ...} and the next one runs anyway; a
# step that passes prints {"check": NAME, "ok": true, ...}. The script itself exits 0.
# PYTHON picks the interpreter (default python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 # lines reach us as printed, even from a step that is then killed
GRACE=5                   # seconds between timeout's TERM and its KILL
START=$SECONDS
FAILED=()

json_str() { # a JSON string of $1: backslashes and quotes escaped, control characters as spaces
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//[$'\t\r\n']/ }
  printf '"%s"' "$s"
}

trim() {
  local s=$1
  s=${s#"${s%%[![:space:]]*}"}
  printf '%s' "${s%"${s##*[![:space:]]}"}"
}

route() { # JSON lines to stdout, the rest to stderr; the last non-blank other line kept in $1
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == \{* ]]; then
      printf '%s\n' "$line"
    else
      printf '%s\n' "$line" >&2
      if [[ -n ${line//[[:space:]]/} ]]; then
        printf '%s\n' "$line" >"$1"
      fi
    fi
  done
  return 0
}

result() { # NAME RC SECONDS [LAST_LINE]: the step's own JSON line
  local name=$1 rc=$2 seconds=$3 last=${4:-}
  if ((rc == 0)); then
    printf '{"check": %s, "ok": true, "rc": 0, "seconds": %d}\n' "$(json_str "$name")" "$seconds"
    return 0
  fi
  FAILED+=("$name")
  local timed_out=false
  if ((rc == 124 || rc == 137)); then timed_out=true; fi
  printf '{"check": %s, "ok": false, "rc": %d, "timed_out": %s, "seconds": %d, "error": %s}\n' \
    "$(json_str "$name")" "$rc" "$timed_out" "$seconds" "$(json_str "${last:0:300}")"
}

check() { # NAME LIMIT_S COMMAND...: run COMMAND under its limit, its output routed
  local name=$1 limit=$2
  shift 2
  local rc=0 started=$SECONDS last
  last=$(mktemp)
  timeout --kill-after="$GRACE" "$limit" "$@" 2>&1 | route "$last" || rc=$?
  result "$name" "$rc" $((SECONDS - started)) "$(cat "$last")"
  rm -f "$last"
}

gpu_identity() { # (a) one JSON line per GPU that nvidia-smi lists
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    FAILED+=(nvidia-smi)
    printf '{"check": "nvidia-smi", "ok": false, "rc": 127, "error": "nvidia-smi not found"}\n'
    return 0
  fi
  local rc=0 started=$SECONDS out name memory driver
  out=$(timeout --kill-after="$GRACE" 15 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>&1) || rc=$?
  if ((rc != 0)); then
    result nvidia-smi "$rc" $((SECONDS - started)) "$(printf '%s\n' "$out" | tail -n 1)"
    return 0
  fi
  while IFS=, read -r name memory driver; do
    printf '{"check": "nvidia-smi", "ok": true, "gpu": %s, "memory_total": %s, "driver": %s}\n' \
      "$(json_str "$(trim "$name")")" "$(json_str "$(trim "$memory")")" "$(json_str "$(trim "$driver")")"
  done <<<"$out"
}

gpu_identity
if [[ -f tests/trainer/test_gpu.py ]]; then # (b) someone else's test: skipped while absent
  check pytest 90 "$PY" -m pytest -q -p no:cacheprovider tests/trainer/test_gpu.py
fi
check bench 330 "$PY" bench/trainer_gpu.py "$@" # (c)

failed="[]"
if ((${#FAILED[@]})); then
  failed="[$(for f in "${FAILED[@]}"; do json_str "$f"; printf ','; done)"
  failed="${failed%,}]"
fi
printf '{"check": "gpu_check", "ok": %s, "failed": %s, "seconds": %d}\n' \
  "$([[ $failed == "[]" ]] && echo true || echo false)" "$failed" $((SECONDS - START))
exit 0
