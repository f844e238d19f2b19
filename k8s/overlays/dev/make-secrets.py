#!/usr/bin/env python3
"""Makes the dev overlay's secrets on this machine: nothing secret is committed.

    python3 k8s/overlays/dev/make-secrets.py

Writes k8s/overlays/dev/secrets/nats-users.env (a random password per NATS user, the route
password, and the bcrypt hash of each user's password, which the NATS servers hold instead) and
secrets/http-tokens.env (the HTTP bearer tokens), which the overlay's secretGenerator reads.
Files that exist are kept, so a running development cluster keeps its credentials; delete them
to make new ones. The directory is ignored by git. Needs the PyPI package bcrypt (installed into
.tools by `just test-tools`).
"""

import pathlib
import secrets
import sys

import bcrypt

HERE = pathlib.Path(__file__).resolve().parent / "secrets"
USERS = ["setup", "writer", "coffer-reader-0", "coffer-reader-1", "coffer-reader-2"]
# Cost 11, as production (k8s/README.md); NATS checks a hash at each login.
BCRYPT_COST = 11


def password() -> str:
    # URL-safe: the route password goes into the route URLs.
    return secrets.token_hex(24)


def nats_users() -> str:
    lines = []
    for user in USERS:
        value = password()
        hashed = bcrypt.hashpw(value.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()
        lines += [f"{user}-password={value}", f"{user}-password-bcrypt={hashed}"]
    lines.append(f"route-password={password()}")
    return "\n".join(lines) + "\n"


def http_tokens() -> str:
    return f"writer-token={secrets.token_hex(32)}\nreader-token={secrets.token_hex(32)}\n"


def main() -> int:
    HERE.mkdir(mode=0o700, exist_ok=True)
    for name, make in [("nats-users.env", nats_users), ("http-tokens.env", http_tokens)]:
        path = HERE / name
        if path.exists():
            print(f"kept {path}")
            continue
        path.touch(mode=0o600)
        path.write_text(make())
        print(f"made {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
