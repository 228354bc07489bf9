#!/usr/bin/env bash
# Runs every test of Parley: unit, property, and integration tests against
# real clients (SIPp, baresip) and libsrtp (through python3-pylibsrtp). On
# a fresh Debian machine, run as root, it first installs the packages those
# tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(baresip-core sip-tester sipvicious python3-pylibsrtp linphone-cli twinkle-console iptables iproute2 tshark)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        echo "The tests need: ${missing[*]}. Install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

cargo test --locked "$@"
