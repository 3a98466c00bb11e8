// The live lab: draws a running sandbox from its WebSocket stream.
//
// The socket belongs to htmx's WebSocket extension (the `.lab-socket` element): HTML
// fragments (the event log) are swapped in by htmx; JSON messages (snapshot, frame, event;
// formats in apps/labs/telemetry.py) are taken here before htmx sees them. This module
// draws the topology graph with moving requests, the figures and the uPlot charts,
// counts down faults and time left, and reconnects with backoff without clearing
// anything, so a reconnect or a reload never shows a blank screen.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var HISTORY_S = 300; // seconds of chart history kept (the supervisor keeps the same)
  var MAX_DOTS = 160;
  var MAX_EVENTS = 200;
  var STALE_MS = 3000; // no frame for this long: the stream is not live
  var NODE_H = 62;
  var LINE_H = 16; // one line of a node's states and gauges, under its box
  // Close codes from apps/labs/consumers.py.
  var CLOSE_TEXT = {
    4401: "Signed out: sign in again to watch this sandbox.",
    4404: "This sandbox is not yours to watch.",
    4409: "This lab is open in too many tabs: close one and this one reconnects.",
    4413: "The page sent a message that was too big; reconnecting…",
    4429: "The page sent too many messages; reconnecting…",
  };
  // The platform's node states; a pattern's marks (a state one node puts on another,
  // `observe.marks`) share one look, with the label the pattern gives them.
  var STATES = {
    up: { icon: "●", label: "up" },
    paused: { icon: "❚❚", label: "paused" },
    partitioned: { icon: "⟂", label: "partitioned" },
    killed: { icon: "✕", label: "killed" },
  };
  var MARK_ICON = "⚑";
  // Which event kinds change what the fault and control forms show.
  var FAULT_EVENTS = { fault: 1, fault_cleared: 1, down: 1, up: 1, paused: 1, resumed: 1, added: 1, removed: 1, drill: 1, acted: 1 };
  var CONTROL_EVENTS = { policy: 1, config: 1, added: 1, removed: 1, acted: 1 };

  // One backoff for every reconnect, ours and htmx's: 0.5 s doubling to at most 10 s, with
  // jitter so a classroom does not reconnect in step. (htmx's default waits up to 64 s,
  // far too long to look at a frozen lab after a server restart.)
  function reconnectDelay(retries) {
    return Math.min(10000, 500 * Math.pow(2, retries)) * (0.5 + Math.random() / 2);
  }
  if (window.htmx) htmx.config.wsReconnectDelay = reconnectDelay;

  // The lab's form panels: an answer or a refresh replaces each whole.
  var PANELS = { "lab-controls": 1, "lab-faults": 1 };
  var FIELDS = "input:not([type=hidden]), select, textarea";

  function fieldValue(field) {
    return field.type === "checkbox" || field.type === "radio" ? String(field.checked) : field.value;
  }

  // Has the learner changed a field of this panel that the server has not seen yet: one
  // changed since it was last sent (its change may wait behind a request in flight), or
  // the one they are typing in? Then nothing may replace the panel, or the change is lost.
  function editing(panel) {
    var fields = panel.querySelectorAll(FIELDS);
    for (var i = 0; i < fields.length; i++) {
      var field = fields[i];
      if (field.disabled) continue;
      if (field.hasAttribute("data-sent")) {
        if (fieldValue(field) !== field.getAttribute("data-sent")) return true;
      } else if (field === document.activeElement) {
        var shown = field.type === "checkbox" || field.type === "radio" ? String(field.defaultChecked) : field.defaultValue;
        if (field.tagName === "SELECT") {
          shown = "";
          for (var j = 0; j < field.options.length; j++) if (field.options[j].defaultSelected) shown = field.options[j].value;
          if (!shown && field.options.length) shown = field.options[0].value;
        }
        if (fieldValue(field) !== shown) return true;
      }
    }
    return false;
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(value, digits, unit) {
    if (value === null || value === undefined || isNaN(value)) return "–";
    return Number(value).toFixed(digits) + (unit || "");
  }

  // A number a node reported (a gauge, a table cell), as a person would write it.
  function number(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (!isFinite(value)) return "–";
    var size = Math.abs(value);
    var digits = Number.isInteger(value) || size >= 100 ? 0 : size >= 10 ? 1 : 2;
    return String(Number(value.toFixed(digits)));
  }

  function withUnit(text, unit) {
    if (!unit || text === "–") return text;
    return text + (/^[%/]/.test(unit) ? "" : " ") + unit;
  }

  // Width of an SVG text in pixels (an estimate while the graph is not laid out).
  function textWidth(node) {
    var width = 0;
    try { width = node.getComputedTextLength(); } catch (e) { width = 0; }
    return width || (node.textContent || "").length * 6.5;
  }

  // Cut `part` (a text or tspan inside `whole`) with an ellipsis until `whole` is at most
  // `room` pixels wide; `full` is the uncut text of `part`.
  function fitText(whole, part, full, room) {
    part.textContent = full;
    var over = textWidth(whole) - room;
    if (over <= 0 || !full) return;
    var perChar = textWidth(part) / full.length || 6.5;
    var keep = Math.max(1, full.length - Math.ceil(over / perChar) - 1);
    part.textContent = full.slice(0, keep).replace(/\s+$/, "") + "…";
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function Lab(root) {
    this.root = root;
    this.id = root.getAttribute("data-sandbox");
    this.panelUrl = root.getAttribute("data-panel-url");
    this.traceUrl = root.getAttribute("data-trace-url"); // with a collector: ".../traces/TRACE/"
    var topology = JSON.parse(document.getElementById("lab-topology").textContent);
    this.layout = topology;
    var observe = topology.observe || {};
    this.observe = {
      marks: observe.marks || [], gauges: observe.gauges || [], states: observe.states || [], tables: observe.tables || [],
    };
    this.series = topology.series || []; // calls charted apart: [{id, label}]
    this.marks = {}; // mark id → its spec
    for (var mi = 0; mi < this.observe.marks.length; mi++) this.marks[this.observe.marks[mi].id] = this.observe.marks[mi];
    this.tables = []; // the last frame's pattern tables
    this.nodes = {}; // name → {role, state, stats}
    for (var name in topology.nodes) this.nodes[name] = { role: topology.nodes[name].role, state: "up", stats: null };
    this.links = {}; // "src>dst" → stats
    this.pos = {};
    this.dots = [];
    this.selected = null;
    this.lastFrameAt = 0;
    this.connected = false;
    this.retries = 0;
    this.ended = false;
    this.times = [];
    this.totals = { rps: [], error_pct: [], p50_ms: [], p99_ms: [], slow_trace: [] };
    this.perNode = {};
    this.scope = "";
    this.charts = {};
    this.chartsDirty = false;
    this.graph = root.querySelector("[data-lab-graph]");
    this.build();
    this.bind();
    this.buildPatternState();
    this.makeCharts();
    var self = this;
    this.ticker = setInterval(function () { self.tick(); }, 1000);
    this.tick();
    requestAnimationFrame(function step(now) {
      if (!document.body.contains(root)) return self.destroy();
      self.animate(now);
      requestAnimationFrame(step);
    });
  }

  Lab.prototype.destroy = function () {
    clearInterval(this.ticker);
    if (this.observer) this.observer.disconnect();
    document.removeEventListener("htmx:afterSettle", this.afterSwap);
    for (var key in this.charts) this.charts[key].destroy();
    if (this.resizer) this.resizer.disconnect();
    if (this.graphResizer) this.graphResizer.disconnect();
    this.root.__lab = null;
  };

  // --- the stream -----------------------------------------------------------------------

  Lab.prototype.bind = function () {
    var self = this;
    var root = this.root;
    root.addEventListener("htmx:wsBeforeMessage", function (event) {
      var text = event.detail.message;
      if (typeof text !== "string" || text.charAt(0) !== "{") return; // a fragment: htmx's
      event.preventDefault();
      var message;
      try { message = JSON.parse(text); } catch (e) { return; }
      self.receive(message);
    });
    root.addEventListener("htmx:wsOpen", function () {
      self.connected = true;
      self.retries = 0;
      self.closeText = "";
      self.tick();
    });
    root.addEventListener("htmx:wsClose", function (event) {
      self.connected = false;
      self.onClose(event.detail.event.code);
    });
    // The event log is filled by htmx (whole, at connect; one event at a time after).
    var events = root.querySelector(".lab-events");
    if (events && window.MutationObserver) {
      this.observer = new MutationObserver(function () { self.tidyLog(); });
      this.observer.observe(events, { childList: true, subtree: true });
    }
    document.addEventListener("distlab:theme", function () { self.makeCharts(); });
    root.addEventListener("click", function (event) {
      var dot = event.target.closest("[data-trace]");
      if (dot) return self.openTrace(dot.getAttribute("data-trace"));
      var target = event.target.closest("[data-node]");
      if (target && !target.closest("form")) self.select(target.getAttribute("data-node"));
    });
    // Graph nodes are buttons for the keyboard too.
    root.addEventListener("keydown", function (event) {
      if (event.key !== "Enter" && event.key !== " ") return;
      var target = event.target.closest && event.target.closest("g.gnode[data-node]");
      if (!target) return;
      event.preventDefault();
      self.select(target.getAttribute("data-node"));
    });
    // The learner's input wins over the server's older view: what each request sends is
    // remembered per field, and an answer or refresh that would replace a panel holding a
    // change not sent yet waits until it is sent (htmx queues it behind the request in
    // flight) and the server's answer to it comes back.
    root.addEventListener("htmx:beforeRequest", function (event) {
      var elt = event.detail.elt;
      var fields = elt && elt.querySelectorAll ? elt.querySelectorAll(FIELDS) : [];
      for (var i = 0; i < fields.length; i++) fields[i].setAttribute("data-sent", fieldValue(fields[i]));
    });
    root.addEventListener("htmx:beforeSwap", function (event) {
      var target = event.detail.target;
      if (!target || !PANELS[target.id] || !editing(target)) return;
      event.detail.shouldSwap = false;
      self.refreshSoon("#" + target.id);
    });
    root.addEventListener("change", function (event) {
      if (event.target.matches("[data-lab-scope]")) {
        self.scope = event.target.value;
        self.showScope();
        self.chartsDirty = true;
      }
      if (event.target.matches("[data-fault-kind]")) self.showFaultFields();
    });
    this.afterSwap = function (event) {
      if (!root.contains(event.target)) return;
      self.showFaultFields();
      self.tick();
    };
    document.addEventListener("htmx:afterSettle", this.afterSwap);
    this.showFaultFields();
    var wide = root.closest(".page-lab");
    var link = document.querySelector(".lab-wide-link");
    if (wide && link) link.hidden = true;
  };

  Lab.prototype.onClose = function (code) {
    var self = this;
    if (code === 4410) {
      // The sandbox ended: the server's panel says how and offers a new launch.
      this.ended = true;
      htmx.ajax("GET", this.panelUrl, { target: "#sandbox-box", swap: "outerHTML" });
      return;
    }
    this.closeText = CLOSE_TEXT[code] || "";
    if (code === 4401 || code === 4404) return this.tick();
    if ([1006, 1011, 1012, 1013].indexOf(code) >= 0) return this.tick(); // htmx retries these
    // Anything else (the server restarted, a proxy closed the socket): reconnect here,
    // with exponential backoff and jitter, keeping everything on screen.
    var delay = reconnectDelay(this.retries);
    this.retries += 1;
    setTimeout(function () {
      var old = self.root.querySelector(".lab-socket");
      if (!old || self.ended) return;
      var fresh = old.cloneNode(false);
      old.replaceWith(fresh);
      htmx.process(fresh);
    }, delay);
    this.tick();
  };

  Lab.prototype.receive = function (message) {
    if (message.type === "snapshot") this.applySnapshot(message);
    else if (message.type === "frame") this.applyFrame(message, true);
    else if (message.type === "event") this.applyEvent(message);
  };

  Lab.prototype.applySnapshot = function (snapshot) {
    for (var name in snapshot.nodes || {}) {
      var known = this.nodes[name] || (this.nodes[name] = { stats: null });
      known.role = snapshot.nodes[name].role;
      known.state = snapshot.nodes[name].state;
    }
    // Charts start from the stored history (a reload or a late joiner sees them filled).
    // After a reconnect, what this page already shows is kept where the stored history
    // does not reach (a restarted server may have kept none).
    var history = snapshot.history || [];
    var from = history.length ? history[0].ts : Infinity;
    var keep = 0;
    while (keep < this.times.length && this.times[keep] < from) keep++;
    this.times.splice(keep);
    for (var key in this.totals) this.totals[key].splice(keep);
    for (var name2 in this.perNode) for (var m in this.perNode[name2]) this.perNode[name2][m].splice(keep);
    for (var i = 0; i < history.length; i++) this.push(history[i].ts, history[i].totals, history[i].nodes, history[i].series);
    if (snapshot.tables) this.tables = snapshot.tables;
    if (snapshot.frame) this.applyFrame(snapshot.frame, false);
    this.build();
    this.updatePatternState();
    this.chartsDirty = true;
    this.tick();
  };

  Lab.prototype.applyFrame = function (frame, live) {
    var changed = false;
    for (var name in frame.nodes) {
      var info = frame.nodes[name];
      var node = this.nodes[name];
      if (!node) { node = this.nodes[name] = { role: info.role, state: info.state }; changed = true; }
      if (node.state !== info.state) { node.state = info.state; changed = true; }
      node.stats = info;
    }
    for (var known in this.nodes) {
      if (!(known in frame.nodes) && Object.keys(frame.nodes).length) { delete this.nodes[known]; changed = true; }
    }
    this.links = frame.links || {};
    this.faults = frame.faults || [];
    if (frame.tables) this.tables = frame.tables;
    if (changed) this.build();
    this.updateGraph();
    this.updateStats(frame.totals);
    this.updatePatternState();
    if (live) {
      this.lastFrameAt = Date.now();
      this.push(frame.ts, frame.totals, frame.nodes, frame.series);
      this.chartsDirty = true;
      this.launchDots(frame.sample || []);
    }
  };

  Lab.prototype.applyEvent = function (event) {
    var self = this;
    if (event.node && this.nodes[event.node] && event.kind === "down" && this.nodes[event.node].state !== "killed") {
      this.nodes[event.node].state = "killed";
      this.updateLists();
      this.updatePatternState();
    }
    if (FAULT_EVENTS[event.kind]) this.refreshSoon("#lab-faults");
    if (CONTROL_EVENTS[event.kind]) this.refreshSoon("#lab-controls");
    if (event.kind === "class-experiment") this.refreshSoon("#lab-experiments"); // the ask shows
    if (event.kind === "sandbox_ended") this.ended = true;
    if (event.node) {
      var box = this.graph.querySelector('[data-node="' + CSS.escape(event.node) + '"]');
      if (box) {
        box.classList.remove("is-flashing");
        void box.getBoundingClientRect();
        box.classList.add("is-flashing");
        setTimeout(function () { box.classList.remove("is-flashing"); }, 1200);
      }
    }
    self.updateGraph();
  };

  Lab.prototype.refreshSoon = function (selector) {
    var self = this;
    this.pending = this.pending || {};
    if (this.pending[selector]) return;
    this.pending[selector] = setTimeout(function () {
      self.pending[selector] = null;
      var target = document.querySelector(selector);
      // Leave a form alone while the learner is using it (their next change's answer
      // brings the panel up to date).
      if (!target || self.ended || target.contains(document.activeElement) || editing(target)) return;
      htmx.trigger(target, "lab:refresh");
    }, 400);
  };

  // --- the graph ------------------------------------------------------------------------

  Lab.prototype.columnOf = function (name) {
    var columns = this.layout.columns;
    var role = this.nodes[name] ? this.nodes[name].role : null;
    for (var i = 0; i < columns.length; i++) if (columns[i].indexOf(name) >= 0) return i;
    for (var j = 0; j < columns.length; j++) if (columns[j].indexOf(role) >= 0) return j;
    return columns.length; // not in the layout: an extra column at the end
  };

  Lab.prototype.matches = function (name, key) {
    return name === key || (this.nodes[name] && this.nodes[name].role === key);
  };

  // Where (as a fraction of the way from p to q) the line leaves p's box.
  function exitAt(p, q, w, h) {
    var dx = Math.abs(q.x - p.x), dy = Math.abs(q.y - p.y);
    var tx = dx ? (w / 2) / dx : Infinity, ty = dy ? (h / 2) / dy : Infinity;
    return Math.min(0.5, Math.min(tx, ty));
  }

  function natural(a, b) {
    var ma = /^(.*?)(\d+)$/.exec(a), mb = /^(.*?)(\d+)$/.exec(b);
    if (ma && mb && ma[1] === mb[1]) return Number(ma[2]) - Number(mb[2]);
    return a < b ? -1 : a > b ? 1 : 0;
  }

  var MIN_COLUMN_W = 100; // px a column of the graph needs, across

  Lab.prototype.build = function () {
    var svg = this.graph;
    this.dots = [];
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var columns = [];
    var names = Object.keys(this.nodes).sort(natural);
    for (var i = 0; i < names.length; i++) {
      var c = this.columnOf(names[i]);
      (columns[c] = columns[c] || []).push(names[i]);
    }
    columns = columns.filter(Boolean);
    // Drawn at the element's own size in pixels, so labels read the same on a phone and
    // on a projector; redrawn when that size changes.
    var VIEW_W = Math.max(280, Math.min(1000, Math.round(svg.clientWidth || 600)));
    this.drawnWidth = VIEW_W;
    // Side by side, each column needs room for a box and its links' labels: a graph with
    // more columns than its width holds (six in a chapter's panel, five on
    // a phone) is drawn top to bottom instead, where its longest column spreads across.
    var longest = Math.max.apply(null, columns.map(function (c) { return c.length; }));
    var across = this.layout.direction !== "top-to-bottom" &&
      (VIEW_W / columns.length >= MIN_COLUMN_W || columns.length <= longest);
    var NODE_W = Math.round(Math.max(84, Math.min(144, VIEW_W / Math.max(1, columns.length) - 60)));
    // A node's declared states and gauges go under its box, one line each (a gauge takes
    // two, label then value, where one is too narrow for both): its place keeps that room
    // free below the box, and as much above, so boxes stay centred.
    var room = {}; // how wide a node's lines under its box may be
    var extras = {}, below = {};
    for (var ci = 0; ci < columns.length; ci++) {
      for (var ri = 0; ri < columns[ci].length; ri++) {
        var name = columns[ci][ri];
        // Across, the links' labels sit between the columns: stay clear of them (a
        // narrow graph has none: see distlab.css).
        room[name] = across
          ? Math.min(VIEW_W / columns.length - (VIEW_W < 480 ? 4 : 12), VIEW_W < 480 ? Infinity : NODE_W + 44)
          : VIEW_W / columns[ci].length - 12;
        extras[name] = this.extrasOf(name, true);
        var lines = 0;
        for (var xi = 0; xi < extras[name].length; xi++) {
          var extra = extras[name][xi];
          extra.split = extra.kind === "gauge" && this.measure(extra.spec.label + " 0000 " + (extra.spec.unit || "")) > room[name];
          lines += extra.split ? 2 : 1;
        }
        below[name] = lines ? lines * LINE_H + 6 : 0;
      }
    }
    var slot = function (column) {
      return Math.max.apply(null, column.map(function (n) { return NODE_H + 14 + 2 * below[n]; }));
    };
    // As tall as the longest column needs (six replicas fit), so a small graph is not
    // lost in a big box; it changes only when nodes are added or removed.
    var VIEW_H = across
      ? Math.max(170, Math.max.apply(null, columns.map(function (c) { return c.length * slot(c); })) + 20)
      : Math.max(260, columns.length * Math.max(96, Math.max.apply(null, columns.map(function (c) { return slot(c) + 20; }))));
    svg.setAttribute("viewBox", "0 0 " + VIEW_W + " " + VIEW_H);
    this.pos = {};
    for (var cj = 0; cj < columns.length; cj++) {
      var col = columns[cj];
      for (var rj = 0; rj < col.length; rj++) {
        var major = ((cj + 0.5) / columns.length) * (across ? VIEW_W : VIEW_H);
        var minor = ((rj + 0.5) / col.length) * (across ? VIEW_H : VIEW_W);
        this.pos[col[rj]] = across ? { x: major, y: minor } : { x: minor, y: major };
      }
    }
    this.edges = [];
    var links = this.layout.links;
    for (var li = 0; li < links.length; li++) {
      for (var a in this.pos) {
        if (!this.matches(a, links[li].from)) continue;
        for (var b in this.pos) {
          if (b === a || !this.matches(b, links[li].to)) continue;
          if (links[li].kind === "probe") continue; // health checks ride on the same line
          this.edges.push({ src: a, dst: b });
        }
      }
    }
    this.layers = {
      links: el("g", { class: "g-links" }, svg),
      dots: el("g", { class: "g-dots" }, svg),
      nodes: el("g", { class: "g-nodes" }, svg),
    };
    this.edgeEls = {};
    for (var e = 0; e < this.edges.length; e++) {
      var edge = this.edges[e];
      var p = this.pos[edge.src], q = this.pos[edge.dst];
      var g = el("g", { class: "edge" }, this.layers.links);
      var line = el("line", { x1: p.x, y1: p.y, x2: q.x, y2: q.y }, g);
      // The label sits in the middle of the visible part of the line, between the boxes.
      var t0 = exitAt(p, q, NODE_W, NODE_H), t1 = 1 - exitAt(q, p, NODE_W, NODE_H);
      var tm = (t0 + t1) / 2;
      var mx = p.x + (q.x - p.x) * tm, my = p.y + (q.y - p.y) * tm;
      // A wider invisible line under the pointer, for the link's figures (its title).
      el("line", { x1: p.x, y1: p.y, x2: q.x, y2: q.y, class: "edge-hit" }, g);
      var label = el("text", { x: mx, y: my - 6, "text-anchor": "middle", class: "edge-label" }, g);
      var errLabel = el("text", { x: mx, y: my + 15, "text-anchor": "middle", class: "edge-label edge-errors" }, g);
      var edgeTip = el("title", {}, g);
      this.edgeEls[edge.src + ">" + edge.dst] = { g: g, line: line, label: label, errLabel: errLabel, tip: edgeTip };
    }
    this.nodeEls = {};
    for (var n in this.pos) {
      var at = this.pos[n];
      var box = el("g", {
        class: "gnode", transform: "translate(" + (at.x - NODE_W / 2) + "," + (at.y - NODE_H / 2) + ")",
        "data-node": n, tabindex: "0", role: "button",
      }, this.layers.nodes);
      var rect = el("rect", { width: NODE_W, height: NODE_H, rx: 9 }, box);
      var title = el("text", { x: 9, y: 19, class: "gnode-name" }, box);
      title.textContent = n;
      var state = el("text", { x: 9, y: 38, class: "gnode-state" }, box);
      var stats = el("text", { x: NODE_W - 7, y: 38, class: "gnode-stats", "text-anchor": "end" }, box);
      var detail = el("text", { x: 9, y: 54, class: "gnode-detail" }, box);
      var tip = el("title", {}, box);
      this.nodeEls[n] = { g: box, rect: rect, state: state, stats: stats, detail: detail, tip: tip, extras: [] };
      // Its states (badges) and gauges (small figures), under the box.
      if (!extras[n].length) continue;
      var under = el("g", {
        class: "gnode-extras", transform: "translate(" + at.x + "," + (at.y + NODE_H / 2) + ")", "data-extras-for": n,
      }, this.layers.nodes);
      var baseline = 0;
      for (var k = 0; k < extras[n].length; k++) {
        var what = extras[n][k];
        baseline += LINE_H;
        var line = el("g", { class: "extra-" + what.kind }, under);
        line.setAttribute("data-" + what.kind, what.spec.id);
        var item = { kind: what.kind, spec: what.spec, room: room[n], split: what.split, g: line };
        if (what.kind === "state") item.pill = el("rect", { class: "gnode-badge", y: baseline - 12, height: 16, rx: 8 }, line);
        item.text = el("text", { x: 0, y: baseline, "text-anchor": "middle" }, line);
        item.label = el("tspan", { class: "gnode-extra-label" }, item.text);
        item.text.appendChild(document.createTextNode(" "));
        if (what.split) baseline += LINE_H;
        item.value = el("tspan", what.split ? { class: "gnode-extra-value", x: 0, y: baseline } : { class: "gnode-extra-value" }, item.text);
        item.tip = el("title", {}, line);
        this.nodeEls[n].extras.push(item);
      }
    }
    this.updateGraph();
    this.updateLists();
  };

  // How wide a line under a node would be, in pixels (drawn as those lines are, then
  // removed; an estimate while the graph is not laid out).
  Lab.prototype.measure = function (text) {
    var probe = el("g", { class: "gnode-extras", visibility: "hidden" }, this.graph);
    var line = el("text", {}, probe);
    line.textContent = text;
    var width = textWidth(line);
    probe.remove();
    return width;
  };

  // How a node state reads: icon, label and the class its box gets. A pattern's marks
  // share one look and take their label from the pattern.
  Lab.prototype.stateOf = function (state) {
    if (STATES[state]) return { icon: STATES[state].icon, label: STATES[state].label, cls: state };
    var mark = this.marks[state];
    return { icon: MARK_ICON, label: mark ? mark.label : String(state || "?"), cls: "mark" };
  };

  // A node's declared states (badges), then its gauges: all of them for the state panel,
  // or (``onGraph``) those shown under its box (a gauge may say `graph: false`).
  Lab.prototype.extrasOf = function (name, onGraph) {
    var self = this, out = [];
    var covers = function (spec) {
      return (spec.nodes || []).some(function (ref) { return self.matches(name, ref); });
    };
    this.observe.states.forEach(function (x) { if (covers(x)) out.push({ kind: "state", spec: x }); });
    this.observe.gauges.forEach(function (g) {
      if (covers(g) && !(onGraph && g.graph === false)) out.push({ kind: "gauge", spec: g });
    });
    return out;
  };

  // A node's declared state or gauge now: [label, value as text], value null when unknown.
  Lab.prototype.extraText = function (name, extra) {
    var s = this.nodes[name] && this.nodes[name].stats;
    if (extra.kind === "state") {
      var state = s && s.states ? s.states[extra.spec.id] : undefined;
      return [extra.spec.label + ":", state === undefined || state === null ? null : String(state)];
    }
    var value = s && s.gauges ? s.gauges[extra.spec.id] : undefined;
    return [extra.spec.label, value === undefined || value === null ? null : withUnit(number(value), extra.spec.unit)];
  };

  Lab.prototype.updateGraph = function () {
    for (var n in this.nodeEls) {
      var node = this.nodes[n];
      if (!node) continue;
      var els = this.nodeEls[n];
      var st = this.stateOf(node.state);
      els.g.setAttribute("class", "gnode state-" + st.cls + (this.selected === n ? " is-selected" : "") +
        (this.hasFault(n) ? " has-fault" : ""));
      els.g.setAttribute("data-state", node.state);
      els.state.textContent = st.icon + " " + st.label;
      var s = node.stats;
      // Only an up node's rate: the other states' labels need the room (and it is ~0).
      els.stats.textContent = s && node.state === "up" ? fmt(s.rps, s.rps < 10 ? 1 : 0, "/s") : "";
      // Requests piling up on a node is how a slow one shows (its p99 is in the tooltip
      // and in the node's own charts).
      els.detail.textContent = s && node.state !== "killed" && s.in_flight !== null && s.in_flight !== undefined
        ? fmt(s.in_flight, s.in_flight < 10 ? 1 : 0) + " in flight"
        : "";
      var tip = n + " (" + node.role + "): " + st.label +
        (s ? ", " + fmt(s.rps, 1, " req/s") + ", " + fmt(s.error_pct, 1, "% errors") + ", p50 " + fmt(s.p50_ms, 0, " ms") +
          ", p99 " + fmt(s.p99_ms, 0, " ms") + ", " + fmt(s.in_flight, 1) + " in flight" : "");
      // Its states and gauges: what it reported last (dimmed when it cannot report now).
      var quiet = node.state === "killed" || node.state === "paused";
      for (var i = 0; i < els.extras.length; i++) {
        var item = els.extras[i];
        var parts = this.extraText(n, item);
        var value = parts[1] === null ? "–" : parts[1];
        item.value.textContent = value;
        fitText(item.split ? item.label : item.text, item.label, parts[0], item.room - (item.pill ? 14 : 0));
        item.tip.textContent = parts[0] + " " + value + (quiet ? " (last reported)" : "");
        item.g.setAttribute("class", "extra-" + item.kind + (quiet || parts[1] === null ? " is-quiet" : ""));
        if (item.pill) {
          var width = textWidth(item.text) + 14;
          item.pill.setAttribute("x", String(-width / 2));
          item.pill.setAttribute("width", String(width));
        }
        tip += ", " + parts[0] + " " + value;
      }
      els.tip.textContent = tip;
    }
    for (var key in this.edgeEls) {
      var link = this.links[key];
      var e = this.edgeEls[key];
      var rps = link ? link.rps : 0;
      var errs = link ? link.error_pct : 0;
      e.g.setAttribute("class", "edge" + (rps > 0 ? " is-busy" : "") + (errs > 0 ? " has-errors" : ""));
      e.line.setAttribute("stroke-width", String(1.5 + Math.min(5, Math.sqrt(rps || 0) / 2)));
      e.label.textContent = rps > 0 ? fmt(rps, rps < 10 ? 1 : 0, "/s") : "";
      e.errLabel.textContent = rps > 0 && errs > 0 ? fmt(errs, 0, "% err") : "";
      e.tip.textContent = key.replace(">", " → ") + ": " + (link && rps > 0
        ? fmt(rps, 1, " req/s") + ", " + fmt(errs, 1, "% errors") + ", p50 " + fmt(link.p50_ms, 0, " ms") +
          ", p99 " + fmt(link.p99_ms, 0, " ms")
        : "no requests now");
    }
  };

  Lab.prototype.hasFault = function (name) {
    var faults = this.faults || [];
    for (var i = 0; i < faults.length; i++) if (faults[i].node === name) return true;
    return false;
  };

  Lab.prototype.updateLists = function () {
    var names = Object.keys(this.nodes).sort(natural);
    var scope = this.root.querySelector("[data-lab-scope]");
    if (scope) {
      // What the charts can show: the whole sandbox, one node, a gauge of the
      // pattern's (one line per node that reports it), or one of its series.
      var gauges = this.observe.gauges, series = this.series;
      var wanted = names.join() + "|" + gauges.map(function (g) { return g.id; }).join() +
        "|" + series.map(function (x) { return x.id; }).join();
      if (scope.getAttribute("data-options") !== wanted) {
        while (scope.children.length > 1) scope.removeChild(scope.lastChild);
        var group = document.createElement("optgroup");
        group.label = "One node";
        for (var i = 0; i < names.length; i++) group.appendChild(new Option("node " + names[i], names[i]));
        scope.appendChild(group);
        if (gauges.length) {
          group = document.createElement("optgroup");
          group.label = "The pattern's figures, per node";
          for (var g = 0; g < gauges.length; g++) group.appendChild(new Option(gauges[g].label, "gauge:" + gauges[g].id));
          scope.appendChild(group);
        }
        if (series.length) {
          group = document.createElement("optgroup");
          group.label = "Calls by route";
          for (var x = 0; x < series.length; x++) group.appendChild(new Option(series[x].label, "series:" + series[x].id));
          scope.appendChild(group);
        }
        scope.setAttribute("data-options", wanted);
        var known = this.nodes[this.scope] || this.gaugeOfScope() || this.scope.indexOf("series:") === 0;
        scope.value = known ? this.scope : "";
        if (scope.value !== this.scope) { this.scope = scope.value; this.showScope(); }
      }
    }
    var list = this.root.querySelector("[data-lab-nodes]");
    if (list) {
      list.textContent = "";
      for (var j = 0; j < names.length; j++) {
        var node = this.nodes[names[j]];
        var st = this.stateOf(node.state);
        var item = make("li", "node node-live node-" + st.cls, null, list);
        item.setAttribute("data-node", names[j]);
        item.append(make("code", null, names[j]), " ", make("span", "hint", node.role || ""), " ",
          make("span", "node-state", st.icon + " " + st.label));
      }
    }
  };

  Lab.prototype.select = function (name) {
    if (!this.nodes[name]) return;
    this.selected = name;
    var select = this.root.querySelector("[data-fault-node]");
    if (select) select.value = name;
    this.updateGraph();
  };

  // --- moving requests ------------------------------------------------------------------

  var REDUCED_MOTION = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)");

  Lab.prototype.launchDots = function (sample) {
    if (REDUCED_MOTION && REDUCED_MOTION.matches) return; // rates and charts still move
    var now = performance.now();
    for (var i = 0; i < sample.length && this.dots.length < MAX_DOTS; i++) {
      var call = sample[i];
      var p = this.pos[call.src], q = this.pos[call.dst];
      if (!p || !q) continue;
      var failed = call.status === 0 || call.status >= 400;
      // Travel time grows with the request's latency, within what the eye can follow.
      var duration = Math.max(350, Math.min(2400, 350 + call.ms * 3));
      var shape = failed
        ? el("rect", { width: 8, height: 8, x: -4, y: -4, class: "dot dot-err" }, this.layers.dots)
        : el("circle", { r: 4, class: "dot dot-ok" }, this.layers.dots);
      if (call.trace && this.traceUrl) { // a request of a trace: a click opens it
        shape.setAttribute("data-trace", call.trace);
        shape.classList.add("dot-traced");
        var tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
        tip.textContent = call.src + " → " + call.dst + ", " + fmt(call.ms, 0, " ms") + ": click to open its trace";
        shape.appendChild(tip);
      }
      // Spread the frame's calls over the frame interval instead of launching them at once.
      this.dots.push({ el: shape, p: p, q: q, start: now + i * (125 / Math.max(1, sample.length)), duration: duration });
    }
  };

  // One request's trace, in the Traces card: asked for with wait=1, since a request's
  // trace reaches the collector a second or two after the request ends.
  Lab.prototype.openTrace = function (id) {
    var view = document.getElementById("lab-trace");
    if (!this.traceUrl || !view || !window.htmx || !/^[0-9a-f]{32}$/.test(id || "")) return;
    htmx.ajax("GET", this.traceUrl.replace("TRACE", id) + "?wait=1", { target: "#lab-trace", swap: "innerHTML" });
    (view.closest(".lab-card") || view).scrollIntoView({ block: "nearest" });
  };

  // The slowest traced request at the latency chart's point `idx` (or the nearest point
  // that has one, within 3), in what the charts show now.
  Lab.prototype.traceAt = function (idx) {
    var source = this.scope && this.perNode[this.scope] ? this.perNode[this.scope] : this.totals;
    var list = source.slow_trace || [];
    for (var d = 0; d <= 3; d++) {
      if (list[idx - d]) return list[idx - d];
      if (list[idx + d]) return list[idx + d];
    }
    return null;
  };

  Lab.prototype.animate = function (now) {
    var keep = [];
    for (var i = 0; i < this.dots.length; i++) {
      var d = this.dots[i];
      var t = (now - d.start) / d.duration;
      if (t >= 1) { d.el.remove(); continue; }
      keep.push(d);
      if (t < 0) { d.el.setAttribute("visibility", "hidden"); continue; }
      d.el.setAttribute("visibility", "visible");
      var x = d.p.x + (d.q.x - d.p.x) * t, y = d.p.y + (d.q.y - d.p.y) * t;
      d.el.setAttribute("transform", "translate(" + x.toFixed(1) + "," + y.toFixed(1) + ")");
    }
    this.dots = keep;
    if (this.chartsDirty) {
      this.chartsDirty = false;
      this.drawCharts();
    }
  };

  // --- the pattern's own state: its tables, and its nodes' states and gauges in text ------

  function make(tag, cls, text, parent) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // The panel's frame, from what the pattern declares; rows come with frames.
  Lab.prototype.buildPatternState = function () {
    var box = this.root.querySelector("[data-pattern-state]");
    if (!box) return;
    box.textContent = "";
    this.stateEls = { figures: null, tables: [] };
    if (this.observe.gauges.length || this.observe.states.length) {
      this.stateEls.figures = make("ul", "pstate-figures", null, box);
      this.stateEls.figures.setAttribute("data-testid", "pattern-figures");
      this.stateEls.figuresKey = null;
    }
    for (var i = 0; i < this.observe.tables.length; i++) {
      var spec = this.observe.tables[i];
      var wrap = make("div", "pstate-table", null, box);
      wrap.setAttribute("data-table", spec.id);
      wrap.setAttribute("data-testid", "pattern-table-" + spec.id);
      var table = make("table", null, null, wrap);
      var caption = make("caption", null, spec.label, table);
      var from = make("span", "hint pstate-from", null, caption);
      // A role's table is kept by each of its nodes: a column says whose row it is.
      var byRole = !(spec.node in this.nodes);
      var head = make("tr", null, null, make("thead", null, null, table));
      if (byRole) make("th", null, "Node", head).scope = "col";
      var heads = [];
      for (var c = 0; c < spec.columns.length; c++) {
        var th = make("th", null, spec.columns[c].label, head);
        th.scope = "col";
        if (spec.columns[c].unit) make("span", "hint pstate-unit", " (" + spec.columns[c].unit + ")", th);
        heads.push(th);
      }
      this.stateEls.tables.push({
        spec: spec, byRole: byRole, heads: heads, body: make("tbody", null, null, table), from: from, key: null,
      });
    }
    this.updatePatternState();
  };

  Lab.prototype.updatePatternState = function () {
    if (!this.stateEls) return;
    var self = this;
    var names = Object.keys(this.nodes).sort(natural);
    // Each node's declared states and gauges, in words: a line per node.
    var list = this.stateEls.figures;
    if (list) {
      var rows = [];
      names.forEach(function (name) {
        self.extrasOf(name).forEach(function (extra) {
          var parts = self.extraText(name, extra);
          rows.push({ key: name + "/" + extra.kind + "/" + extra.spec.id, name: name, label: parts[0], value: parts[1] === null ? "–" : parts[1] });
        });
      });
      var key = rows.map(function (r) { return r.key; }).join();
      if (key !== this.stateEls.figuresKey) {
        list.textContent = "";
        var item = null;
        rows.forEach(function (r, i) {
          if (!i || rows[i - 1].name !== r.name) {
            item = make("li", null, null, list);
            item.setAttribute("data-node", r.name);
            make("code", "pstate-node", r.name, item);
          }
          var figure = make("span", "pstate-figure", null, item);
          make("span", "pstate-label", r.label, figure);
          figure.append(" ");
          make("strong", "pstate-value", null, figure);
        });
        this.stateEls.figuresKey = key;
      }
      var values = list.querySelectorAll(".pstate-value");
      for (var v = 0; v < rows.length; v++) if (values[v].textContent !== rows[v].value) values[v].textContent = rows[v].value;
    }
    // The tables: what their nodes reported last.
    for (var t = 0; t < this.stateEls.tables.length; t++) {
      var view = this.stateEls.tables[t];
      var spec = view.spec;
      var reports = (this.tables || []).filter(function (x) {
        return x.id === spec.id && self.nodes[x.node] && self.matches(x.node, spec.node);
      });
      var writers = reports.map(function (x) {
        var st = self.nodes[x.node].state;
        return x.node + (st === "killed" || st === "paused" ? " (" + self.stateOf(st).label + ": its last report)" : "");
      });
      view.from.textContent = " · reported by " + (writers.length ? writers.join(", ") : spec.node);
      var states = names.map(function (n) { return n + ":" + self.nodes[n].state; }).join();
      var signature = JSON.stringify(reports) + states;
      if (signature === view.key) continue;
      view.key = signature;
      this.fillTable(view, reports);
    }
  };

  Lab.prototype.fillTable = function (table, parts) {
    var body = table.body, columns = table.spec.columns;
    body.textContent = "";
    var count = 0;
    for (var p = 0; p < parts.length; p++) {
      var rows = parts[p].rows || [];
      for (var r = 0; r < rows.length; r++) {
        count++;
        var tr = make("tr", null, null, body);
        if (table.byRole) make("td", null, parts[p].node, tr).setAttribute("data-label", "Node");
        for (var c = 0; c < columns.length; c++) {
          var value = rows[r][columns[c].id];
          var cell = make(c === 0 ? "th" : "td", typeof value === "number" ? "is-number" : null, number(value), tr);
          cell.setAttribute("data-label", columns[c].label + (columns[c].unit ? " (" + columns[c].unit + ")" : ""));
          if (c !== 0) continue;
          cell.scope = "row";
          // A row about a node of this sandbox shows that node's state when it is not up.
          var node = typeof value === "string" ? this.nodes[value] : null;
          if (node && node.state !== "up") {
            var st = this.stateOf(node.state);
            tr.className = "is-" + st.cls;
            tr.setAttribute("data-node-state", node.state);
            cell.append(" ");
            make("span", "pstate-node-state state-" + st.cls, st.icon + " " + st.label, cell);
          }
        }
      }
    }
    // Numbers line up on the right, their headings with them.
    for (var h = 1; h < columns.length; h++) {
      var numeric = parts.some(function (part) {
        return (part.rows || []).some(function (row) { return typeof row[columns[h].id] === "number"; });
      });
      table.heads[h].classList.toggle("is-number", numeric);
    }
    if (!count) {
      var empty = make("td", "hint", "No rows yet", make("tr", "pstate-empty", null, body));
      empty.colSpan = columns.length + (table.byRole ? 1 : 0);
    }
  };

  // --- figures and charts ---------------------------------------------------------------

  Lab.prototype.updateStats = function (totals) {
    if (!totals) return;
    var set = function (root, key, text) {
      var node = root.querySelector('[data-stat="' + key + '"]');
      if (node) node.textContent = text;
    };
    set(this.root, "rps", fmt(totals.rps, 1));
    set(this.root, "error_pct", fmt(totals.error_pct, 1, " %"));
    set(this.root, "p50_ms", fmt(totals.p50_ms, 1, " ms"));
    set(this.root, "p99_ms", fmt(totals.p99_ms, 1, " ms"));
    var errors = this.root.querySelector('[data-stat="error_pct"]');
    if (errors) errors.classList.toggle("is-bad", totals.error_pct > 0);
  };

  var NODE_SERIES = ["rps", "error_pct", "p50_ms", "p99_ms", "slow_trace"];

  // One point per second (or frame) for the charts: the totals, per node its figures
  // and its gauges (as "gauge:<id>"), and the pattern's series (kept like a node named
  // "series:<id>"), every list as long as `times`.
  Lab.prototype.push = function (ts, totals, nodes, series) {
    if (this.times.length && ts <= this.times[this.times.length - 1]) return;
    if (this.series.length) {
      nodes = Object.assign({}, nodes);
      for (var s = 0; s < this.series.length; s++) {
        var id = this.series[s].id;
        nodes["series:" + id] = (series && series[id]) || {};
      }
    }
    this.times.push(ts);
    for (var key in this.totals) this.totals[key].push(totals ? totals[key] : null);
    var count = this.times.length;
    var pad = function (list, length) { while (list.length < length) list.push(null); };
    for (var name in nodes || {}) {
      var series = this.perNode[name] || (this.perNode[name] = {});
      var values = {};
      for (var i = 0; i < NODE_SERIES.length; i++) values[NODE_SERIES[i]] = nodes[name][NODE_SERIES[i]];
      var gauges = nodes[name].gauges || {};
      for (var g in gauges) values["gauge:" + g] = gauges[g];
      for (var m in values) {
        var list = series[m] || (series[m] = []);
        pad(list, count - 1);
        list.push(values[m] === undefined ? null : values[m]);
      }
    }
    for (var other in this.perNode) for (var n in this.perNode[other]) pad(this.perNode[other][n], count);
    var cut = 0;
    while (cut < this.times.length && this.times[cut] < ts - HISTORY_S) cut++;
    if (cut) {
      this.times.splice(0, cut);
      for (var t in this.totals) this.totals[t].splice(0, cut);
      for (var p in this.perNode) for (var q in this.perNode[p]) this.perNode[p][q].splice(0, cut);
    }
  };

  Lab.prototype.makeCharts = function () {
    if (typeof uPlot === "undefined") return;
    for (var key in this.charts) this.charts[key].destroy();
    this.charts = {};
    var self = this;
    var plots = this.root.querySelectorAll("[data-chart]");
    for (var i = 0; i < plots.length; i++) this.makeChart(plots[i]);
    if (!this.graphResizer && window.ResizeObserver) {
      var timer = null;
      this.graphResizer = new ResizeObserver(function () {
        clearTimeout(timer);
        timer = setTimeout(function () {
          if (Math.abs((self.graph.clientWidth || 0) - self.drawnWidth) > 8) self.build();
        }, 150);
      });
      this.graphResizer.observe(this.graph);
    }
    if (!this.resizer && window.ResizeObserver) {
      this.resizer = new ResizeObserver(function () {
        for (var key in self.charts) {
          var chart = self.charts[key];
          var width = chart.root.parentNode.clientWidth;
          if (width && Math.abs(width - chart.width) > 2) chart.setSize({ width: width, height: 150 });
        }
      });
      var figures = this.root.querySelectorAll("[data-chart]");
      for (var f = 0; f < figures.length; f++) this.resizer.observe(figures[f]);
    }
  };

  // The round number (1, 2, 2.5 or 5 times a power of ten) at or above `value`.
  function nice(value) {
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * power >= value) return steps[i] * power;
    return 10 * power;
  }

  // Okabe–Ito colours: distinguishable with the common colour-vision deficiencies; lines
  // of a gauge's chart also differ by dash, and the legend names their node.
  var DASHES = [null, [6, 4], [2, 3], [10, 3, 2, 3]];
  function palette(dark) {
    return [dark ? "#56B4E9" : "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", dark ? "#F0E442" : "#000000"];
  }

  Lab.prototype.chartSpec = function (name) {
    var dark = document.documentElement.getAttribute("data-theme") === "dark";
    var colours = palette(dark);
    var blue = colours[0], vermillion = "#D55E00", orange = "#E69F00";
    if (name === "rps") return { series: [{ label: "requests/s", stroke: blue, width: 2, fill: "rgba(0,114,178,0.08)" }], unit: "", least: 5 };
    if (name === "errors") return { series: [{ label: "errors %", stroke: vermillion, width: 2, fill: "rgba(213,94,0,0.10)" }], unit: "%", least: 5 };
    if (name === "latency") {
      return {
        series: [
          { label: "p50 ms", stroke: blue, width: 2 },
          { label: "p99 ms", stroke: orange, width: 2, dash: [6, 4] },
        ],
        unit: "", least: 20,
      };
    }
    // A gauge of the pattern's: one line per node that reported it.
    var names = this.gaugeNodes(this.gaugeOfScope());
    return {
      series: names.map(function (n, i) {
        var line = { label: n, stroke: colours[i % colours.length], width: 2 };
        var dash = DASHES[i % DASHES.length];
        if (dash) line.dash = dash;
        return line;
      }),
      unit: "", least: 1, signed: true, key: this.scope + "|" + names.join(),
    };
  };

  Lab.prototype.makeChart = function (target) {
    var name = target.getAttribute("data-chart");
    if (this.charts[name]) this.charts[name].destroy();
    var spec = this.chartSpec(name);
    var text = cssVar("--muted"), grid = cssVar("--border");
    var axes = [
      // Time ticks (seconds). uPlot's own steps jump from 1 to 5 minutes, which leaves a
      // narrow chart of a few minutes with no tick inside it at all: 2 minutes fills that.
      { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, space: 70,
        incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600],
        values: function (u, vals) { return vals.map(clock); } },
      { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 48, space: spec.signed ? 24 : 30,
        values: function (u, vals) { return vals.map(function (v) { return v + spec.unit; }); } },
    ];
    var range = function (u, min, max) {
      var top = Math.max(spec.least, (max || 0) * 1.15);
      // A gauge's scale ends on a round number, so its last value reads off a tick.
      if (spec.signed) top = nice(top);
      return [spec.signed ? Math.min(0, min || 0) : 0, top];
    };
    target.textContent = "";
    var opts = {
      width: Math.max(200, target.clientWidth),
      height: 150,
      cursor: { drag: { x: false, y: false } },
      legend: { show: true, live: false },
      scales: { x: { time: true }, y: { range: range } },
      axes: axes,
      series: [{}].concat(spec.series.map(function (s) {
        return Object.assign({ points: { show: false }, spanGaps: false }, s);
      })),
    };
    var chart = this.charts[name] = new uPlot(opts, this.chartData(name), target);
    chart.key = spec.key;
    if (name === "latency" && this.traceUrl) { // a point opens that moment's slowest trace
      var self = this;
      chart.root.classList.add("chart-traced");
      chart.over.addEventListener("click", function () {
        var id = chart.cursor.idx == null ? null : self.traceAt(chart.cursor.idx);
        if (id) self.openTrace(id);
      });
    }
  };

  // The gauge the charts show ("gauge:<id>" in the selector), or null.
  Lab.prototype.gaugeOfScope = function () {
    if (!this.scope || this.scope.indexOf("gauge:") !== 0) return null;
    var id = this.scope.slice(6);
    for (var i = 0; i < this.observe.gauges.length; i++) if (this.observe.gauges[i].id === id) return this.observe.gauges[i];
    return null;
  };

  // The nodes that reported a gauge in the charts' time span.
  Lab.prototype.gaugeNodes = function (gauge) {
    if (!gauge) return [];
    var key = "gauge:" + gauge.id, out = [];
    for (var name in this.perNode) {
      var series = this.perNode[name][key];
      if (series && series.some(function (v) { return v !== null; })) out.push(name);
    }
    return out.sort(natural);
  };

  // A gauge replaces the three charts by its own; the others show the sandbox or a node.
  Lab.prototype.showScope = function () {
    var gauge = this.gaugeOfScope();
    var figures = this.root.querySelectorAll(".chart-grid > .chart");
    for (var i = 0; i < figures.length; i++) {
      figures[i].hidden = figures[i].hasAttribute("data-gauge-figure") ? !gauge : !!gauge;
    }
    var caption = this.root.querySelector("[data-gauge-caption]");
    if (caption && gauge) caption.textContent = gauge.label + (gauge.unit ? " (" + gauge.unit + ")" : "") + ", per node";
  };

  Lab.prototype.chartData = function (name) {
    if (name === "gauge") {
      var gauge = this.gaugeOfScope();
      var self = this;
      return [this.times].concat(this.gaugeNodes(gauge).map(function (n) { return self.perNode[n]["gauge:" + gauge.id]; }));
    }
    var source = this.scope && this.perNode[this.scope] ? this.perNode[this.scope] : this.totals;
    if (name === "rps") return [this.times, source.rps];
    if (name === "errors") return [this.times, source.error_pct];
    return [this.times, source.p50_ms, source.p99_ms];
  };

  Lab.prototype.drawCharts = function () {
    for (var name in this.charts) {
      var chart = this.charts[name];
      if (name === "gauge") {
        if (!this.gaugeOfScope()) continue;
        // Its lines are the nodes that report the gauge: a new one, a new chart.
        if (chart.key !== this.chartSpec(name).key) { this.makeChart(chart.root.parentNode); continue; }
      }
      chart.setData(this.chartData(name));
    }
  };

  // --- once a second: connection, countdowns ------------------------------------------

  Lab.prototype.tick = function () {
    var state = this.root.ownerDocument.querySelector("[data-lab-connection]");
    if (state) {
      var live = this.connected && Date.now() - this.lastFrameAt < STALE_MS;
      var text, cls;
      if (this.closeText) { text = this.closeText; cls = "is-off"; }
      else if (live) { text = "● Live"; cls = "is-live"; }
      else if (this.connected) { text = this.lastFrameAt ? "Stream paused…" : "Waiting for telemetry…"; cls = "is-wait"; }
      else { text = this.lastFrameAt ? "Reconnecting…" : "Connecting…"; cls = "is-wait"; }
      state.textContent = text;
      state.className = "lab-connection " + cls;
      // Figures that stopped updating say so (dimmed) rather than pass for live ones.
      this.root.classList.toggle("is-stale", !live);
    }
    var now = Date.now() / 1000;
    var timers = document.querySelectorAll("#sandbox-box [data-expires]");
    for (var i = 0; i < timers.length; i++) {
      var left = Number(timers[i].getAttribute("data-expires")) - now;
      if (timers[i].classList.contains("countdown")) {
        timers[i].textContent = left > 0 ? "reverts in " + Math.ceil(left) + " s" : "reverting…";
      } else {
        timers[i].textContent = left > 60 ? Math.floor(left / 60) + " min left" : left > 0 ? Math.ceil(left) + " s left" : "time is up";
      }
    }
  };

  Lab.prototype.tidyLog = function () {
    var log = document.getElementById("event-log");
    if (!log) return;
    var empty = log.querySelector(".event-empty");
    if (empty && log.children.length > 1) empty.remove();
    // An event can reach a viewer twice around connect (in the snapshot and live).
    var seen = {};
    var items = log.querySelectorAll("li[data-key]");
    for (var i = 0; i < items.length; i++) {
      var key = items[i].getAttribute("data-key");
      if (seen[key]) items[i].remove();
      else seen[key] = true;
    }
    while (log.children.length > MAX_EVENTS) log.removeChild(log.lastElementChild);
    this.localizeTimes(log);
  };

  Lab.prototype.localizeTimes = function (log) {
    var times = log.querySelectorAll("time[data-ts]:not([data-local])");
    for (var i = 0; i < times.length; i++) {
      var when = new Date(Number(times[i].getAttribute("data-ts")) * 1000);
      if (!isNaN(when)) times[i].textContent = clock(when.getTime() / 1000);
      times[i].setAttribute("data-local", "");
    }
  };

  Lab.prototype.showFaultFields = function () {
    var form = this.root.querySelector("[data-fault-form]");
    if (!form) return;
    var kind = form.querySelector("[data-fault-kind]");
    var chosen = kind ? kind.value : "";
    var params = form.querySelectorAll("[data-fault-param]");
    for (var i = 0; i < params.length; i++) {
      var on = params[i].getAttribute("data-fault-param") === chosen;
      params[i].hidden = !on;
      params[i].querySelector("input").disabled = !on;
    }
    var duration = form.querySelector("[data-fault-duration]");
    if (duration) {
      duration.hidden = chosen === "restart";
      duration.querySelector("select").disabled = chosen === "restart";
    }
    var help = form.querySelector("[data-fault-help]");
    var option = kind && kind.selectedOptions[0];
    if (help) help.textContent = option ? option.getAttribute("data-help") : "";
    var select = form.querySelector("[data-fault-node]");
    if (select && this.selected && this.nodes[this.selected]) select.value = this.selected;
  };

  htmx.onLoad(function (content) {
    var roots = content.matches && content.matches("[data-lab]") ? [content] : content.querySelectorAll("[data-lab]");
    for (var i = 0; i < roots.length; i++) {
      if (!roots[i].__lab) roots[i].__lab = new Lab(roots[i]);
    }
  });
})();
