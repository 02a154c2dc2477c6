#!/usr/bin/env bash
# Instructions per request for each hot-path variant, counted by callgrind (repeatable on
# a noisy machine). Needs valgrind. Prints a markdown table for BENCHMARKS.md.
# Usage: [BODY=json|get] bash benches/instructions.sh [VARIANT...]
#   VARIANT: default all; floor and add_authorization are always measured (every ratio
#   needs them). BODY=json sends the small JSON body instead of an empty one; BODY=get
#   a GET with no user headers and no body (issue 26's own measure).
# Usage: BENCH=reqwest bash benches/instructions.sh [VARIANT...]
#   the reqwest path (benches/reqwest.rs, real loopback HTTP): `none` (no middleware) and
#   `header` (a fixed-header middleware) are always measured; the ratio is x `header`.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
bench=${BENCH:-instructions}
if [ "$bench" = reqwest ]; then
  N=${N:-2000}; features=(--features reqwest); mode=(instructions); floor=none; base=header
  all="static refreshable no_replay"
else
  features=(); mode=(); floor=floor; base=add_authorization
  all="auth_layer_static auth_layer_expiring auth_layer_no_replay rwlock_cache mutex_cache watch_receiver"
fi
bin=$(cargo bench --bench "$bench" "${features[@]}" --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]==sys.argv[1] and m.get("executable"): print(m["executable"])' "$bench")
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "${mode[@]}" "$1" "$2" 2>&1 | awk '/refs:/ {gsub(",","",$NF); print $NF}'; }
variants="$floor $base ${*:-$all}"
declare -A per
for v in $variants; do
  per[$v]=$(( ( $(count "$v" "$N") - $(count "$v" 0) ) / N ))
done
echo "| variant | instructions/request | over $floor | x $base |"
echo "|---|---|---|---|"
for v in $variants; do
  python3 -c "print(f'| $v | ${per[$v]} | {${per[$v]}-${per[$floor]}} | {${per[$v]}/${per[$base]}:.2f} |')"
done
