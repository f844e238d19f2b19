#!/usr/bin/env python3
"""Coffer from Python with the official NATS client (nats-py).

Opens two accounts, deposits and transfers over NATS request-reply (the `coffer` micro service),
follows one account's events from the JetStream stream, and reads its own write from a reader.

Usage: wallet.py NATS_URL READER_URL     (with `./just up`: nats://127.0.0.1:4222 http://127.0.0.1:8081)
Needs: pip install nats-py msgpack (both in scripts/requirements-test.txt).
"""
import asyncio
import json
import sys
import urllib.request
import uuid

import msgpack
import nats
from nats.js.api import DeliverPolicy

STREAM = "COFFER_EVENTS"


async def command(nc, account, verb, body, key=None):
    """One command on `coffer.cmd.{account}.{verb}`; a refusal raises with its problem code."""
    headers = {"Idempotency-Key": key} if key else None
    reply = await nc.request(
        f"coffer.cmd.{account}.{verb}", json.dumps(body).encode(), timeout=10, headers=headers
    )
    answer = json.loads(reply.data)
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        raise RuntimeError(f"{verb} on {account}: {reply.headers['Nats-Service-Error-Code']} {answer}")
    return answer


async def main(nats_url, reader_url):
    run = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{run}", f"bob-{run}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    # Writers append on coffer.append.{account}.{type}; the stream stores (and republishes) each
    # event as coffer.events.{account}.{type}. A JetStream subscription finds its stream by
    # subject, and no stream lists coffer.events.> as its own: bind to the stream by name.
    events = await js.subscribe(
        f"coffer.events.{alice}.>",
        stream=STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )

    await command(nc, alice, "open", {"currency": "EUR", "metadata": {"example": "python"}})
    await command(nc, bob, "open", {"currency": "EUR"})
    # A retry with the same key is answered from the first run: the money moves once.
    for _ in range(2):
        deposited = await command(nc, alice, "deposit", {"amount": 500}, key=f"deposit-{run}")
    assert deposited["balance"] == 500, deposited
    moved = await command(nc, alice, "transfer", {"to": bob, "amount": 120, "transfer_id": f"t-{run}"})
    print(f"transfer {moved['transfer_id']} {moved['status']} at position {moved['position']}")

    # Alice's history from the stream: payloads are MessagePack, described by the headers.
    seen = []
    while len(seen) < 3:
        message = await events.next_msg(timeout=10)
        event_type = message.headers["Coffer-Event-Type"]
        data = msgpack.unpackb(message.data)
        seen.append(event_type)
        print(f"{message.metadata.sequence.stream:>6} {message.subject} {event_type} {json.dumps(data)}")
    assert seen == ["account_opened", "deposited", "transfer_debited"], seen

    # Read your own write: the reader answers once its view has applied the transfer.
    url = f"{reader_url}/v1/accounts/{bob}?min_position={moved['position']}"
    with urllib.request.urlopen(url, timeout=30) as response:
        view = json.load(response)
    assert view["balance"] == 120, view
    print(f"{bob}: balance {view['balance']} {view['currency']} (reader at position >= {moved['position']})")
    await nc.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
