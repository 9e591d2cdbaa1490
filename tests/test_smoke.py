from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.conftest import StartApp, StartProxy


async def test_proxies_a_request_and_reports_ready(
    start_app: StartApp, start_proxy: StartProxy
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.path_qs}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    proxy = await start_proxy(await start_app(app))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/a?b=c") as response:
            assert response.status == 200
            assert await response.text() == "hello /a?b=c"
        async with session.get(proxy.admin_url + "/ready") as response:
            assert response.status == 200
