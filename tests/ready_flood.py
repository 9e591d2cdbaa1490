"""A flood of /ready calls (issue 17), run as its own process: ``CALLERS`` made-up User-Agents
(``flood/0``, ``flood/1``...) call in turn, from ``ADDRESSES`` loopback addresses (127.0.1.1
and up), as fast as the admin listener answers, each on a new connection, ``AT_ONCE`` at a
time. Prints the number of rounds done after each round (every caller called once); runs until
killed.

    python tests/ready_flood.py ADMIN_PORT CALLERS ADDRESSES
"""

from __future__ import annotations

import asyncio
import sys

AT_ONCE = 16


async def call(port: int, address: str, user_agent: str, at_once: asyncio.Semaphore) -> None:
    request = f"GET /ready HTTP/1.1\r\nHost: pod\r\nUser-Agent: {user_agent}\r\n"
    async with at_once:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0)
            )
        except OSError:
            return  # a full accept queue: the next round calls again
        writer.write(f"{request}Connection: close\r\n\r\n".encode())
        try:
            await reader.read()
        except OSError:
            pass
        finally:
            writer.close()


async def flood(port: int, callers: int, addresses: int) -> None:
    at_once = asyncio.Semaphore(AT_ONCE)
    rounds = 0
    while True:
        await asyncio.gather(
            *(
                call(port, f"127.0.1.{index % addresses + 1}", f"flood/{index}", at_once)
                for index in range(callers)
            )
        )
        rounds += 1
        print(rounds, flush=True)


if __name__ == "__main__":
    asyncio.run(flood(*(int(arg) for arg in sys.argv[1:4])))
