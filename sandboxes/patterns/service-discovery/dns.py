"""The DNS server: the registry's list, published as real DNS records over UDP.

It watches the registry (the same long poll a client uses) and answers DNS queries on
UDP, on the same port number as its HTTP: the wire format of RFC 1035, written here with
the standard library only (``struct``). For the zone ``sandbox.internal.`` it answers:

- ``_api._tcp.sandbox.internal. SRV``: one record per live ``api`` instance (RFC 2782:
  priority 10, weight 10, the instance's port, its host name), and the matching ``A``
  records in the additional section, so one question gives the client everything;
- ``api-N.sandbox.internal. A``: one instance's IPv4 address;
- "no such name" (NXDOMAIN) for anything else, and "no data" when no instance is live,
  both with the zone's ``SOA`` record, whose last field tells resolvers how long they may
  cache the *absence* (negative caching, RFC 2308).

Every record carries the TTL ``ttl_s`` (a live setting, 10 s by default): how long a
client may keep the answer before asking again. This server always answers with the
registry's latest list; the staleness comes from the caches that keep answers for a TTL.
When the registry cannot be reached, it keeps answering from the last list it got.

Faults act on DNS as they do on HTTP: a partition or a drop leaves queries unanswered,
latency delays the answer, and errors answer SERVFAIL. Each query is written to telemetry
as a ``request`` line (method ``DNS``, route ``/SRV/_api._tcp.sandbox.internal``, status
200 for an answer, 404 for NXDOMAIN, 503 for SERVFAIL). Its table ``records`` shows the
records it serves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from typing import Any, NamedTuple

from sandboxes.runtime.node import CallError, Node, split_address

ZONE = "sandbox.internal"
SERVICE = f"_api._tcp.{ZONE}"  # _service._protocol.zone, as RFC 2782 names it
TYPE_A, TYPE_SOA, TYPE_SRV = 1, 6, 33
TYPE_NAMES = {TYPE_A: "A", TYPE_SOA: "SOA", TYPE_SRV: "SRV"}
CLASS_IN = 1
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3
STATUS = {NOERROR: 200, NXDOMAIN: 404, SERVFAIL: 503}  # how telemetry shows an answer
REGISTRY = "registry"


# ---- the wire format (RFC 1035, section 4) ------------------------------------------------


def encode_name(name: str) -> bytes:
    """``api-1.sandbox.internal`` → ``\\x05api-1\\x07sandbox\\x08internal\\x00``."""
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\x00"


def decode_name(data: bytes, offset: int) -> tuple[str, int]:
    """A name at ``offset`` (labels, or a pointer to an earlier name); returns it and the
    offset just after it."""
    labels: list[str] = []
    end = None
    for _ in range(128):  # a bound, against pointer loops in a malformed message
        length = data[offset]
        if length & 0xC0 == 0xC0:  # compression: a pointer to the rest of the name
            end = offset + 2 if end is None else end
            offset = struct.unpack_from("!H", data, offset)[0] & 0x3FFF
            continue
        if length == 0:
            return ".".join(labels), (offset + 1 if end is None else end)
        labels.append(data[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    raise ValueError("malformed name")


class Record(NamedTuple):
    name: str
    type: int
    ttl: int
    data: Any  # A: "10.0.0.1"; SRV: (priority, weight, port, target); SOA: (mname, …)

    def encode(self) -> bytes:
        if self.type == TYPE_A:
            rdata = ipaddress.IPv4Address(self.data).packed
        elif self.type == TYPE_SRV:
            priority, weight, port, target = self.data
            rdata = struct.pack("!HHH", priority, weight, port) + encode_name(target)
        else:  # SOA: two names, then serial, refresh, retry, expire, minimum (the negative TTL)
            mname, rname, *numbers = self.data
            rdata = encode_name(mname) + encode_name(rname) + struct.pack("!5I", *numbers)
        fixed = struct.pack("!HHIH", self.type, CLASS_IN, self.ttl, len(rdata))
        return encode_name(self.name) + fixed + rdata

    def text(self) -> str:
        if self.type == TYPE_SRV:
            return "{} {} {} {}.".format(*self.data)
        return str(self.data)


def build_query(query_id: int, name: str, qtype: int) -> bytes:
    """A question, with "recursion desired" set as stub resolvers do."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def parse_message(data: bytes) -> dict[str, Any]:
    """A query or a response: id, rcode, the question, and every record (A, SRV, SOA
    decoded; others kept as bytes) by section."""
    query_id, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    offset = 12
    questions = []
    for _ in range(qdcount):
        name, offset = decode_name(data, offset)
        qtype, _qclass = struct.unpack_from("!HH", data, offset)
        questions.append((name, qtype))
        offset += 4
    sections: list[list[Record]] = []
    for count in (ancount, nscount, arcount):
        records = []
        for _ in range(count):
            name, offset = decode_name(data, offset)
            rtype, _rclass, ttl, length = struct.unpack_from("!HHIH", data, offset)
            offset += 10
            rdata: Any = data[offset : offset + length]
            if rtype == TYPE_A:
                rdata = str(ipaddress.IPv4Address(rdata))
            elif rtype == TYPE_SRV:
                target, _ = decode_name(data, offset + 6)
                rdata = (*struct.unpack_from("!HHH", data, offset), target)
            elif rtype == TYPE_SOA:
                mname, after = decode_name(data, offset)
                rname, after = decode_name(data, after)
                rdata = (mname, rname, *struct.unpack_from("!5I", data, after))
            records.append(Record(name, rtype, ttl, rdata))
            offset += length
        sections.append(records)
    answers, authority, additional = sections
    return {
        "id": query_id,
        "response": bool(flags & 0x8000),
        "rcode": flags & 0x000F,
        "questions": questions,
        "answers": answers,
        "authority": authority,
        "additional": additional,
    }


def build_response(
    query: bytes,
    rcode: int,
    answers: list[Record],
    authority: list[Record],
    additional: list[Record],
) -> bytes:
    """The answer to ``query``: its id and question echoed, "authoritative" set."""
    query_id, flags = struct.unpack_from("!HH", query)
    _name, end = decode_name(query, 12)
    question = query[12 : end + 4]
    flags = 0x8000 | 0x0400 | (flags & 0x0100) | rcode  # response, authoritative, RD copied
    counts = (1, len(answers), len(authority), len(additional))
    header = struct.pack("!6H", query_id, flags, *counts)
    return header + question + b"".join(r.encode() for r in answers + authority + additional)


# ---- the zone: built from the registry's list ------------------------------------------


class Zone:
    def __init__(self) -> None:
        self.instances: list[dict[str, str]] = []  # as the registry's /watch gives them
        self.ips: dict[str, str] = {}  # host → IPv4 address, for the A records
        self.serial = 0

    def records(self, ttl: int) -> tuple[list[Record], dict[str, Record]]:
        """The SRV records of the service, and the A record of each target."""
        srv, a_records = [], {}
        for entry in self.instances:
            host, port = split_address(entry["address"])
            target = f"{entry['instance']}.{ZONE}"
            srv.append(Record(SERVICE, TYPE_SRV, ttl, (10, 10, port, target)))
            if host in self.ips:
                a_records[target] = Record(target, TYPE_A, ttl, self.ips[host])
        return srv, a_records

    def answer(self, name: str, qtype: int, ttl: int) -> tuple[int, list[Record], list[Record]]:
        """(rcode, answers, additional) for one question."""
        srv, a_records = self.records(ttl)
        name = name.rstrip(".").lower()
        if name == SERVICE:
            return NOERROR, (srv if qtype == TYPE_SRV else []), list(a_records.values())
        if name in a_records:
            return NOERROR, ([a_records[name]] if qtype == TYPE_A else []), []
        return NXDOMAIN, [], []  # no such name (an instance no longer listed, say)

    def soa(self, ttl: int) -> Record:
        host = f"dns.{ZONE}"
        return Record(
            ZONE, TYPE_SOA, ttl, (host, f"hostmaster.{ZONE}", self.serial, 60, 60, 600, ttl)
        )


async def ipv4_of(host: str) -> str | None:
    """The instance's IPv4 address: the registry holds what the instance said (an address,
    or a name the sandbox's network resolves)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        loop = asyncio.get_running_loop()
        found = await asyncio.wait_for(loop.getaddrinfo(host, None, family=socket.AF_INET), 1.0)
    except (OSError, TimeoutError):
        return None
    return str(found[0][4][0]) if found else None


def setup(node: Node) -> None:
    node.setting(
        "ttl_s", int(node.param("dns_ttl_s", 10)), minimum=1, maximum=60,
        on_change=lambda new, previous: show_records(),
    )  # fmt: skip
    wait_s = float(node.param("watch_wait_s", 5))
    zone = Zone()
    by_host: dict[str, str] = {}  # source IP → node name, where that is unambiguous

    def caller(host: str) -> str | None:
        names = [p.name for p in node.peers if split_address(p.address)[0] == host]
        return names[0] if len(names) == 1 else None

    def record(src: str | None, route: str, status: int, started: float, **extra: Any) -> None:
        ms = round((time.monotonic() - started) * 1000, 2)
        node.emit("request", src=src, dst=node.name, method="DNS", route=route, status=status,
                  ms=ms, **extra)  # fmt: skip

    async def handle(data: bytes, sender: tuple[str, int], reply: Any) -> None:
        started = time.monotonic()
        src = by_host.setdefault(sender[0], caller(sender[0]) or "")
        try:
            name, qtype = parse_message(data)["questions"][0]
        except (ValueError, IndexError, struct.error):
            return  # not a DNS question: ignore it, as servers do
        route = f"/{TYPE_NAMES.get(qtype, qtype)}/{name.rstrip('.')}"
        faults = node.faults
        if faults.any:  # the runtime's faults, applied to DNS as to HTTP
            if faults.cuts(None) or faults.drops():
                kind = "partition" if faults.cuts(None) else "drop"
                record(src or None, route, 0, started, error="dropped", fault=kind)
                return
            delay = faults.delay_s()
            if delay:
                await asyncio.sleep(delay)
            if faults.error_status() is not None:
                reply.sendto(build_response(data, SERVFAIL, [], [], []), sender)
                record(src or None, route, STATUS[SERVFAIL], started, fault="errors")
                return
        ttl = node.config["ttl_s"]
        rcode, answers, additional = zone.answer(name, qtype, ttl)
        authority = [] if answers else [zone.soa(ttl)]  # "nothing", and for how long
        reply.sendto(build_response(data, rcode, answers, authority, additional), sender)
        record(src or None, route, STATUS[rcode], started)

    class Server(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            asyncio.get_running_loop().create_task(handle(data, addr, self.transport))

    def show_records() -> None:
        srv, a_records = zone.records(node.config["ttl_s"])
        rows = []
        for record in srv:
            target = record.data[3]
            a = a_records.get(target)
            rows.append({
                "target": target + ".",
                "srv": "{} {} {}".format(*record.data[:3]),
                "a": a.data if a else "",
                "ttl": f"{record.ttl} s",
            })  # fmt: skip
        node.table("records", rows[:50])

    @node.task
    async def serve_udp() -> None:
        host, port = split_address(node.listen)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Server, local_addr=(host, port))
        try:
            await asyncio.Future()  # serve until the node stops
        finally:
            transport.close()

    @node.task
    async def follow_registry() -> None:
        show_records()
        index = None
        while True:
            params = {"index": str(index)} if index is not None else {}
            try:
                reply = await node.call(REGISTRY, "/watch", params=params, timeout=wait_s + 3)
            except CallError:
                await asyncio.sleep(1.0)  # keep serving the last list; try again
                continue
            if reply.status != 200:
                await asyncio.sleep(1.0)
                continue
            body = reply.json()
            if body["index"] != index:
                for entry in body["instances"]:
                    host = split_address(entry["address"])[0]
                    if host not in zone.ips and (ip := await ipv4_of(host)) is not None:
                        zone.ips[host] = ip
                index, zone.instances = body["index"], body["instances"]
                zone.serial += 1
                show_records()
