"""Open live streams against a served imagebot and keep them open, reading every message:
``idle`` streams of one build that does nothing, ``busy`` streams of every build with log lines
(``/api/events?logs=1``, woken by each delivery). Prints how many messages each kind got when
stopped (SIGTERM or SIGINT) or after ``--seconds``. Loopback only."""

from __future__ import annotations

import argparse
import asyncio
import signal

import httpx


async def follow(client: httpx.AsyncClient, url: str, counts: dict[str, int], kind: str,
                 ready: asyncio.Queue) -> None:
    async with client.stream("GET", url) as response:
        await ready.put(response.status_code)
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                counts[kind] += 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("--build", type=int, required=True, help="the idle streams' build")
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--busy", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    counts = {"idle": 0, "busy": 0}
    ready: asyncio.Queue = asyncio.Queue()
    client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
    tasks = [asyncio.create_task(follow(client, f"{args.base}/api/builds/{args.build}/stream", counts, "idle", ready))
             for _ in range(args.idle)]
    tasks += [asyncio.create_task(follow(client, f"{args.base}/api/events?logs=1", counts, "busy", ready))
              for _ in range(args.busy)]
    statuses = [await ready.get() for _ in tasks]
    print(f"OPEN {statuses.count(200)} of {len(tasks)} (others: {sorted(set(statuses) - {200})})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.seconds)
    except TimeoutError:
        pass
    print(f"MESSAGES idle={counts['idle']} busy={counts['busy']}", flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
