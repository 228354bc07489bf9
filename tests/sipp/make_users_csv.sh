#!/bin/sh
# Write a sipp injection file (-inf) for the scenarios in this folder.
#
#   make_users_csv.sh FIRST COUNT > users.csv
#
# One "user;password" line per user FIRST .. FIRST+COUNT-1, password
# "pw<user>" (the convention of benches/kamailio/setup.sh). SEQUENTIAL makes
# call number i use line i, so "-m COUNT" touches every user exactly once.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 FIRST COUNT" >&2; exit 2; }
echo SEQUENTIAL
awk -v first="$1" -v count="$2" \
    'BEGIN { for (u = first; u < first + count; u++) printf "%d;pw%d\n", u, u }'
