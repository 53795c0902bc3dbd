"""Make credentials for a fleet: a CURVE keypair for the KV-event sockets, or an API key.

    kvfleet keys curve --dir keys --name replica     # keys/replica.key, keys/replica.key_secret
    kvfleet keys curve --dir keys --name balancer
    kvfleet keys api-key                             # prints a random key for --api-key

Then start the replicas with `--kv-events-curve-secret-key-file keys/replica.key_secret` and the
balancer with `--kv-events-curve-server-key keys/replica.key` (and, if the replicas admit only
known clients with `--kv-events-curve-authorized-keys DIR`,
`--kv-events-curve-client-key-file keys/balancer.key_secret` with balancer.key copied into DIR).
The `.key` file is public; keep `.key_secret` (written with mode 0600) on its host only.
"""

from __future__ import annotations

import argparse
import secrets
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("curve", "api-key"), help="curve: a CURVE keypair; api-key: a random API key")
    p.add_argument("--dir", default=".", help="with curve: where to write NAME.key and NAME.key_secret")
    p.add_argument("--name", default="kvfleet", help="with curve: the files' base name")


def run(args: argparse.Namespace) -> int:
    if args.kind == "api-key":
        print("kvf-" + secrets.token_urlsafe(32))
        return 0
    from protocol.curve import write_keypair

    try:
        public, secret = write_keypair(args.dir, args.name)
    except (ValueError, OSError) as e:
        print(f"kvfleet keys: {e}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0
