#!/usr/bin/env bash
# Media anchor benchmark: K concurrent SRTP<->SRTP calls set up over TLS
# through Parley, re-keyed per leg, 20 ms G.711 both ways on every call.
#
#   benches/callload.sh OUT_DIR
#
# Parley runs pinned to CPU 0, the load generator (benches/callload.rs) on
# CPU 1. Each run starts Parley afresh. CALLS_LIST and RUNS pick the
# figures; SECS is the measured window of each run (after a 3 s warm-up);
# LOAD_ARGS is passed to the load tool (e.g. --sleeping-phones).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: benches/callload.sh OUT_DIR}
CALLS_LIST=${CALLS_LIST:-"100 200 400 800 1200"}
RUNS=${RUNS:-3}
SECS=${SECS:-20}
mkdir -p "$out"
cargo build --release --quiet
cargo bench --bench callload --no-run --quiet 2>/dev/null
load=$(ls -t target/release/deps/callload-* | grep -v '\.d$' | head -1)
parley=target/release/parley

data="$out/data"
rm -rf "$data"
mkdir -p "$data"
"$load" provision --data-dir "$data" --users 200000:2400 --domain parley.test >/dev/null
cat >"$data/parley.toml" <<'TOML'
[sip]
realm = "parley.test"
[media]
media_timeout_secs = 600
[security]
lockout_extension_failures = 1000
lockout_source_failures = 100000
TOML

results="$out/results.txt"
: >"$results"
for calls in $CALLS_LIST; do
    for run in $(seq 1 "$RUNS"); do
        taskset -c 0 "$parley" serve --data-dir "$data" --config "$data/parley.toml" \
            --sip-udp 127.0.0.1:15060 --sip-tcp 127.0.0.1:15060 --sip-tls 127.0.0.1:15061 \
            --https 127.0.0.1:15443 --domain parley.test >"$out/parley-$calls-$run.log" 2>&1 &
        pid=$!
        for _ in $(seq 50); do
            grep -q "Parley is ready" "$out/parley-$calls-$run.log" && break
            sleep 0.1
        done
        line=$(timeout 300 taskset -c 1 "$load" run --server 127.0.0.1:15061 --users 200000:2400 --calls "$calls" \
            --secs "$SECS" --warmup 3 --pid "$pid" ${LOAD_ARGS:-} 2>&1 | tr '\n' ' ' || true)
        echo "calls=$calls run=$run $line" | tee -a "$results"
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
done
