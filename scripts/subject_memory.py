#!/usr/bin/env python3
"""What a stored subject costs nats-server: memory while writing and after a restart.

    .tools/venv/bin/python3 scripts/subject_memory.py [messages]   (default 1 000 000)

Idempotency-key markers (`coffer.ids.key.{account}.{digest}`) are kept forever, one subject per
key (the event stream allows no per-message TTL: docs/security.md). This publishes the same
number of 150-byte messages twice into a fresh R1 file stream of the pinned server: once on
10 000 subjects (as the events of 10 000 accounts would be), once on a subject per message (as
keys are), and prints the server's RSS as it goes, the time to restart, and the RSS after it.
The difference is the cost of the subjects (docs/benchmarks.md, "What a kept key costs").
"""

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

SERVER = Path(__file__).resolve().parent.parent / ".tools/bin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return -1


async def quiet(_error) -> None:
    pass  # refused connections while the server starts are expected


async def connect(port: int):
    while True:
        try:
            return await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1,
                                      max_reconnect_attempts=0, error_cb=quiet)
        except Exception:
            await asyncio.sleep(0.1)


async def run(messages: int, per_message_subjects: bool, store: str) -> None:
    port = free_port()
    server = subprocess.Popen([str(SERVER), "-js", "-sd", store, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nc = await connect(port)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["coffer.ids.key.>"])
        payload, pending, seen = os.urandom(150), [], [(0, rss_mb(server.pid))]
        started = time.time()
        for i in range(messages):
            tail = hashlib.sha1(str(i).encode()).hexdigest() if per_message_subjects else "k"
            pending.append(js.publish(f"coffer.ids.key.acc-{i % 10000}.{tail}", payload))
            if len(pending) == 1000 or i + 1 == messages:
                await asyncio.gather(*pending)
                pending = []
            if (i + 1) % (messages // 4) == 0:
                seen.append((i + 1, rss_mb(server.pid)))
        written = time.time() - started
        await nc.close()
        server.terminate()
        server.wait()
        server = subprocess.Popen([str(SERVER), "-js", "-sd", store, "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        restarted = time.time()
        nc = await connect(port)
        info = await nc.jetstream().stream_info("T")
        ready = time.time() - restarted
        label = "a subject per message" if per_message_subjects else "10 000 subjects"
        print(f"{label}: {info.state.messages} messages in {written:.0f} s; RSS MB by count "
              f"{seen}; restart {ready:.1f} s, RSS after it {rss_mb(server.pid)} MB", flush=True)
        await nc.close()
    finally:
        server.terminate()
        server.wait()


async def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    for per_message_subjects in (False, True):
        store = tempfile.mkdtemp(prefix="subject-memory-")
        try:
            await run(messages, per_message_subjects, store)
        finally:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
