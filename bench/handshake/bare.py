"""The baseline: a bare aiohttp endpoint answering a JSON body of the handshake's size."""

import sys

from aiohttp import web

SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 600
BODY = b'{"authorization":{"pad":"' + b"x" * max(0, SIZE - 40) + b'"},"signature":"s"}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


app = web.Application()
app.router.add_post("/api/v1/handshake", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
