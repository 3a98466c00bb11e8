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
  // Close codes from apps/labs/consumers.py.
  var CLOSE_TEXT = {
    4401: "Signed out: sign in again to watch this sandbox.",
    4404: "This sandbox is not yours to watch.",
    4413: "The page sent a message that was too big; reconnecting…",
    4429: "The page sent too many messages; reconnecting…",
  };
  var STATES = {
    up: { icon: "●", label: "up" },
    ejected: { icon: "◐", label: "ejected" },
    paused: { icon: "❚❚", label: "paused" },
    partitioned: { icon: "⟂", label: "partitioned" },
    killed: { icon: "✕", label: "killed" },
  };
  // Which event kinds change what the fault and control forms show.
  var FAULT_EVENTS = { fault: 1, fault_cleared: 1, down: 1, up: 1, paused: 1, resumed: 1, added: 1, removed: 1 };
  var CONTROL_EVENTS = { policy: 1, config: 1, added: 1, removed: 1 };

  // One backoff for every reconnect, ours and htmx's: 0.5 s doubling to at most 10 s, with
  // jitter so a classroom does not reconnect in step. (htmx's default waits up to 64 s,
  // far too long to look at a frozen lab after a server restart.)
  function reconnectDelay(retries) {
    return Math.min(10000, 500 * Math.pow(2, retries)) * (0.5 + Math.random() / 2);
  }
  if (window.htmx) htmx.config.wsReconnectDelay = reconnectDelay;

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
    var topology = JSON.parse(document.getElementById("lab-topology").textContent);
    this.layout = topology;
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
    this.totals = { rps: [], error_pct: [], p50_ms: [], p99_ms: [] };
    this.perNode = {};
    this.scope = "";
    this.charts = {};
    this.chartsDirty = false;
    this.graph = root.querySelector("[data-lab-graph]");
    this.build();
    this.bind();
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
    root.addEventListener("change", function (event) {
      if (event.target.matches("[data-lab-scope]")) {
        self.scope = event.target.value;
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
    for (var i = 0; i < history.length; i++) this.push(history[i].ts, history[i].totals, history[i].nodes);
    if (snapshot.frame) this.applyFrame(snapshot.frame, false);
    this.build();
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
    if (changed) this.build();
    this.updateGraph();
    this.updateStats(frame.totals);
    if (live) {
      this.lastFrameAt = Date.now();
      this.push(frame.ts, frame.totals, frame.nodes);
      this.chartsDirty = true;
      this.launchDots(frame.sample || []);
    }
  };

  Lab.prototype.applyEvent = function (event) {
    var self = this;
    if (event.node && this.nodes[event.node] && event.kind === "down") this.nodes[event.node].state = "killed";
    if (FAULT_EVENTS[event.kind]) this.refreshSoon("#lab-faults");
    if (CONTROL_EVENTS[event.kind]) this.refreshSoon("#lab-controls");
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
      // Leave a form alone while the learner is using it.
      if (target && !target.contains(document.activeElement)) htmx.trigger(target, "lab:refresh");
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
    var across = this.layout.direction !== "top-to-bottom";
    // Drawn at the element's own size in pixels, so labels read the same on a phone and
    // on a projector; redrawn when that size changes.
    var VIEW_W = Math.max(280, Math.min(1000, Math.round(svg.clientWidth || 600)));
    this.drawnWidth = VIEW_W;
    var NODE_W = Math.round(Math.max(84, Math.min(144, VIEW_W / Math.max(1, columns.length) - 60)));
    // As tall as the longest column needs (six replicas fit), so a small graph is not
    // lost in a big box; it changes only when nodes are added or removed.
    var most = Math.max.apply(null, columns.map(function (c) { return c.length; }).concat([1]));
    var VIEW_H = across ? Math.max(170, most * (NODE_H + 14) + 20) : Math.max(260, columns.length * 96);
    svg.setAttribute("viewBox", "0 0 " + VIEW_W + " " + VIEW_H);
    this.pos = {};
    for (var ci = 0; ci < columns.length; ci++) {
      var col = columns[ci];
      for (var ri = 0; ri < col.length; ri++) {
        var major = ((ci + 0.5) / columns.length) * (across ? VIEW_W : VIEW_H);
        var minor = ((ri + 0.5) / col.length) * (across ? VIEW_H : VIEW_W);
        this.pos[col[ri]] = across ? { x: major, y: minor } : { x: minor, y: major };
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
      var label = el("text", { x: mx, y: my - 6, "text-anchor": "middle", class: "edge-label" }, g);
      var errLabel = el("text", { x: mx, y: my + 15, "text-anchor": "middle", class: "edge-label edge-errors" }, g);
      this.edgeEls[edge.src + ">" + edge.dst] = { g: g, line: line, label: label, errLabel: errLabel };
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
      this.nodeEls[n] = { g: box, rect: rect, state: state, stats: stats, detail: detail, tip: tip };
    }
    this.updateGraph();
    this.updateLists();
  };

  Lab.prototype.updateGraph = function () {
    for (var n in this.nodeEls) {
      var node = this.nodes[n];
      if (!node) continue;
      var els = this.nodeEls[n];
      var st = STATES[node.state] || STATES.up;
      els.g.setAttribute("class", "gnode state-" + node.state + (this.selected === n ? " is-selected" : "") +
        (this.hasFault(n) ? " has-fault" : ""));
      els.state.textContent = st.icon + " " + st.label;
      var s = node.stats;
      // Only an up node's rate: the other states' labels need the room (and it is ~0).
      els.stats.textContent = s && node.state === "up" ? fmt(s.rps, s.rps < 10 ? 1 : 0, "/s") : "";
      // Requests piling up on a node is how a slow one shows (its p99 is in the tooltip
      // and in the node's own charts).
      els.detail.textContent = s && node.state !== "killed" && s.in_flight !== null && s.in_flight !== undefined
        ? fmt(s.in_flight, s.in_flight < 10 ? 1 : 0) + " in flight"
        : "";
      els.tip.textContent = n + " (" + node.role + "): " + st.label +
        (s ? ", " + fmt(s.rps, 1, " req/s") + ", " + fmt(s.error_pct, 1, "% errors") + ", p50 " + fmt(s.p50_ms, 0, " ms") +
          ", p99 " + fmt(s.p99_ms, 0, " ms") + ", " + fmt(s.in_flight, 1) + " in flight" : "");
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
    }
  };

  Lab.prototype.hasFault = function (name) {
    var faults = this.faults || [];
    for (var i = 0; i < faults.length; i++) if (faults[i].node === name) return true;
    return false;
  };

  Lab.prototype.updateLists = function () {
    var scope = this.root.querySelector("[data-lab-scope]");
    if (scope) {
      var wanted = Object.keys(this.nodes).sort(natural);
      var have = Array.prototype.slice.call(scope.options, 1).map(function (o) { return o.value; });
      if (wanted.join() !== have.join()) {
        while (scope.options.length > 1) scope.remove(1);
        for (var i = 0; i < wanted.length; i++) scope.add(new Option("node " + wanted[i], wanted[i]));
        scope.value = this.nodes[this.scope] ? this.scope : "";
        this.scope = scope.value;
      }
    }
    var list = this.root.querySelector("[data-lab-nodes]");
    if (list) {
      var html = "";
      var names = Object.keys(this.nodes).sort(natural);
      for (var j = 0; j < names.length; j++) {
        var node = this.nodes[names[j]];
        html += '<li class="node node-' + (node.state === "up" ? "running" : node.state) + '" data-node="' + names[j] +
          '"><code>' + names[j] + '</code> <span class="hint">' + node.role + '</span> <span class="node-state">' +
          (STATES[node.state] || STATES.up).label + "</span></li>";
      }
      list.innerHTML = html;
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
      // Spread the frame's calls over the frame interval instead of launching them at once.
      this.dots.push({ el: shape, p: p, q: q, start: now + i * (125 / Math.max(1, sample.length)), duration: duration });
    }
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

  Lab.prototype.push = function (ts, totals, nodes) {
    if (this.times.length && ts <= this.times[this.times.length - 1]) return;
    this.times.push(ts);
    for (var key in this.totals) this.totals[key].push(totals ? totals[key] : null);
    var count = this.times.length;
    for (var name in nodes || {}) {
      var series = this.perNode[name];
      if (!series) {
        series = this.perNode[name] = { rps: [], error_pct: [], p50_ms: [], p99_ms: [] };
        for (var k in series) while (series[k].length < count - 1) series[k].push(null);
      }
      for (var m in series) series[m].push(nodes[name][m] === undefined ? null : nodes[name][m]);
    }
    for (var other in this.perNode) {
      var s = this.perNode[other];
      for (var n in s) while (s[n].length < count) s[n].push(null);
    }
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
    var text = cssVar("--muted"), grid = cssVar("--border");
    // Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
    var dark = document.documentElement.getAttribute("data-theme") === "dark";
    var blue = dark ? "#56B4E9" : "#0072B2", vermillion = "#D55E00", orange = "#E69F00";
    var self = this;
    var axes = function (unit) {
      return [
        // Time ticks (seconds). uPlot's own steps jump from 1 to 5 minutes, which leaves a
        // narrow chart of a few minutes with no tick inside it at all: 2 minutes fills that.
        { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, space: 70,
          incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600],
          values: function (u, vals) { return vals.map(clock); } },
        { stroke: text, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 48,
          values: function (u, vals) { return vals.map(function (v) { return v + unit; }); } },
      ];
    };
    var floor = function (least) {
      return function (u, min, max) { return [0, Math.max(least, (max || 0) * 1.15)]; };
    };
    var specs = {
      rps: { series: [{ label: "requests/s", stroke: blue, width: 2, fill: "rgba(0,114,178,0.08)" }], unit: "", least: 5 },
      errors: { series: [{ label: "errors %", stroke: vermillion, width: 2, fill: "rgba(213,94,0,0.10)" }], unit: "%", least: 5 },
      latency: {
        series: [
          { label: "p50 ms", stroke: blue, width: 2 },
          { label: "p99 ms", stroke: orange, width: 2, dash: [6, 4] },
        ],
        unit: "", least: 20,
      },
    };
    var plots = this.root.querySelectorAll("[data-chart]");
    for (var i = 0; i < plots.length; i++) {
      var target = plots[i];
      var name = target.getAttribute("data-chart");
      var spec = specs[name];
      target.innerHTML = "";
      var opts = {
        width: Math.max(200, target.clientWidth),
        height: 150,
        cursor: { drag: { x: false, y: false } },
        legend: { show: true, live: false },
        scales: { x: { time: true }, y: { range: floor(spec.least) } },
        axes: axes(spec.unit),
        series: [{}].concat(spec.series.map(function (s) {
          return Object.assign({ points: { show: false }, spanGaps: false }, s);
        })),
      };
      this.charts[name] = new uPlot(opts, this.chartData(name), target);
    }
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

  Lab.prototype.chartData = function (name) {
    var source = this.scope && this.perNode[this.scope] ? this.perNode[this.scope] : this.totals;
    if (name === "rps") return [this.times, source.rps];
    if (name === "errors") return [this.times, source.error_pct];
    return [this.times, source.p50_ms, source.p99_ms];
  };

  Lab.prototype.drawCharts = function () {
    for (var name in this.charts) this.charts[name].setData(this.chartData(name));
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
