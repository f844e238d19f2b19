#!/usr/bin/env python3
"""Deposit throughput over NATS with the official client (nats-py), next to the raw JetStream
publish-and-ack baseline from the same client, the same concurrency, the same server, in the
same run (a side stream with the events stream's storage, removed afterwards).

Usage: bench_nats.py NATS_URL [--clients 64] [--seconds 15] [--accounts 10000] [--hot]
With --hot every deposit goes to one account. Prints one JSON object.
"""
import argparse
import asyncio
import json
import time
import uuid

import nats
from nats.js.api import StorageType, StreamConfig


async def timed(clients: int, seconds: float, operation) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(number: int) -> None:
        nonlocal errors
        index = number
        while time.perf_counter() < stop:
            started = time.perf_counter()
            succeeded = await operation(index)
            latencies.append(time.perf_counter() - started)
            errors += 0 if succeeded else 1
            index += clients

    started = time.perf_counter()
    await asyncio.gather(*(worker(number) for number in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1e3

    return {
        "per_second": round((len(latencies) - errors) / elapsed),
        "p50_ms": round(percentile(0.50), 2),
        "p99_ms": round(percentile(0.99), 2),
        "errors": errors,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("nats_url")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--hot", action="store_true")
    parser.add_argument("--replicas", type=int, default=1,
                        help="the side stream's replicas: those of the events stream")
    options = parser.parse_args()
    connection = await nats.connect(options.nats_url)
    jetstream = connection.jetstream()
    prefix = "bench-" + uuid.uuid4().hex[:8]
    accounts = 1 if options.hot else options.accounts
    limit = asyncio.Semaphore(256)

    async def open_account(number: int) -> None:
        async with limit:
            await connection.request(f"coffer.cmd.{prefix}-{number}.open",
                                     b'{"currency":"EUR"}', timeout=30)

    await asyncio.gather(*(open_account(number) for number in range(accounts)))

    async def deposit(index: int) -> bool:
        try:
            reply = await connection.request(f"coffer.cmd.{prefix}-{index % accounts}.deposit",
                                             b'{"amount":1}', timeout=10)
        except Exception:
            return False
        return not (reply.headers or {}).get("Nats-Service-Error")

    side = "BENCH_" + uuid.uuid4().hex[:6].upper()
    await jetstream.add_stream(StreamConfig(name=side, subjects=[f"bench.{side}.>"],
                                            storage=StorageType.FILE,
                                            num_replicas=options.replicas))
    payload = b"x" * 200

    async def raw(index: int) -> bool:
        await jetstream.publish(f"bench.{side}.{index % accounts}", payload, timeout=10)
        return True

    deposits = await timed(options.clients, options.seconds, deposit)
    baseline = await timed(options.clients, options.seconds, raw)
    await jetstream.delete_stream(side)
    await connection.drain()
    print(json.dumps({
        "clients": options.clients,
        "replicas": options.replicas,
        "accounts": accounts,
        "deposits_over_nats": deposits,
        "raw_publish_and_ack": baseline,
        "ratio": round(deposits["per_second"] / max(baseline["per_second"], 1), 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
