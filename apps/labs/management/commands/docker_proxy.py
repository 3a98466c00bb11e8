"""Run the filtering proxy in front of the Docker socket (see
``apps/labs/engine/socket_proxy.py``) until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from apps.labs.engine.socket_proxy import DockerSocketProxy


class Command(BaseCommand):
    help = "Let only the sandbox engine's calls through to the Docker socket."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--listen", required=True, help="unix socket to listen on")
        parser.add_argument("--upstream", default="/var/run/docker.sock", help="the Docker socket")

    def handle(self, *args: Any, listen: str, upstream: str, **opts: Any) -> None:
        asyncio.run(self._run(DockerSocketProxy(listen, upstream)))

    async def _run(self, proxy: DockerSocketProxy) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await proxy.start()
        self.stdout.write(f"docker proxy: {proxy.listen} → {proxy.upstream}")
        await stop.wait()
        await proxy.close()
