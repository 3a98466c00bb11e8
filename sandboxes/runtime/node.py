"""What a node program sees: one ``Node`` per process, handed to the program's ``setup``.

A program declares what it serves and what it runs; the runtime does the plumbing
(HTTP serving and calling, telemetry, the fault layer, the control channel)::

    import asyncio

    from sandboxes.runtime.node import CallError, Node, Request, Response

    def setup(node: Node) -> None:
        node.setting("greeting", "hello")          # changed live by {"op": "config", ...}

        @node.route("/")
        async def hello(request: Request) -> Response:
            return node.json({"node": node.name, "says": node.config["greeting"]})

        @node.task
        async def ping_the_others() -> None:         # runs while the node serves
            while True:
                for peer in node.peers_with_role("replica"):
                    try:
                        await node.call(peer.name, "/health", timeout=0.5)
                    except CallError:
                        pass                         # the call event says what happened
                await asyncio.sleep(1)

Every request received and every call made becomes one telemetry line (``request`` and
``call`` events), and every one of them goes through the fault layer: that is why
programs call peers with ``node.call`` and never open connections of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from . import faults as fault_kinds
from .config import Config, OnChange
from .faults import Faults
from .telemetry import RUNTIME_EVENTS, Telemetry

Request = web.Request
Response = web.StreamResponse
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TaskFunction = Callable[[], Awaitable[None]]

FROM_HEADER = "X-Distlab-From"  # added to every call: the callee's telemetry names its caller
NODE_HEADER = "X-Distlab-Node"  # added to every response: who answered

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# W3C Trace Context: ``traceparent`` on a request, ``traceresponse`` on its answer, both
# ``<version>-<trace id>-<span id>-<flags>``. A call or request that carries one has the
# trace id on its telemetry line, so the lab can open the trace of a request it shows.
TRACE_HEADER_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
SHUTDOWN_GRACE_S = 1.5  # in-flight requests get this long to finish on SIGTERM
DROP_POLL_S = 0.25  # how often a dropped request checks whether its caller gave up
DROP_HOLD_MAX_S = 300.0  # a dropped request is hung up on after this long at most
TASK_RESTART_S = 1.0  # a background task that crashed is started again after this
OBSERVE_FLUSH_S = 0.25  # changed gauges and tables are written at most this often
OBSERVE_REPEAT_S = 4.0  # and everything observed is written again this often, so a
# reader that (re)attaches mid-stream (the supervisor reads 5 s back) soon knows it all
MAX_TABLE_ROWS = 50
PARAMS_ENV = "DISTLAB_PARAMS"  # the pattern's params, as one JSON object


@dataclass(frozen=True)
class Peer:
    """One entry of the node's address book (every node of the sandbox, itself included)."""

    name: str
    role: str
    address: str  # "host:port"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role, "address": self.address}


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) → (host, port); raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def parse_peers(value: Any) -> list[Peer]:
    """Validate an address book (``DISTLAB_PEERS`` or a ``peers`` control message)."""
    if not isinstance(value, list):
        raise ValueError('peers must be a list of {"name", "role", "address"} objects')
    peers: list[Peer] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"name", "role", "address"}:
            raise ValueError(f'peers[{index}] must have exactly "name", "role" and "address"')
        name, role, address = item["name"], item["role"], item["address"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"peers[{index}]: bad name {name!r}")
        if not isinstance(role, str) or not NAME_RE.match(role):
            raise ValueError(f"peers[{index}]: bad role {role!r}")
        if not isinstance(address, str):
            raise ValueError(f"peers[{index}]: address must be host:port")
        split_address(address)
        if name in seen:
            raise ValueError(f"peers[{index}]: {name!r} is listed twice")
        seen.add(name)
        peers.append(Peer(name, role, address))
    return peers


def trace_id(*headers: Mapping[str, str] | None) -> str | None:
    """The trace id of the first ``traceparent`` or ``traceresponse`` header found in
    ``headers`` (a request's, then its answer's), or None."""
    for found in headers:
        for name, value in (found or {}).items():
            if name.lower() in ("traceparent", "traceresponse"):
                match = TRACE_HEADER_RE.match(value.strip())
                if match and match[1] != "0" * 32:
                    return match[1]
    return None


def tls_reason(exc: BaseException) -> str:
    """What OpenSSL said about a failed handshake, in its own words: the verification
    message (``certificate has expired``) or the alert the other side sent
    (``sslv3 alert certificate revoked``)."""
    for error in (getattr(exc, "certificate_error", None), getattr(exc, "os_error", None), exc):
        message = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        if message:
            return str(message).replace("_", " ").lower()
    return "handshake failed"


class CallError(Exception):
    """A call got no HTTP answer. ``reason`` says what the caller saw:

    - ``"timeout"``: no answer before the call's timeout,
    - ``"connect"``: could not connect (refused, unreachable, unknown host),
    - ``"disconnected"``: the peer closed the connection without answering,
    - ``"partitioned"``: a partition fault on this node cut the call at once,
    - ``"unknown-peer"``: the name is not in the address book,
    - ``"tls"``: a TLS call whose handshake failed (``detail`` says why, as OpenSSL put
      it: ``certificate has expired``, ``sslv3 alert certificate revoked``, …),
    - ``"error"``: anything else.
    """

    def __init__(self, peer: str, reason: str, detail: str = "") -> None:
        super().__init__(f"call to {peer} failed: {reason}" + (f" ({detail})" if detail else ""))
        self.peer = peer
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Reply:
    """A peer's HTTP answer, read completely."""

    peer: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Node:
    def __init__(
        self,
        *,
        name: str,
        role: str,
        pattern: str,
        sandbox: str,
        listen: str,
        peers: list[Peer],
        env: Mapping[str, str],
        telemetry: Telemetry,
    ) -> None:
        self.name = name
        self.role = role
        self.pattern = pattern
        self.sandbox = sandbox
        self.listen = listen
        self.env = env
        self.telemetry = telemetry
        self.config = Config()
        self.faults = Faults()
        self._peers = {p.name: p for p in peers}
        self._routes: list[tuple[str, str, Handler]] = []
        self._task_functions: list[TaskFunction] = []
        self._peer_listeners: list[Callable[[], None]] = []
        self._status: Callable[[], dict[str, Any]] | None = None
        self._started = time.monotonic()
        self._from_header = {FROM_HEADER: name}
        self._node_header = {NODE_HEADER: name}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._server_tls: ssl.SSLContext | None = None
        self._runner: web.AppRunner | None = None
        # What the program observes (the pattern's ``observe``): current values, and
        # which gauges and tables changed since they were last written.
        self._gauges: dict[str, float] = {}
        self._states: dict[str, str] = {}
        self._tables: dict[str, list[dict[str, Any]]] = {}
        self._dirty_gauges: set[str] = set()
        self._dirty_tables: set[str] = set()
        self._params: dict[str, Any] | None = None

    # ---- declaring what the program does (call these from setup) ---------------------

    def route(self, path: str, method: str = "GET") -> Callable[[Handler], Handler]:
        """Decorator: serve ``method path`` with an ``async def handler(request)``."""

        def register(handler: Handler) -> Handler:
            self._routes.append((method, path, handler))
            return handler

        return register

    def task(self, function: TaskFunction) -> TaskFunction:
        """Decorator: run ``async def function()`` in the background while the node serves
        (cancelled on shutdown; restarted after a second if it crashes)."""
        self._task_functions.append(function)
        return function

    def setting(
        self,
        key: str,
        default: Any,
        *,
        choices: list[str] | tuple[str, ...] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        on_change: OnChange | None = None,
    ) -> Any:
        """Declare a live setting (bool, int, float or string, typed by its default), read
        with ``node.config[key]`` and changed by ``{"op": "config", "set": {key: value}}``.
        ``on_change(new, previous)`` runs after a change."""
        return self.config.declare(
            key, default, choices=choices, minimum=minimum, maximum=maximum, on_change=on_change
        )

    def on_peers(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Decorator: call ``listener()`` after the address book is replaced (scaling)."""
        self._peer_listeners.append(listener)
        return listener

    def status(self, provider: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """Decorator: ``provider()`` returns what the program wants ``state`` to report."""
        self._status = provider
        return provider

    def serve_tls(self, context: ssl.SSLContext) -> None:
        """Serve HTTPS with ``context`` instead of plain HTTP (call it from setup). The
        program may change the context while the node serves (load a renewed certificate,
        set ``verify_mode``): each new connection's handshake uses it as it is then."""
        self._server_tls = context

    def peer_certificate(self, request: web.Request) -> dict[str, Any]:
        """The certificate the caller presented on a TLS connection, as
        ``ssl.SSLSocket.getpeercert()`` gives it (``subjectAltName``, ``serialNumber``,
        ``notAfter``, …); empty when it presented none, or on plain HTTP."""
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        return cert if isinstance(cert, dict) else {}

    # ---- helpers for programs ----------------------------------------------------------

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def peers_with_role(self, role: str) -> list[Peer]:
        return [p for p in self._peers.values() if p.role == role]

    def json(
        self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(data, status=status, headers=headers)

    def relay(self, reply: Reply, headers: Mapping[str, str] | None = None) -> web.Response:
        """Answer with a peer's reply as it came (status, body, content type, and the
        W3C ``traceresponse`` that says which trace the request became)."""
        out = {"Content-Type": reply.headers.get("Content-Type", "application/octet-stream")}
        if "traceresponse" in reply.headers:
            out["traceresponse"] = reply.headers["traceresponse"]
        out.update(headers or {})
        return web.Response(body=reply.body, status=reply.status, headers=out)

    def env_float(self, key: str, default: float) -> float:
        raw = self.env.get(key, "")
        try:
            return float(raw) if raw != "" else default
        except ValueError:
            raise ValueError(f"{key} must be a number, got {raw!r}") from None

    def env_json(self, key: str, default: Any) -> Any:
        raw = self.env.get(key, "")
        try:
            return json.loads(raw) if raw != "" else default
        except ValueError:
            raise ValueError(f"{key} must be JSON, got {raw!r}") from None

    def state(self, event: str, **fields: Any) -> None:
        """Emit a state-change event (``ejected``, ``policy``, …) on the telemetry stream."""
        self.telemetry.emit("state", event=event, **fields)

    def emit(self, type_: str, **fields: Any) -> None:
        """Emit an event of a program-defined type (document it in TELEMETRY.md)."""
        self.telemetry.emit(type_, **fields)

    # ---- what the program observes: the spec's ``observe`` (TELEMETRY.md) -----------------

    def event(self, event_id: str, **fields: Any) -> None:
        """Something happened that the event log should say (``ejected``, ``keys_moved``):
        declare it in the spec's ``observe.events``, whose text names these fields."""
        if event_id in RUNTIME_EVENTS:
            raise ValueError(f"event {event_id!r} is the runtime's own: choose another name")
        self.state(event_id, **fields)

    def gauge(self, gauge_id: str, value: float) -> None:
        """Set a declared gauge (a number charted per node: lag, keys, queue depth). Changes
        are written at most every OBSERVE_FLUSH_S, so set it as often as it changes."""
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(f"gauge {gauge_id!r} takes a number, got {value!r}")
        if self._gauges.get(gauge_id) != value:
            self._gauges[gauge_id] = value
            self._dirty_gauges.add(gauge_id)

    def set_state(self, state_id: str, value: str) -> None:
        """Set a declared state (one of its values: ``open``, ``leader``); a change is
        written at once and becomes an event and a badge on this node."""
        if not isinstance(value, str):
            raise ValueError(f"state {state_id!r} takes a string, got {value!r}")
        previous = self._states.get(state_id)
        if previous != value:
            self._states[state_id] = value
            self.state("set", name=state_id, value=value, previous=previous)

    def table(self, table_id: str, rows: list[dict[str, Any]]) -> None:
        """Replace a declared table's rows (at most MAX_TABLE_ROWS; each a mapping of the
        table's column ids to numbers or short strings; the first column is the key)."""
        if len(rows) > MAX_TABLE_ROWS:
            raise ValueError(f"table {table_id!r}: at most {MAX_TABLE_ROWS} rows")
        copied = [dict(row) for row in rows]
        if self._tables.get(table_id) != copied:
            self._tables[table_id] = copied
            self._dirty_tables.add(table_id)

    def flush_observed(self) -> None:
        """Write the gauges and tables changed since the last write (done every
        OBSERVE_FLUSH_S while the node serves)."""
        if self._dirty_gauges:
            values = {k: self._gauges[k] for k in sorted(self._dirty_gauges)}
            self._dirty_gauges.clear()
            self.telemetry.emit("gauges", values=values)
        for table_id in sorted(self._dirty_tables):
            self.telemetry.emit("table", table=table_id, rows=self._tables[table_id])
        self._dirty_tables.clear()

    async def _write_observed(self) -> None:
        loop = asyncio.get_running_loop()
        repeat_at = loop.time() + OBSERVE_REPEAT_S
        while True:
            await asyncio.sleep(OBSERVE_FLUSH_S)
            if loop.time() >= repeat_at:
                repeat_at = loop.time() + OBSERVE_REPEAT_S
                self._dirty_gauges.update(self._gauges)
                self._dirty_tables.update(self._tables)
                for state_id, value in self._states.items():  # the same value: no event
                    self.state("set", name=state_id, value=value, previous=value)
            self.flush_observed()

    def param(self, name: str, default: Any = None) -> Any:
        """One of the pattern's ``params`` (from DISTLAB_PARAMS), or ``default``."""
        if self._params is None:
            params = self.env_json(PARAMS_ENV, {})
            self._params = params if isinstance(params, dict) else {}
        return self._params.get(name, default)

    # ---- calling peers -----------------------------------------------------------------

    async def call(
        self,
        peer: str,
        path: str = "/",
        *,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        json: Any = None,
        timeout: float = 2.0,
        route: str | None = None,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        """Call a peer by name; return its answer (any status) or raise CallError when
        there is none. ``json`` is sent as the body, ``headers`` with the request (a
        ``traceparent``, say). Emits one ``call`` event either way (``route`` defaults to
        the path: give a template like ``/kv/{key}`` instead when the path holds a key, so
        the telemetry groups the calls). With ``tls`` (a client
        context) the call is HTTPS on a connection of its own: every such call makes a
        full handshake, so a certificate that expired or was revoked fails the next call
        (error ``tls``), never a connection kept from before."""
        started = time.monotonic()
        route = route or path
        fault: str | None = None
        try:
            target = self._peers.get(peer)
            if target is None:
                raise CallError(peer, "unknown-peer")
            faults = self.faults
            if faults.any:
                if faults.cuts(peer):
                    fault = "partition"
                    raise CallError(peer, "partitioned")
                if faults.drops():  # the request is lost on the way: wait for our timeout
                    fault = "drop"
                    await asyncio.sleep(timeout)
                    raise CallError(peer, "timeout")
                delay = faults.delay_s()
                if delay:
                    fault = "latency"
                    await asyncio.sleep(min(delay, timeout))
                    if delay >= timeout:
                        raise CallError(peer, "timeout")
            remaining = timeout - (time.monotonic() - started)
            reply = await self._http(
                peer, target.address, method, path, params, json, remaining, headers, tls
            )
        except CallError as exc:
            trace = trace_id(headers)
            self._record_call(peer, method, route, 0, started, exc.reason, fault, trace)
            raise
        trace = trace_id(headers, reply.headers)
        self._record_call(peer, method, route, reply.status, started, None, fault, trace)
        return reply

    async def _http(
        self,
        peer: str,
        address: str,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        timeout: float,
        extra_headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        if self._session is None:
            raise CallError(peer, "error")
        headers = dict(extra_headers or {})
        headers.update(self._from_header)
        scheme, options = "http", dict[str, Any]()
        if tls is not None:
            scheme, options = "https", {"ssl": tls}
            headers["Connection"] = "close"  # one handshake per call
        try:
            async with self._session.request(
                method,
                f"{scheme}://{address}{path}",
                params=params,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(timeout, 0.001)),
                **options,
            ) as response:
                body = await response.read()
                return Reply(peer, response.status, response.headers, body)
        except TimeoutError:
            raise CallError(peer, "timeout") from None
        except aiohttp.ClientSSLError as exc:
            raise CallError(peer, "tls", tls_reason(exc)) from None
        except aiohttp.ClientConnectorError as exc:
            if tls is not None and isinstance(exc.os_error, ConnectionResetError):
                # Connected, then hung up on mid-handshake: how an asyncio server (and
                # many others) refuses a client certificate, without a TLS alert.
                raise CallError(peer, "tls", "reset during the handshake") from None
            raise CallError(peer, "connect") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
            raise CallError(peer, "disconnected") from None
        except (aiohttp.ClientError, OSError, RuntimeError):
            raise CallError(peer, "error") from None

    def _record_call(
        self,
        peer: str,
        method: str,
        route: str,
        status: int,
        started: float,
        error: str | None,
        fault: str | None,
        trace: str | None = None,
    ) -> None:
        ms = round((time.monotonic() - started) * 1000, 2)
        extra = {"fault": fault} if fault else {}
        if trace:
            extra["trace"] = trace
        self.telemetry.emit(
            "call",
            src=self.name,
            dst=peer,
            method=method,
            route=route,
            status=status,
            ms=ms,
            error=error,
            **extra,
        )

    # ---- serving -----------------------------------------------------------------------

    def _serving(self, handler: Handler, route: str) -> Handler:
        """``handler`` behind the inbound fault layer, with a ``request`` event each time."""

        async def inbound(request: web.Request) -> web.StreamResponse:
            return await self._inbound(request, handler, route)

        return inbound

    async def _inbound(
        self, request: web.Request, handler: Handler, route: str
    ) -> web.StreamResponse:
        started = time.monotonic()
        src = request.headers.get(FROM_HEADER)
        task = request.task
        self._inflight.add(task)
        status = 0
        extra: dict[str, Any] = {}
        answered: Mapping[str, str] | None = None
        try:
            faults = self.faults
            if faults.any:
                if faults.cuts(src):  # partition: close the connection, answer nothing
                    extra = {"error": "partitioned", "fault": "partition"}
                    return self._hang_up(request)
                if faults.drops():  # drop: hold the request until the caller gives up
                    extra = {"error": "dropped", "fault": "drop"}
                    await self._hold(request)
                    return self._hang_up(request)
                delay = faults.delay_s()
                if delay:
                    extra = {"fault": "latency"}
                    await asyncio.sleep(delay)
                injected = faults.error_status()
                if injected is not None:
                    extra = {"fault": "errors"}
                    status = injected
                    body = {"error": "injected fault", "fault": "errors", "node": self.name}
                    return self.json(body, status=injected, headers=self._node_header)
            response = await handler(request)
            status, answered = response.status, response.headers
            response.headers[NODE_HEADER] = self.name
            return response
        except web.HTTPException as exc:  # raised by the program: it is the answer
            status = exc.status
            exc.headers[NODE_HEADER] = self.name
            raise
        except asyncio.CancelledError:
            extra = {"error": "cancelled"}
            raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            status = 500
            extra = {"error": "program"}
            body = {"error": "the node program failed", "node": self.name}
            return self.json(body, status=500, headers=self._node_header)
        finally:
            self._inflight.discard(task)
            ms = round((time.monotonic() - started) * 1000, 2)
            trace = trace_id(request.headers, answered)
            if trace:
                extra["trace"] = trace
            self.telemetry.emit(
                "request",
                src=src,
                dst=self.name,
                method=request.method,
                route=route,
                status=status,
                ms=ms,
                **extra,
            )

    def _hang_up(self, request: web.Request) -> web.Response:
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone

    async def _hold(self, request: web.Request) -> None:
        deadline = time.monotonic() + DROP_HOLD_MAX_S
        while not self._stopping and time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(DROP_POLL_S)

    async def _health(self, request: web.Request) -> web.Response:
        return self.json({"node": self.name, "ok": True})

    async def _not_found(self, request: web.Request) -> web.Response:
        return self.json({"error": "not found", "node": self.name}, status=404)

    # ---- lifecycle (called by run.py) --------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._serving(self._health, "/health"))
        for method, path, handler in self._routes:
            app.router.add_route(method, path, self._serving(handler, path))
        # Last: whatever matched nothing above (a 404, still faulted and recorded).
        app.router.add_route("*", "/{path:.*}", self._serving(self._not_found, "unmatched"))
        # No DNS cache: a restarted node's new address is used at once.
        connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False)
        self._session = aiohttp.ClientSession(connector=connector)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = split_address(self.listen)
        await web.TCPSite(self._runner, host, port, ssl_context=self._server_tls).start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_task(f)) for f in self._task_functions]
        self._tasks.append(loop.create_task(self._write_observed()))

    async def _run_task(self, function: TaskFunction) -> None:
        while not self._stopping:
            try:
                await function()
                return
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                self.state("task_failed", task=function.__name__, error=repr(exc)[:200])
                await asyncio.sleep(TASK_RESTART_S)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish briefly, close everything."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            cleanup = asyncio.get_running_loop().create_task(self._runner.cleanup())
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            while self._inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for task in list(self._inflight):
                task.cancel()
            try:
                await asyncio.wait_for(cleanup, SHUTDOWN_GRACE_S * 2)
            except Exception:  # a timeout included: exit anyway, say why on stderr
                traceback.print_exc(file=sys.stderr)
        if self._session is not None:
            await self._session.close()

    @property
    def uptime_s(self) -> float:
        return round(time.monotonic() - self._started, 3)

    # ---- what the control channel changes ----------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "role": self.role,
            "pattern": self.pattern,
            "sandbox": self.sandbox,
            "pid": os.getpid(),
            "uptime_s": self.uptime_s,
            "listen": self.listen,
            "in_flight": len(self._inflight),
            "faults": self.faults.as_dict(),
            "config": dict(self.config),
            "config_schema": self.config.schema(),
            "peers": [p.as_dict() for p in self._peers.values()],
            "status": self._status() if self._status is not None else {},
            "observed": {
                "gauges": dict(self._gauges),
                "states": dict(self._states),
                "tables": {k: list(v) for k, v in self._tables.items()},
            },
        }

    def set_fault(self, kind: str, params: Mapping[str, Any]) -> None:
        others = set(self._peers) - {self.name}
        fault = fault_kinds.parse(kind, params, self_name=self.name, peers=others)
        self.faults.set(kind, fault)
        self.state("fault", kind=kind, params=fault_kinds.describe(fault))

    def clear_faults(self, kind: str | None) -> list[str]:
        cleared = self.faults.clear(kind)
        for k in cleared:
            self.state("fault_cleared", kind=k)
        return cleared

    def configure(self, changes: Mapping[str, Any]) -> None:
        for key, value, previous in self.config.apply(changes):
            self.state("config", key=key, value=value, previous=previous)
            self.config.notify(key, value, previous)

    def replace_peers(self, peers: list[Peer]) -> None:
        self._peers = {p.name: p for p in peers}
        self.state("peers", peers=[p.name for p in peers])
        for listener in self._peer_listeners:
            listener()
