#!/usr/bin/env bash
# Registration benchmark: Parley and Kamailio, each pinned to CPU 0, driven
# by the load generator (benches/regload.rs) pinned to CPU 1, over UDP and
# over persistent TLS connections, at stepped offered rates. Every step
# starts the server afresh with 20,000 extensions. Also measures Parley's
# memory per idle registered TLS connection.
#
#   benches/registration.sh [OUT_DIR]
#
# Environment: RUNS (default 3), SECS (measured seconds per step, 10),
# UDP_RATES, TLS_RATES (space-separated), KAM_VARIANTS (the Kamailio
# set-ups to measure, default "8 8:stateless": a worker count, all pinned
# to CPU 0, and ":stateless" for the lighter configuration without
# transactions and nonce-count checks, see benches/kamailio/README.md) with
# KAM<N>_UDP_RATES and KAM<N>_TLS_RATES for each count N, and
# KAM<N>_SL_UDP_RATES and KAM<N>_SL_TLS_RATES for its stateless variant,
# IDLE_CONNS (5000), SKIP_KAMAILIO=1.
# Needs: kamailio, kamailio-sqlite-modules, kamailio-tls-modules, sqlite3,
# openssl (for the Kamailio side).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${1:-/tmp/parley-bench}
runs=${RUNS:-3}
secs=${SECS:-10}
users=20000
first=100000
udp_rates=${UDP_RATES:-"40000 44000 48000 52000"}
tls_rates=${TLS_RATES:-"16000 20000 24000 27000"}
kam_variants=${KAM_VARIANTS:-"8 8:stateless"}
: "${KAM8_UDP_RATES:=24000 26000 28000 30000 32000}" "${KAM8_TLS_RATES:=16000 20000 22000 24000 27000}"
: "${KAM8_SL_UDP_RATES:=40000 44000 48000}" "${KAM8_SL_TLS_RATES:=24000 27000 30000}"
# Both servers get a 16 MB UDP receive buffer: Kamailio asks for it with
# maxbuffer (SO_RCVBUF, capped by net.core.rmem_max), Parley with
# SO_RCVBUFFORCE when root. Raise the cap for the run so they are equal.
udp_buffer=$((16 << 20))
old_rmem_max=$(sysctl -n net.core.rmem_max)
if [ "$(id -u)" -eq 0 ]; then sysctl -qw net.core.rmem_max=$udp_buffer; fi
idle_conns=${IDLE_CONNS:-5000}
mkdir -p "$out"

cargo build --release --bin parley --bench regload >&2
regload=$(ls -t target/release/deps/regload-* | grep -v '\.d$' | head -1)
parley=$root/target/release/parley

stop_all() {
    pkill -f "parley serve --config $out" 2>/dev/null || true
    pkill -9 kamailio 2>/dev/null || true
    sleep 1
}
finish() {
    stop_all
    if [ "$(id -u)" -eq 0 ]; then sysctl -qw net.core.rmem_max="$old_rmem_max"; fi
}
trap finish EXIT

# ---- Parley --------------------------------------------------------------
pdir=$out/parley
start_parley() {
    stop_all
    rm -rf "$pdir" && mkdir -p "$pdir"
    taskset -c 1 "$regload" provision --data-dir "$pdir" --users $first:$users --domain parley.test >/dev/null
    printf '[log]\nlevel = "warn"\n' > "$pdir/bench.toml"
    taskset -c 0 "$parley" serve --config "$pdir/bench.toml" --data-dir "$pdir" \
        --sip-udp 127.0.0.1:5260 --sip-tcp 127.0.0.1:5260 --sip-tls 127.0.0.1:5261 --https off \
        --domain parley.test >"$pdir/parley.log" 2>&1 &
    sleep 1
}

# ---- Kamailio ------------------------------------------------------------
kdir=$out/kamailio
start_kamailio() { # children [-A STATELESS]
    stop_all
    rm -rf "$kdir"
    benches/kamailio/setup.sh "$kdir" $users >/dev/null
    # The command line benches/kamailio/setup.sh prints (see its README).
    (cd "$kdir" && taskset -c 0 kamailio -DD -E -M 64 -x tlsf -X tlsf -f "$root/benches/kamailio/kamailio.cfg" \
        -w "$kdir" -Y "$kdir/run" -A "DBURL=\"sqlite:///$kdir/kamailio.sqlite\"" -A CHILDREN=$1 \
        -A TCP_CHILDREN=$1 -A UDP_RCVBUF=$udp_buffer -A LOGLEVEL=1 ${2:+"$2" "$3"} >"$kdir/kamailio.log" 2>&1 &)
    sleep 4
}

# One load step: prints the RESULT line of regload.
step() { # server mode port rate
    local warmup=$(( users / $4 + 2 ))
    taskset -c 1 "$regload" "$2" --server "127.0.0.1:$3" --users $first:$users --rate "$4" \
        --secs "$secs" --warmup "$warmup" $5 2>/dev/null | grep RESULT
}

results=$out/results.txt
: > "$results"
for run in $(seq 1 "$runs"); do
    for r in $udp_rates; do start_parley; echo "run=$run server=parley $(step parley udp 5260 "$r" "")" | tee -a "$results"; done
    for r in $tls_rates; do start_parley; echo "run=$run server=parley $(step parley tls 5261 "$r" "--conns 200")" | tee -a "$results"; done
    if [ -z "${SKIP_KAMAILIO:-}" ]; then
        for v in $kam_variants; do
            ch=${v%%:*} mode=stateful define=() rates=KAM${ch}
            if [ "$v" != "$ch" ]; then mode=${v#*:} define=(-A STATELESS) rates=KAM${ch}_SL; fi
            udp_var=${rates}_UDP_RATES tls_var=${rates}_TLS_RATES
            label="server=kamailio children=$ch mode=$mode"
            for r in ${!udp_var}; do start_kamailio "$ch" "${define[@]}"; echo "run=$run $label $(step kamailio udp 5070 "$r" "")" | tee -a "$results"; done
            for r in ${!tls_var}; do start_kamailio "$ch" "${define[@]}"; echo "run=$run $label $(step kamailio tls 5071 "$r" "--conns 200")" | tee -a "$results"; done
        done
    fi
done

# ---- memory per idle TLS connection --------------------------------------
start_parley
pid=$(pgrep -f "parley serve --config $out" | head -1)
before=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status)
taskset -c 1 "$regload" idle --server 127.0.0.1:5261 --users $first:$users --conns "$idle_conns" --hold 20 >"$out/idle.txt" 2>&1 &
idle_load=$!
sleep 15
after=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status)
# Only the load generator: Parley runs in the background too.
wait "$idle_load"
echo "idle: $(cat "$out/idle.txt" | grep IDLE | head -1) rss_before_kb=$before rss_after_kb=$after per_connection_bytes=$(( (after - before) * 1024 / idle_conns ))" | tee -a "$results"
