#!/usr/bin/env bash
# CPU profile of keyward under the shared harness's load, one scenario at a time, with the same
# origin, policy (candidate.sh) and pinning as run.sh: nginx + load generator on CPU 0, keyward
# alone on CPU 1. Samples keyward with `perf record -e cpu-clock --call-graph dwarf` (software
# clock: works in VMs without hardware counters) while benchload drives it, then prints the top
# functions by inclusive ("children") and by self cost.
#
#   benches/harness/profile.sh /tmp/bench http_small https_small
#
# Needs: a bench folder that run.sh has already used (certs/, run/nginx.conf, run/www/, the built
# loadgen), linux-perf (`apt-get install linux-perf`), and the release build of keyward and
# examples/gen_policy (release profile has debug = 1, so symbols and line tables are there).
# Writes perf-<scenario>.data and perf-<scenario>.txt into OUT (default: /tmp/keyward-profile).
# Knobs: SECONDS_LOAD (10), SECONDS_PERF (6), FREQ (999), CONC (32), OUT.
set -euo pipefail
bench=${1:?usage: profile.sh BENCH_DIR SCENARIO...}
shift
bench=$(cd "$bench" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SECONDS_LOAD:=10}" "${SECONDS_PERF:=6}" "${FREQ:=999}" "${CONC:=32}"
: "${OUT:=/tmp/keyward-profile}"
mkdir -p "$OUT"
port=14000
user_file=$OUT/user

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; sleep 1; }
trap cleanup EXIT

cd "$bench"
setsid taskset -c 0 nginx -p "$bench/run" -c "$bench/run/nginx.conf" -g 'daemon off;' \
  >"$OUT/nginx.out" 2>&1 </dev/null &
pids+=($!)
BENCH_PROXY_PORT=$port BENCH_ORIGIN_CA=$bench/certs/origin-ca.pem \
BENCH_CA_CERT=$bench/certs/proxy-ca.pem BENCH_CA_KEY=$bench/certs/proxy-ca.key \
BENCH_INTERCEPT_HOST=localhost BENCH_TUNNEL_HOST=127.0.0.1 CANDIDATE_PROXY_USER_FILE=$user_file \
  setsid taskset -c 1 "$here/candidate.sh" >"$OUT/keyward.out" 2>&1 </dev/null &
pids+=($!)
for _ in $(seq 1 300); do [[ -s $user_file ]] && break; sleep 0.1; done
[[ -s $user_file ]] || { echo "keyward did not come up (see $OUT/keyward.out)" >&2; exit 1; }
cand=${pids[1]}
kw=$(pgrep -P "$cand" -f "keyward serve" | head -1)
[[ -n $kw ]] || { echo "no keyward child of candidate.sh ($cand)" >&2; exit 1; }

for scen in "$@"; do
  extra=()
  conc=$CONC
  case $scen in
    http_small) url=http://localhost:18080/v1/small ;;
    http_large) url=http://localhost:18080/v1/large; conc=8 ;;
    https_small) url=https://localhost:18443/v1/small; extra=(--cacert certs/proxy-ca.pem) ;;
    https_large) url=https://localhost:18443/v1/large; conc=8; extra=(--cacert certs/proxy-ca.pem) ;;
    https_newconn) url=https://localhost:18443/v1/small; extra=(--cacert certs/proxy-ca.pem --new-conn) ;;
    *) echo "unknown scenario $scen" >&2; exit 1 ;;
  esac
  taskset -c 0 loadgen/target/release/benchload --url "$url" --proxy "127.0.0.1:$port" \
    --proxy-user "$(head -n1 "$user_file")" "${extra[@]}" -c "$conc" -d "$SECONDS_LOAD" --warmup 2 \
    --timeout 10 --out "$OUT/load-$scen.json" >/dev/null &
  load=$!
  sleep 3
  perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -p "$kw" -o "$OUT/perf-$scen.data" \
    -- sleep "$SECONDS_PERF" 2>/dev/null
  wait "$load"
  {
    echo "== $scen: $(grep -o '"rps":[0-9.]*' "$OUT/load-$scen.json") (while sampled at $FREQ Hz)"
    echo "-- top by inclusive cost (children)"
    perf report -i "$OUT/perf-$scen.data" --children --sort symbol --stdio --percent-limit 2 \
      -g none 2>/dev/null | grep -E '^ +[0-9]' | head -60
    echo "-- top by self cost"
    perf report -i "$OUT/perf-$scen.data" --no-children --sort dso,symbol --stdio -g none \
      2>/dev/null | grep -E '^ +[0-9]' | head -40
  } >"$OUT/perf-$scen.txt"
  echo "wrote $OUT/perf-$scen.txt"
done
