"""The floors of bench/load.py: the same streams read straight from the
fake upstream in one process, with one shared client: the openai SDK
(`"reader": "sdk"`), or raw aiohttp parsing the server-sent lines itself
(`"raw"`: the cheapest reader there is). Run as a subprocess of
bench/load.py (same pipe protocol as load_clients.py).

Plan: {"base_url", "offsets": [seconds after go per stream; all 0 for a burst], "timeout",
"expected", "reader"}. Its "server CPU" is this process's utime+stime
(/proc/self/stat) from `go` to the end of the last stream: the least CPU any
Python server must spend to read these tokens with that reader.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

import aiohttp
import openai
from load_common import proc_cpu, proc_hwm_mib, send_line
from openai.types.chat import ChatCompletionMessageParam

monotonic = time.monotonic
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Benchmark question: please answer."}
]


async def one_stream(client: Any, due: float, timeout: float, expected: str) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, due - monotonic()))
    first: float | None = None
    last = 0.0
    gaps: list[float] = []
    texts: list[str] = []
    finish: str | None = None

    def text(piece: str) -> None:
        nonlocal first, last
        now = monotonic()
        if first is None:
            first = now
        else:
            gaps.append(now - last)
        last = now
        texts.append(piece)

    async def read_raw() -> None:
        nonlocal finish
        session, url = client
        body = {
            "model": "fake-model",
            "messages": QUESTION,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with session.post(url, json=body, headers={"Authorization": "Bearer x"}) as response:
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                for choice in json.loads(data).get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text(piece)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]

    async def read() -> None:
        nonlocal finish
        if not isinstance(client, openai.AsyncOpenAI):
            await read_raw()
            return
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    text(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason

    reason = None
    try:
        await asyncio.wait_for(read(), max(0.0, due + timeout - monotonic()))
    except TimeoutError:
        reason = "timeout"
    except Exception as exc:
        reason = f"error:{type(exc).__name__}"
    if reason is None:
        if finish != "stop":
            reason = f"finish:{finish}"
        elif "".join(texts) != expected:
            reason = "content_ne_upstream"
    return {
        "reason": reason,
        "ttft": None if first is None else first - due,
        "gaps": [round(g, 5) for g in gaps],
        "frames": len(texts),
    }


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    plan = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    client: Any
    if plan.get("reader", "sdk") == "raw":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        client = (session, plan["base_url"].rstrip("/") + "/chat/completions")
    else:
        client = openai.AsyncOpenAI(base_url=plan["base_url"], api_key="x", max_retries=0)
    # One warm-up stream outside the measure: imports, the client's first connection.
    warm = await one_stream(client, monotonic(), max(float(plan["timeout"]), 60.0), plan["expected"])
    send_line({"ready": True, "warmup": warm["reason"]})
    go = json.loads(await loop.run_in_executor(None, sys.stdin.readline))["go"]
    await asyncio.sleep(max(0.0, go - monotonic() - 0.05))
    cpu_before = proc_cpu(os.getpid())
    streams = await asyncio.gather(
        *(
            one_stream(client, go + offset, float(plan["timeout"]), plan["expected"])
            for offset in plan["offsets"]
        )
    )
    cpu = proc_cpu(os.getpid()) - cpu_before
    end = monotonic()
    send_line({"streams": streams, "cpu_s": cpu, "end": end, "hwm_mib": proc_hwm_mib(os.getpid())})
    await (client[0] if isinstance(client, tuple) else client).close()


if __name__ == "__main__":
    asyncio.run(main())
