"""A classroom soak: N learners using the platform for a long time while the platform's own
processes fail under them. Prints one JSON object.

    DEBUG=true .venv/bin/python bench/soak.py [--learners 20] [--minutes 60]
        [--pattern replicated-lb] [--engine local|docker] [--fault-every 180]
        [--platform-faults supervisor,worker,web,redis] [--seed N]

A throwaway installation (``_harness``) run as the classroom stack runs it, each piece its
own process: the web server (``manage.py serve``), a Celery worker (2 processes) and beat,
the telemetry supervisor (``manage.py supervise``), and a Redis of its own on a free
loopback port (never the machine's shared Redis or PostgreSQL; the database is the
installation's SQLite file).

Each learner has a real session and does what a learner does in a browser, over HTTP
through the same views and form fields as the page (htmx requests, the page's CSRF token):
loads the chapter page, launches its sandbox, polls the panel until it runs (or says why
it does not), watches it over the lab's WebSocket (reconnecting as ``lab.js`` does: on a
close, with the same backoff), then for a few minutes injects random faults on random
nodes, ends some early, changes live controls, starts experiments with a prediction and
reloads pages; then stops the sandbox, waits for it to be gone, and launches again.

A platform process that exits by itself is started again, as the classroom stack's
``restart: unless-stopped`` does, and counted as a crash (with the end of its log).

Every ``--fault-every`` seconds (on average, randomly 0.5 to 1.5 times that) a platform
fault hits one of the processes the soak started: ``supervisor`` (SIGKILL, started again),
``worker`` (SIGKILL to the worker and its pool while a launch, stop or experiment is in
flight if one comes within 30 s, started again), ``web`` (SIGTERM, started again: a
deploy) or ``redis`` (restarted, empty: queued tasks, channel groups and the cache lost).

At the end the learners stop their sandboxes, the soak waits for every sandbox to end and
for one more housekeeping round, then counts what is left. Figures:

- sandboxes launched (running, as their learner saw it), launch attempts, failed launches
  with their reasons, and those not explained to their learner (a launch refused with no
  message, a sandbox failed with no error on its panel, or one still not running after
  5 minutes);
- faults injected by learners (and refused, with reasons), faults of the run (learners'
  and experiments') reverted and left active; experiment runs by outcome;
- page p50/p95 (full pages: chapter and course home) and action p95 (form posts), as the
  learner's client times them; requests that found the web server down; 5xx answers
  (each with the message the learner was shown, if any);
- WebSocket connects, reconnects, close codes, stalls (an open socket with no message for
  10 s while its sandbox runs: the page shows "Stream paused"; after 60 s of silence the
  learner reloads, counted as ``ws_reloads_after_stall``);
- the platform faults done, with how long each piece took to come back;
- per process (web, worker with its pool, supervisor, beat): memory (RSS), open file
  descriptors and threads at start, after the warm-up and at the end, and restarts; web
  memory growth is measured over the longest-lived web process, from its first sample
  after the warm-up to its last (the schedule restarts it);
- leaks: sandboxes the engine still has (containers and networks on Docker, node
  processes on the local engine), zombie processes under the platform's processes, and
  database rows of ended sandboxes that still claim something live (a sandbox not in an
  end state, a fault not reverted, an experiment still running).

Targets (issue 15): zero leaked objects, web memory growth <= 10 %, every failed launch
explained to its learner.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import html
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _harness import free_port, percentile, platform
from yarl import URL

TARGET_WEB_GROWTH_PCT = 10.0
PLATFORM_FAULTS = ("supervisor", "worker", "web", "redis")
# How long a learner waits: for a launch (housekeeping launches again one whose task was
# lost with a worker after twice SANDBOX_LAUNCH_TIMEOUT, 120 s), and for a stop.
LAUNCH_WAIT_S = 300.0
STOP_WAIT_S = 180.0
STALL_S = 10.0  # an open socket silent this long while the sandbox runs: a stall
RELOAD_AFTER_S = 60.0  # ...and this long: the learner reloads the page
SAMPLE_EVERY_S = 15.0

STATE = re.compile(r'id="sandbox-box" data-state="(\w+)"')
SANDBOX_ID = re.compile(r"/sandboxes/([0-9a-f]{32})/")
ALERT = re.compile(r'role="alert"[^>]*>([^<]*)<')
SANDBOX_MESSAGE = re.compile(r'data-testid="sandbox-message">([^<]*)<')
FAULT_MESSAGE = re.compile(r'data-testid="fault-message">([^<]*)<')
CONTROL_MESSAGE = re.compile(r'data-testid="control-message">([^<]*)<')
CSRF = re.compile(r'"X-CSRFToken": "([^"]+)"')
NODE_SELECT = re.compile(r'<select name="node"[^>]*>(.*?)</select>', re.S)
OPTION = re.compile(r'<option value="([^"]+)"')
REVERT = re.compile(r"/sandboxes/[0-9a-f]{32}/faults/(\d+)/revert/")
PREDICTION_ERROR = re.compile(r'data-testid="prediction-error-[^"]*">([^<]*)<')
ENDED_STATES = {"stopped", "failed", "expired", "none"}


class WebDown(Exception):
    """The web server did not answer for about a minute."""


@dataclass
class Figures:
    """What every learner counts, in one place (one event loop: no locks)."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    launch_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    unexplained: list[str] = field(default_factory=list)
    fault_refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    experiment_refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    ws_closes: collections.Counter[str] = field(default_factory=collections.Counter)
    ended_unasked: collections.Counter[str] = field(default_factory=collections.Counter)
    page_ms: list[float] = field(default_factory=list)
    action_ms: list[float] = field(default_factory=list)
    action_ms_by_route: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    launch_s: list[float] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    stall_onsets_s: list[int] = field(default_factory=list)  # since the start of the run
    started: float = 0.0


@dataclass
class Plan:
    """What the learners may do, read from the pattern (the page's forms offer the same)."""

    pattern: str
    chapter_url: str
    faults: tuple[str, ...]
    fault_fields: dict[str, list[tuple[str, float]]]  # kind → (form field, value)
    experiments: list[tuple[str, list[str]]]  # id → predictions to choose from
    controls: list[tuple[str, list[str]]]  # id → values to choose from


def reconnect_delay(retries: int) -> float:
    """``lab.js``'s backoff: 0.5 s doubling to at most 10 s, with jitter."""
    return min(10.0, 0.5 * 2**retries) * (0.5 + random.random() / 2)


def _text(match: re.Match[str] | None) -> str:
    return html.unescape(match[1]).strip() if match else ""


def _reason(message: str) -> str:
    """A message as a category: numbers and names out, so that reasons group."""
    message = re.sub(r"[0-9a-f]{32}", "<id>", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


class Learner:
    def __init__(
        self,
        number: int,
        base: str,
        session_key: str,
        plan: Plan,
        figures: Figures,
        end_at: float,
        seed: int,
    ) -> None:
        self.number = number
        self.base = base
        self.session_key = session_key
        self.plan = plan
        self.figures = figures
        self.end_at = end_at
        self.rng = random.Random(seed)
        self.csrf = ""
        self.session: aiohttp.ClientSession | None = None
        self.sandbox = ""
        self.nodes: list[str] = []
        self.ended_by_server = False  # the lab's socket closed with 4410

    # --- HTTP, as the browser sends it --------------------------------------------------

    async def request(
        self, method: str, path: str, *, data: dict[str, Any] | None = None, kind: str
    ) -> tuple[int, str]:
        """One request, retried while the web server is down (a restart); timed when
        it is answered. ``kind``: page (a full page), action (a form post) or poll."""
        assert self.session is not None
        headers = {}
        if kind != "page":
            headers["HX-Request"] = "true"
        if method == "POST":
            headers["X-CSRFToken"] = self.csrf
        for attempt in range(20):
            started = time.perf_counter()
            try:
                async with self.session.request(
                    method,
                    self.base + path,
                    data=data,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=60),
                ) as response:
                    text = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                self.figures.counts["requests_web_down"] += 1
                await asyncio.sleep(min(5.0, 0.5 * 2**attempt))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if status >= 500:  # answered, but not done: with a message for the learner?
                alert = " ".join(html.unescape(a).strip() for a in ALERT.findall(text) if a.strip())
                shown = f": {_reason(alert)[:100]}" if alert else " (no message)"
                self.figures.server_errors[f"{status} {method} {_route(path)}{shown}"] += 1
                return status, text
            if kind == "page":
                self.figures.page_ms.append(elapsed)
            elif kind == "action":
                self.figures.action_ms.append(elapsed)
                self.figures.action_ms_by_route[_route(path)].append(elapsed)
            return status, text
        raise WebDown(path)

    async def page(self, path: str) -> str:
        _status, text = await self.request("GET", path, kind="page")
        if found := CSRF.search(text):
            self.csrf = found[1]
        return text

    # --- one learner's session ----------------------------------------------------------

    async def run(self) -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1 (an address)
        jar.update_cookies({"sessionid": self.session_key}, URL(self.base))
        connector = aiohttp.TCPConnector(limit=4)
        async with aiohttp.ClientSession(cookie_jar=jar, connector=connector) as session:
            self.session = session
            await asyncio.sleep(self.rng.uniform(0, 20))  # a class arriving
            while time.monotonic() < self.end_at:
                try:
                    await self.cycle()
                except WebDown:
                    self.figures.counts["learner_gave_up_web_down"] += 1
                await asyncio.sleep(self.rng.uniform(2, 8))  # reads the chapter a little
            await self.leave()

    async def cycle(self) -> None:
        """Launch, watch and break things for a few minutes, stop."""
        await self.page(self.plan.chapter_url)
        if not await self.launch():
            return
        watcher = asyncio.create_task(self.watch())
        try:
            session_end = min(self.end_at, time.monotonic() + self.rng.uniform(90, 300))
            while time.monotonic() < session_end and not self.ended_by_server:
                await asyncio.sleep(self.rng.uniform(4, 12))
                if self.ended_by_server:
                    break
                action = self.rng.choices(
                    ["fault", "revert", "experiment", "control", "reload"], [5, 1, 2, 1, 2]
                )[0]
                if not await getattr(self, action)():
                    break  # the sandbox ended under the learner
            await self.stop()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def launch(self) -> bool:
        """Launch and wait until it runs; False (and why, counted) if it does not."""
        figures = self.figures
        figures.counts["launch_attempts"] += 1
        started = time.monotonic()
        status, panel = await self.request(
            "POST", f"/sandboxes/launch/{self.plan.pattern}/", kind="action"
        )
        message = _text(SANDBOX_MESSAGE.search(panel))
        state = _text(STATE.search(panel))
        found = SANDBOX_ID.search(panel)
        if message:  # refused: quota, rate limit, the engine... with a message
            figures.launch_failures[f"refused: {_reason(message)}"] += 1
            if state not in ENDED_STATES and found:  # their previous one still ends
                self.sandbox = found[1]
                await self.wait_ended()
            return False
        if not found or state in ENDED_STATES:
            figures.launch_failures[f"no sandbox, no message (HTTP {status})"] += 1
            figures.unexplained.append(f"launch answered {status} with no sandbox and no message")
            return False
        self.sandbox = found[1]
        deadline = started + LAUNCH_WAIT_S
        while state in {"requested", "starting"} and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # the panel polls every second
            status, answer = await self.request("GET", f"/sandboxes/{self.sandbox}/", kind="poll")
            if status < 500:  # htmx keeps the panel on an error, and polls again
                panel, state = answer, _text(STATE.search(answer))
        if state == "running":
            figures.counts["sandboxes_launched"] += 1
            figures.launch_s.append(time.monotonic() - started)
            select = NODE_SELECT.search(panel)
            self.nodes = OPTION.findall(select[1]) if select else []
            self.ended_by_server = False
            return True
        alert = " ".join(html.unescape(a).strip() for a in ALERT.findall(panel) if a.strip())
        if state in {"requested", "starting"}:
            figures.launch_failures[f"still {state} after {LAUNCH_WAIT_S:.0f} s"] += 1
            figures.unexplained.append(f"{self.sandbox[:8]} still {state} after 5 minutes")
            await self.stop()
            return False
        figures.launch_failures[f"{state}: {_reason(alert) or '(no message)'}"] += 1
        if not alert:
            figures.unexplained.append(f"{self.sandbox[:8]} {state} with no message on its panel")
        return False

    async def watch(self) -> None:
        """The lab's WebSocket, as lab.js keeps it: reconnect on a close (not on 4410, the
        sandbox ended, nor 4401/4404), with its backoff; a long silence is a stall, and a
        minute of it makes the learner reload the page (a new socket)."""
        assert self.session is not None
        figures = self.figures
        url = f"ws://{self.base.split('://', 1)[1]}/ws/sandboxes/{self.sandbox}/"
        retries = 0
        first = True
        while True:
            code: int | None = None
            reload = False
            try:
                async with self.session.ws_connect(
                    url, headers={"Origin": self.base}, heartbeat=None
                ) as ws:
                    figures.counts["ws_connects"] += 1
                    if not first:
                        figures.counts["ws_reconnects"] += 1
                    first = False
                    silent_since: float | None = None
                    while True:
                        try:
                            message = await ws.receive(timeout=STALL_S)
                        except TimeoutError:
                            now = time.monotonic()
                            if silent_since is None:
                                silent_since = now - STALL_S
                                figures.counts["ws_stalls"] += 1
                                figures.stall_onsets_s.append(round(silent_since - figures.started))
                            if now - silent_since >= RELOAD_AFTER_S:
                                figures.stall_s.append(now - silent_since)
                                figures.counts["ws_reloads_after_stall"] += 1
                                reload = True
                                break
                            continue
                        if message.type == aiohttp.WSMsgType.TEXT:
                            retries = 0
                            figures.counts["ws_messages"] += 1
                            if silent_since is not None:
                                figures.stall_s.append(time.monotonic() - silent_since)
                                silent_since = None
                            continue
                        code = ws.close_code
                        break
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                figures.ws_closes[f"connect failed: {type(exc).__name__}"] += 1
                code = -1
            if not reload and code != -1:
                figures.ws_closes[str(code)] += 1
            if code == 4410:
                self.ended_by_server = True
                return
            if code in (4401, 4404):
                return
            await asyncio.sleep(0.1 if reload else reconnect_delay(retries))
            retries += 1

    # --- what a learner does with a running sandbox (False: the sandbox has ended) ------

    def _ended(self, text: str) -> bool:
        """An answer that is the whole panel (the lab part asked of an ended sandbox)."""
        if 'id="sandbox-box"' not in text:
            return False
        state = _text(STATE.search(text))
        if state == "running":
            return False
        alert = " ".join(html.unescape(a).strip() for a in ALERT.findall(text) if a.strip())
        self.figures.ended_unasked[f"{state}: {_reason(alert) or '(no message)'}"] += 1
        return True

    async def fault(self) -> bool:
        plan = self.plan
        kind = self.rng.choice(plan.faults)
        data: dict[str, Any] = {
            "node": self.rng.choice(self.nodes or ["lb"]),
            "kind": kind,
            "duration": self.rng.choice([10, 10, 20, 30]),
        }
        data.update(plan.fault_fields.get(kind, []))
        status, text = await self.request(
            "POST", f"/sandboxes/{self.sandbox}/faults/", data=data, kind="action"
        )
        if self._ended(text):
            return False
        message = _text(FAULT_MESSAGE.search(text))
        if status == 200 and not message:
            self.figures.counts["faults_injected"] += 1
        else:
            self.figures.fault_refusals[_reason(message) or f"HTTP {status}"] += 1
        return True

    async def revert(self) -> bool:
        _status, text = await self.request("GET", f"/sandboxes/{self.sandbox}/faults/", kind="poll")
        if self._ended(text):
            return False
        active = REVERT.findall(text)
        if active:
            fault_id = self.rng.choice(active)
            _status, text = await self.request(
                "POST", f"/sandboxes/{self.sandbox}/faults/{fault_id}/revert/", kind="action"
            )
            self.figures.counts["faults_reverted_early"] += 1
            return not self._ended(text)
        return True

    async def experiment(self) -> bool:
        experiment, predictions = self.rng.choice(self.plan.experiments)
        status, text = await self.request(
            "POST",
            f"/sandboxes/{self.sandbox}/experiments/{experiment}/start/",
            data={"prediction": self.rng.choice(predictions)},
            kind="action",
        )
        error = _text(PREDICTION_ERROR.search(text))
        if status == 200 and not error:
            self.figures.counts["experiments_started"] += 1
        else:
            self.figures.experiment_refusals[_reason(error) or f"HTTP {status}"] += 1
        return True

    async def control(self) -> bool:
        if not self.plan.controls:
            return True
        control, values = self.rng.choice(self.plan.controls)
        status, text = await self.request(
            "POST",
            f"/sandboxes/{self.sandbox}/controls/",
            data={"control": control, "value": self.rng.choice(values)},
            kind="action",
        )
        if self._ended(text):
            return False
        message = _text(CONTROL_MESSAGE.search(text))
        done = status == 200 and not message
        self.figures.counts["controls_set" if done else "controls_refused"] += 1
        return True

    async def reload(self) -> bool:
        """A full page again: the chapter (with the live panel) or the course home."""
        await self.page(self.rng.choice([self.plan.chapter_url, self.plan.chapter_url, "/"]))
        return True

    async def stop(self) -> None:
        _status, text = await self.request(
            "POST", f"/sandboxes/{self.sandbox}/stop/", kind="action"
        )
        self.figures.counts["stops"] += 1
        await self.wait_ended(text)

    async def wait_ended(self, text: str = "") -> None:
        state = _text(STATE.search(text)) if text else ""
        deadline = time.monotonic() + STOP_WAIT_S
        while state not in ENDED_STATES and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            status, text = await self.request("GET", f"/sandboxes/{self.sandbox}/", kind="poll")
            if status < 500:
                state = _text(STATE.search(text))
        if state not in ENDED_STATES:
            self.figures.counts["stops_not_done_in_3_min"] += 1

    async def leave(self) -> None:
        """Time is up: nothing left running of this learner's."""
        with contextlib.suppress(WebDown):
            text = await self.page(self.plan.chapter_url)
            state = _text(STATE.search(text))
            found = SANDBOX_ID.search(text)
            if state not in ENDED_STATES and found:
                self.sandbox = found[1]
                await self.stop()


def _route(path: str) -> str:
    return re.sub(r"[0-9a-f]{32}", "<id>", re.sub(r"/\d+/", "/<n>/", path))


# --- the platform's processes: samples, faults ------------------------------------------

ROLES = {"web": "serve", "worker": "worker", "supervisor": "supervise", "beat": "beat"}


def _proc_table() -> dict[int, tuple[str, int]]:
    """Every process: pid → (state letter, parent pid)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                table[int(entry.name)] = (fields[0], int(fields[1]))
    return table


def _descendants(pid: int, table: dict[int, tuple[str, int]]) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, (_state, parent) in table.items():
        children[parent].append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _status(pid: int) -> tuple[int, int]:
    """(resident memory in kB, threads) of one process; (0, 0) once it is gone."""
    rss = threads = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Incarnation:
    """One process of a role (a restart makes a new one) and its samples."""

    pid: int
    samples: list[dict[str, float]] = field(default_factory=list)


class Sampler:
    """Memory, open file descriptors and threads of each platform process: the process
    and, for the worker, its pool processes (its direct children; the local engine's node
    processes under them are not counted), plus zombies anywhere under them."""

    def __init__(self, lab: Any, started: float) -> None:
        self.lab = lab
        self.started = started
        self.roles: dict[str, list[Incarnation]] = {role: [] for role in ROLES}
        self.zombies = 0

    def sample(self) -> None:
        table = _proc_table()
        now = time.monotonic() - self.started
        zombies = 0
        for role, name in ROLES.items():
            process = self.lab.process(name)
            if process.poll() is not None:
                continue
            incarnations = self.roles[role]
            if not incarnations or incarnations[-1].pid != process.pid:
                incarnations.append(Incarnation(process.pid))
            below = _descendants(process.pid, table)
            pool = [p for p in below if table[p][1] == process.pid and table[p][0] != "Z"]
            zombies += sum(1 for p in below if table[p][0] == "Z")
            rss = threads = fds = 0
            for pid in [process.pid, *(pool if role == "worker" else [])]:
                kb, count = _status(pid)
                rss, threads, fds = rss + kb, threads + count, fds + _fds(pid)
            incarnations[-1].samples.append(
                {"t": round(now, 1), "rss_mb": round(rss / 1024, 1), "fds": fds, "threads": threads}
            )
        self.zombies = zombies

    async def every(self, seconds: float, watchdog: Watchdog) -> None:
        while True:
            async with watchdog.lock:
                await asyncio.to_thread(self.sample)
            await watchdog.check()
            await asyncio.sleep(seconds)

    def report(self, warmup: float, restarts: collections.Counter[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, incarnations in self.roles.items():
            every = [s for i in incarnations for s in i.samples]
            if not every:
                continue
            warm = next((s for s in every if s["t"] >= warmup), every[-1])
            entry: dict[str, Any] = {
                "start": every[0],
                "after_warmup": warm,
                "end": every[-1],
                "restarts": restarts[role],
            }
            # Growth over the longest-lived process of the role, from its first sample
            # after the warm-up (of the run and of the process) to its last.
            longest = max(incarnations, key=lambda i: i.samples[-1]["t"] - i.samples[0]["t"])
            born = longest.samples[0]["t"]
            base = next((s for s in longest.samples if s["t"] >= max(warmup, born + 60)), None)
            if base is not None and base is not longest.samples[-1] and base["rss_mb"]:
                last = longest.samples[-1]
                entry["memory_growth_pct"] = round(100 * (last["rss_mb"] / base["rss_mb"] - 1), 1)
                entry["fds_growth"] = last["fds"] - base["fds"]
                entry["growth_measured_over_s"] = round(last["t"] - base["t"])
            out[role] = entry
        return out


class Watchdog:
    """What the classroom stack's ``restart: unless-stopped`` does: a platform process
    that exited by itself is started again; each time is recorded (with the end of its
    log) as a crash. Platform faults hold ``lock`` while they restart a process."""

    def __init__(self, lab: Any, started: float) -> None:
        self.lab = lab
        self.started = started
        self.lock = asyncio.Lock()
        self.crashes: list[dict[str, Any]] = []

    async def check(self) -> None:
        async with self.lock:
            for name in [*ROLES.values(), "redis"]:
                process = self.lab.redis_process if name == "redis" else self.lab.process(name)
                if process is None or process.poll() is None:
                    continue
                tail = self.lab.output(name).strip().splitlines()[-3:]
                self.crashes.append(
                    {
                        "process": name,
                        "at_s": round(time.monotonic() - self.started),
                        "exit": process.returncode,
                        "log_tail": [line[-200:] for line in tail],
                    }
                )
                print(json.dumps({"crashed": self.crashes[-1]}), file=sys.stderr, flush=True)
                await asyncio.to_thread(self.lab.restart, name)


async def platform_faults(
    lab: Any,
    kinds: list[str],
    every: float,
    started: float,
    end_at: float,
    rng: random.Random,
    done: list[dict[str, Any]],
    restarts: collections.Counter[str],
    watchdog: Watchdog,
) -> None:
    """One platform fault every ``every`` seconds on average, until a minute before the
    end. Each is done to a process the soak started, never to a shared service."""
    if not kinds or every <= 0:
        return
    while True:
        wait = rng.uniform(0.5, 1.5) * every
        if time.monotonic() + wait > end_at - 60:
            return
        await asyncio.sleep(wait)
        kind = rng.choice(kinds)
        record: dict[str, Any] = {"fault": kind, "at_s": round(time.monotonic() - started)}
        if kind == "worker":
            # Mid-task: wait (at most 30 s) for a launch, stop or experiment in flight.
            record["mid_task"] = await asyncio.to_thread(_task_in_flight, 30.0)
        name = {"web": "serve", "supervisor": "supervise"}.get(kind, kind)
        async with watchdog.lock:
            began = time.monotonic()
            await asyncio.to_thread(lab.restart, name, kill=kind in ("worker", "supervisor"))
            record["back_after_s"] = round(time.monotonic() - began, 1)
        restarts[kind] += 1
        done.append(record)
        print(json.dumps({"platform_fault": record}), flush=True, file=sys.stderr)


def _task_in_flight(timeout: float) -> bool:
    """Whether the worker is (probably) running a task: a sandbox starting or stopping,
    or an experiment running. Waits up to ``timeout`` seconds for one."""
    from django.db import close_old_connections

    from apps.labs.models import ExperimentRun, Sandbox

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            busy = Sandbox.objects.filter(
                state__in=[Sandbox.State.STARTING, Sandbox.State.STOPPING]
            ).exists()
            if busy or ExperimentRun.objects.filter(state=ExperimentRun.State.RUNNING).exists():
                return True
            time.sleep(0.2)
        return False
    finally:
        close_old_connections()


# --- what the learners may do, and what is left at the end ------------------------------


def make_plan(pattern_id: str) -> Plan:
    from apps.courses.models import Chapter
    from apps.labs.patterns import load_pattern
    from apps.labs.views import fault_fields

    spec = load_pattern(pattern_id)
    chapter = Chapter.objects.filter(sandbox=pattern_id).first()
    if chapter is None:
        raise SystemExit(f"no chapter launches the pattern {pattern_id!r}")
    experiments = []
    for experiment in spec.experiments:
        prediction = experiment.prediction
        if prediction.kind == "choice":
            values = [o.id for o in prediction.options]
        else:
            low = prediction.min if prediction.min is not None else 0.0
            high = prediction.max if prediction.max is not None else low + 100
            values = [f"{low + (high - low) * f:g}" for f in (0.1, 0.5, 0.9)]
        experiments.append((experiment.id, values))
    controls = []
    for control in spec.controls:
        if control.kind == "choice":
            values = list(control.choices)
        elif control.kind == "toggle":
            values = ["on", "off"]
        elif control.kind == "scale" and control.min is not None and control.max is not None:
            values = [str(n) for n in range(int(control.min), int(control.max) + 1)]
        elif control.kind == "number" and control.min is not None and control.default is not None:
            # Down and back: a learner's traffic above the default would load the machine,
            # not the platform.
            values = [f"{control.min:g}", f"{control.default:g}"]
        else:
            continue
        controls.append((control.id, values))
    return Plan(
        pattern=pattern_id,
        chapter_url=chapter.get_absolute_url(),
        faults=tuple(spec.faults),
        fault_fields={
            kind: [(name, default) for name, _label, _low, _high, default in fault_fields(kind)]
            for kind in spec.faults
        },
        experiments=experiments,
        controls=controls,
    )


def wait_all_ended(timeout: float) -> int:
    """Until no sandbox is active (at most ``timeout`` s); how many still are."""
    from apps.labs.models import ACTIVE_STATES, Sandbox

    deadline = time.monotonic() + timeout
    while (left := Sandbox.objects.filter(state__in=ACTIVE_STATES).count()) and (
        time.monotonic() < deadline
    ):
        time.sleep(1.0)
    return left


def leaks(lab: Any) -> dict[str, Any]:
    """What is left once every sandbox has ended: engine objects, processes, and rows that
    still claim something live."""
    from apps.labs.engine.base import LABEL_INSTANCE
    from apps.labs.models import ACTIVE_STATES, ExperimentRun, Fault, Sandbox

    engine = lab.engine
    found: dict[str, Any] = {"engine_sandboxes": len(engine.list_sandboxes())}
    if engine.name == "docker":
        label = {"label": f"{LABEL_INSTANCE}={engine.instance}"}
        found["containers"] = len(engine.api.containers(all=True, filters=label))
        found["networks"] = len(engine.api.networks(filters=label))
    else:
        from apps.labs.engine.local import _node_processes

        table = _proc_table()
        found["node_processes"] = sum(
            1
            for pid in _node_processes()
            if engine._is_mine(pid) and table.get(pid, ("X", 0))[0] not in {"Z", "X"}
        )
        found["state_folders"] = sum(1 for p in engine.state_dir.iterdir() if p.is_dir())
    found["sandboxes_not_ended"] = Sandbox.objects.filter(state__in=ACTIVE_STATES).count()
    found["faults_not_reverted"] = Fault.objects.filter(reverted_at__isnull=True).count()
    found["experiments_still_running"] = ExperimentRun.objects.filter(
        state=ExperimentRun.State.RUNNING
    ).count()
    return found


def database_figures() -> dict[str, Any]:
    from django.db.models import Count

    from apps.labs.models import ExperimentRun, Fault, Node, Sandbox

    runs = dict(ExperimentRun.objects.values_list("state").annotate(n=Count("pk")))
    run_errors = collections.Counter(
        _reason(e) for e in ExperimentRun.objects.exclude(error="").values_list("error", flat=True)
    )
    failed = collections.Counter(
        _reason(e)
        for e in Sandbox.objects.filter(state=Sandbox.State.FAILED).values_list("error", flat=True)
    )
    return {
        "sandbox_rows": dict(Sandbox.objects.values_list("state").annotate(n=Count("pk"))),
        "sandboxes_failed_reasons": dict(failed.most_common(5)),
        "faults_total": Fault.objects.count(),
        "faults_reverted": Fault.objects.filter(reverted_at__isnull=False).count(),
        "faults_by_learners": Fault.objects.filter(created_by__isnull=False).count(),
        "experiment_runs": runs,
        "experiment_errors": dict(run_errors.most_common(5)),
        # Kept as history (not leaks): rows of ended sandboxes.
        "history_rows": {
            "sandboxes": Sandbox.objects.count(),
            "nodes": Node.objects.count(),
            "faults": Fault.objects.count(),
            "experiment_runs": sum(runs.values()),
        },
    }


# --- the run -----------------------------------------------------------------------------


async def soak(
    lab: Any,
    port: int,
    args: argparse.Namespace,
    plan: Plan,
    keys: list[str],
    figures: Figures,
    sampler: Sampler,
    platform_done: list[dict[str, Any]],
    restarts: collections.Counter[str],
    watchdog: Watchdog,
) -> None:
    base = f"http://127.0.0.1:{port}"
    end_at = sampler.started + args.minutes * 60
    rng = random.Random(args.seed)
    learners = [
        Learner(n, base, key, plan, figures, end_at, seed=rng.randrange(2**32))
        for n, key in enumerate(keys)
    ]
    sampling = asyncio.create_task(sampler.every(SAMPLE_EVERY_S, watchdog))
    progress = asyncio.create_task(_progress(figures, sampler.started))
    faults = asyncio.create_task(
        platform_faults(
            lab, args.platform_faults, args.fault_every, sampler.started, end_at,
            random.Random(rng.randrange(2**32)), platform_done, restarts, watchdog,
        )
    )  # fmt: skip
    results = await asyncio.gather(*(learner.run() for learner in learners), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            figures.counts["learners_crashed"] += 1
            print(f"a learner crashed: {result!r}", file=sys.stderr)
    await faults
    for task in (sampling, progress):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _progress(figures: Figures, started: float) -> None:
    while True:
        await asyncio.sleep(60)
        line: dict[str, Any] = {"minute": round((time.monotonic() - started) / 60)}
        line.update(figures.counts)
        line["page_p95_ms"] = percentile(figures.page_ms, 95)
        print(json.dumps(line), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--learners", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--pattern", default="replicated-lb")
    parser.add_argument("--engine", choices=["local", "docker"], default="local")
    parser.add_argument(
        "--fault-every", type=float, default=180.0,
        help="seconds between platform faults, on average (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--platform-faults",
        type=lambda text: [k for k in text.split(",") if k],
        default=list(PLATFORM_FAULTS),
        help=f"which, comma-separated (default: {','.join(PLATFORM_FAULTS)})",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep the processes' logs in this folder"
    )
    args = parser.parse_args()
    unknown = set(args.platform_faults) - set(PLATFORM_FAULTS)
    if unknown:
        parser.error(f"unknown platform faults: {', '.join(sorted(unknown))}")
    if args.seed is None:
        args.seed = random.randrange(2**31)

    figures = Figures()
    platform_done: list[dict[str, Any]] = []
    restarts: collections.Counter[str] = collections.Counter()
    warmup = min(300.0, max(60.0, args.minutes * 60 / 6))
    total = str(max(30, args.learners + 5))
    with platform(
        "distlab-soak-", engine=args.engine, redis="private", SANDBOX_MAX_TOTAL=total
    ) as lab:
        port = free_port()
        lab.worker()
        lab.beat()
        lab.supervise()
        lab.serve(port)  # it indexes the chapters
        plan = make_plan(args.pattern)
        keys = [lab.cookie(lab.user(f"learner-{n}")).split("=", 1)[1] for n in range(args.learners)]
        sampler = Sampler(lab, time.monotonic())
        figures.started = sampler.started
        watchdog = Watchdog(lab, sampler.started)

        async def run() -> None:  # the watchdog's lock belongs to this loop
            await soak(
                lab, port, args, plan, keys, figures, sampler, platform_done, restarts, watchdog
            )

        asyncio.run(run())
        ran_s = time.monotonic() - sampler.started
        still_active = wait_all_ended(STOP_WAIT_S)
        from django.conf import settings

        time.sleep(settings.SANDBOX_REAP_INTERVAL + 5)  # one more housekeeping round
        sampler.sample()
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in lab.tmp.glob("*.log"):
                shutil.copy(log, args.logs / log.name)
        left = leaks(lab)
        left["zombie_processes"] = sampler.zombies
        database = database_figures()
        processes = sampler.report(warmup, restarts)
        engine = lab.engine.name

    counts = figures.counts
    leaked = {k: v for k, v in left.items() if v}
    web_growth = processes.get("web", {}).get("memory_growth_pct")
    result: dict[str, Any] = {
        "benchmark": "soak",
        "engine": engine,
        "pattern": args.pattern,
        "learners": args.learners,
        "minutes": round(ran_s / 60, 1),
        "seed": args.seed,
        "sandboxes_launched": counts["sandboxes_launched"],
        "launch_attempts": counts["launch_attempts"],
        "failed_launches": sum(figures.launch_failures.values()),
        "failed_launch_reasons": dict(figures.launch_failures.most_common(8)),
        "failed_launches_unexplained": len(figures.unexplained),
        "unexplained": figures.unexplained[:5],
        "launch_p50_s": percentile(figures.launch_s, 50),
        "launch_p95_s": percentile(figures.launch_s, 95),
        "sandboxes_ended_unasked": dict(figures.ended_unasked.most_common(5)),
        "faults_injected": counts["faults_injected"],
        "faults_refused": dict(figures.fault_refusals.most_common(5)),
        "faults_reverted_early": counts["faults_reverted_early"],
        "faults_total": database["faults_total"],
        "faults_reverted": database["faults_reverted"],
        "experiments_started": counts["experiments_started"],
        "experiments_refused": dict(figures.experiment_refusals.most_common(5)),
        "experiment_runs": database["experiment_runs"],
        "experiment_errors": database["experiment_errors"],
        "controls_set": counts["controls_set"],
        "controls_refused": counts["controls_refused"],
        "page_loads": len(figures.page_ms),
        "page_p50_ms": percentile(figures.page_ms, 50),
        "page_p95_ms": percentile(figures.page_ms, 95),
        "action_p95_ms": percentile(figures.action_ms, 95),
        "action_p95_ms_by_route": {
            route: percentile(ms, 95) for route, ms in sorted(figures.action_ms_by_route.items())
        },
        "requests_web_down": counts["requests_web_down"],
        "server_errors": dict(figures.server_errors.most_common(8)),
        "ws_connects": counts["ws_connects"],
        "ws_reconnects": counts["ws_reconnects"],
        "ws_closes": dict(figures.ws_closes),
        "ws_stalls": counts["ws_stalls"],
        "ws_reloads_after_stall": counts["ws_reloads_after_stall"],
        "ws_stall_p95_s": percentile(figures.stall_s, 95),
        "ws_stall_onsets_s": figures.stall_onsets_s[:20],
        "learners_crashed": counts["learners_crashed"],
        "stops_not_done_in_3_min": counts["stops_not_done_in_3_min"],
        "sandboxes_active_after_the_end": still_active,
        "platform_faults": platform_done,
        "platform_crashes": watchdog.crashes,
        "processes": processes,
        "leaks": left,
        "history_rows": database["history_rows"],
        "sandbox_rows": database["sandbox_rows"],
        "target_web_growth_pct": TARGET_WEB_GROWTH_PCT,
    }
    result["ok"] = (
        not leaked
        and not watchdog.crashes
        and not figures.unexplained
        and web_growth is not None
        and web_growth <= TARGET_WEB_GROWTH_PCT
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
