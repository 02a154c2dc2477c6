#!/usr/bin/env bash
# Instructions per request for each hot-path variant, counted by callgrind (repeatable on
# a noisy machine). Needs valgrind. Prints a markdown table for BENCHMARKS.md.
# Usage: [BODY=json] bash benches/instructions.sh [VARIANT...]
#   VARIANT: default all; floor and add_authorization are always measured (every ratio
#   needs them). BODY=json sends the small JSON body instead of an empty one.
set -euo pipefail
cd "$(dirname "$0")/.."
N=100000
bin=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="instructions" and m.get("executable"): print(m["executable"])')
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/refs:/ {gsub(",","",$NF); print $NF}'; }
all="auth_layer_static auth_layer_expiring auth_layer_no_replay rwlock_cache mutex_cache watch_receiver"
variants="floor add_authorization ${*:-$all}"
declare -A per
for v in $variants; do
  per[$v]=$(( ( $(count "$v" "$N") - $(count "$v" 0) ) / N ))
done
echo "| variant | instructions/request | over floor | x AddAuthorization |"
echo "|---|---|---|---|"
for v in $variants; do
  python3 -c "print(f'| $v | ${per[$v]} | {${per[$v]}-${per[floor]}} | {${per[$v]}/${per[add_authorization]}:.2f} |')"
done
