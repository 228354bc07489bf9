#!/usr/bin/env bash
# Prepare a run directory for the benchmark Kamailio (see README.md).
#
#   setup.sh DIR N
#
# Creates DIR with
#   kamailio.sqlite  Kamailio's own schema (version, subscriber, location, ...)
#                    plus N subscribers 100000 .. 100000+N-1 in realm
#                    parley.test, password "pw<user>" (Kamailio only uses
#                    the precomputed ha1 column)
#   tls/server.crt   self-signed certificate for 127.0.0.1 / parley.test
#   tls/server.key   its unencrypted private key (Kamailio cannot prompt)
#   run/             Kamailio runtime directory (-Y)
# and prints the command that runs Kamailio in the foreground on it.
#
# Environment:
#   KAMAILIO_SCHEMA_DIR  where the SQLite schema files live
#                        (default: /usr/share/kamailio/db_sqlite, Debian's
#                        kamailio-sqlite-modules package)
#   FIRST_USER           first subscriber number (default 100000)
set -euo pipefail

usage() {
    echo "usage: $0 DIR N" >&2
    exit 2
}

[ $# -eq 2 ] || usage
case "$2" in '' | *[!0-9]*) usage ;; esac

here=$(cd "$(dirname "$0")" && pwd)
dir=$(realpath -m "$1")
count=$2
first=${FIRST_USER:-100000}
realm=parley.test
schema_dir=${KAMAILIO_SCHEMA_DIR:-/usr/share/kamailio/db_sqlite}
db=$dir/kamailio.sqlite

for tool in kamailio sqlite3 openssl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
# standard = version table, auth_db = subscriber, usrloc = location(+attrs).
schema_files="standard auth_db usrloc"
for f in $schema_files; do
    [ -r "$schema_dir/$f-create.sql" ] || {
        echo "schema file $schema_dir/$f-create.sql not found" \
            "(install kamailio-sqlite-modules or set KAMAILIO_SCHEMA_DIR)" >&2
        exit 1
    }
done

mkdir -p "$dir/tls" "$dir/run"
# Start from an empty database so old bindings never leak into a run.
rm -f "$db" "$db-wal" "$db-shm" "$db-journal"

{
    # WAL is persistent in the file; it lets the flush timer write while
    # worker processes read subscriber rows, as a WAL-mode Parley store does.
    echo "PRAGMA journal_mode=WAL;"
    for f in $schema_files; do
        cat "$schema_dir/$f-create.sql"
    done
    # All subscriber rows in one transaction: 20000 rows take well under
    # a second this way, instead of one fsync per row.
    python3 - "$first" "$count" "$realm" <<'PY'
import hashlib
import sys

first, count, realm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = sys.stdout
out.write("BEGIN;\n")
for user in range(first, first + count):
    ha1 = hashlib.md5(f"{user}:{realm}:pw{user}".encode()).hexdigest()
    # The plaintext is kept for humans/tests only; Kamailio reads just
    # the ha1 column (calculate_ha1=0).
    out.write(
        "INSERT INTO subscriber (username, domain, password, ha1) "
        f"VALUES ('{user}', '{realm}', 'pw{user}', '{ha1}');\n"
    )
out.write("COMMIT;\n")
PY
} | sqlite3 -bail "$db" >/dev/null

rows=$(sqlite3 "$db" "SELECT count(*) FROM subscriber;")
[ "$rows" -eq "$count" ] || { echo "expected $count subscribers, got $rows" >&2; exit 1; }

# Throwaway self-signed certificate; clients are expected not to verify it.
openssl req -x509 -newkey rsa:2048 -nodes -days 30 \
    -keyout "$dir/tls/server.key" -out "$dir/tls/server.crt" \
    -subj "/CN=$realm" \
    -addext "subjectAltName=DNS:$realm,IP:127.0.0.1" 2>/dev/null

cat <<EOF
Prepared $dir: $rows subscribers ($first..$((first + count - 1)), password pw<user>, realm $realm).
Run Kamailio in the foreground, pinned to one CPU (drop 'taskset -c 0' to
let it float; append -A AUTH_DB for per-request SQLite credential lookups
instead of the in-memory cache, -A LOGLEVEL=1 for benchmark runs, and
-A SIP_PORT=..., -A CHILDREN=..., -A FLUSH_INTERVAL=..., -A MIN_EXPIRES=...
to tune; -M 64 = 64 MB private memory per process, needed to load the
credential cache; -x/-X tlsf = the allocator without Debian's debug checks;
see README.md):

cd '$dir' && taskset -c 0 kamailio -DD -E -M 64 -x tlsf -X tlsf -f '$here/kamailio.cfg' -w '$dir' -Y '$dir/run' -A 'DBURL="sqlite:///$db"'
EOF
