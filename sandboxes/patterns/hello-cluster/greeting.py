"""greeting: the service that says hello.

``front`` asks it for a greeting once it knows the user's name
(``GET /greeting?name=Ada``). Like ``profile`` it takes a few milliseconds and keeps no
state: on its own it is a perfectly healthy service, and yet when it fails, every answer
``front`` gives fails with it.
"""

from __future__ import annotations

import asyncio

from sandboxes.runtime.node import Node, Request, Response


def setup(node: Node) -> None:
    work_s = float(node.param("greeting_work_ms", 4)) / 1000  # pattern.yaml, `params`

    @node.route("/greeting")
    async def greeting(request: Request) -> Response:
        name = request.query.get("name", "stranger")
        await asyncio.sleep(work_s)
        return node.json({"text": f"Hello, {name}!"})
