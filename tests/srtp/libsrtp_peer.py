#!/usr/bin/python3
"""libsrtp (through pylibsrtp) as the independent SRTP peer of tests/srtp_interop.rs.

    libsrtp_peer.py protect|unprotect 80|32 KEY_HEX

Reads lines "rtp HEX" or "rtcp HEX" on stdin and writes, per line, the
protected or unprotected packet as HEX, or "ERR <reason>" when libsrtp
refuses it.
"""
import sys

from pylibsrtp import Error, Policy, Session

mode, tag, key_hex = sys.argv[1:4]
profile = {
    "80": Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "32": Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}[tag]
ssrc_type = Policy.SSRC_ANY_OUTBOUND if mode == "protect" else Policy.SSRC_ANY_INBOUND
session = Session(policy=Policy(key=bytes.fromhex(key_hex), ssrc_type=ssrc_type, srtp_profile=profile))

for line in sys.stdin:
    kind, data = line.split()
    packet = bytes.fromhex(data)
    try:
        if mode == "protect":
            out = session.protect(packet) if kind == "rtp" else session.protect_rtcp(packet)
        else:
            out = session.unprotect(packet) if kind == "rtp" else session.unprotect_rtcp(packet)
        print(out.hex(), flush=True)
    except Error as e:
        print("ERR", str(e).replace(" ", "_"), flush=True)
