// fooproxy live page: /stats/stream (Server-Sent Events) into uPlot charts and the numbers below them.
// The proxy sends "info" and "history" (the last 5 minutes) on connect, then one "sample" a second:
// {"t": unix seconds, "stats": the /stats object, "health": {"upstream_up", "draining", "persistence_ok"}}.
(function () {
  "use strict";
  var HISTORY = 300;
  var STALE_MS = 5000; // no event for this long: the proxy is gone (or stopped); reconnect
  var CONTRACT = ["msg_total", "msg_req", "msg_ack", "msg_nak",
    "request_rate_1s", "request_rate_10s", "response_rate_1s", "response_rate_10s"];
  var NOT_EXTRAS = { uptime_s: 1, upstreams: 1 };
  // Latency fields, when this build's /stats has them; charted by name, "—" when absent.
  var P50 = "latency_p50_ms", P99 = "latency_p99_ms";

  var samples = [];
  var source = null, lastEvent = 0, retryTimer = null;
  var $ = function (id) { return document.getElementById(id); };

  function fmt(v) {
    if (v === undefined || v === null) return "—";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    return v.toLocaleString("en-US", { maximumFractionDigits: 1 });
  }

  function uptime(s) {
    if (typeof s !== "number") return "—";
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    var sec = Math.floor(s % 60);
    return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + sec + "s";
  }

  // -- charts -----------------------------------------------------------------------
  function chart(id, series) {
    var fig = $(id), el = fig.querySelector(".plot");
    var height = function () { return window.matchMedia("(max-width: 640px)").matches ? 150 : 200; };
    var opts = {
      width: Math.max(el.clientWidth, 200), height: height(),
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max * 1.1, 1)]; } } },
      axes: [{}, { size: 56 }],
      series: [{}].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, fill: s.fill || undefined, dash: s.dash, spanGaps: false,
          value: function (u, v) { return fmt(v); } };
      }))
    };
    var data = [[]].concat(series.map(function () { return []; }));
    var u = new uPlot(opts, data, el);
    if (window.ResizeObserver) {
      new ResizeObserver(function () { u.setSize({ width: Math.max(el.clientWidth, 200), height: height() }); }).observe(el);
    }
    return { fig: fig, u: u, fields: series.map(function (s) { return s.field; }) };
  }

  var charts = [
    chart("chart-rates", [
      { label: "REQ/s", field: "request_rate_1s", color: "#2563eb" },
      { label: "responses/s", field: "response_rate_1s", color: "#16a34a", dash: [6, 4] }]),
    chart("chart-latency", [
      { label: "p50 ms", field: P50, color: "#d97706" },
      { label: "p99 ms", field: P99, color: "#dc2626", dash: [6, 4] }]),
    chart("chart-conns", [
      { label: "open", field: "connections_active", color: "#7c3aed", fill: "rgba(124,58,237,.08)" }])
  ];

  function draw() {
    var ts = samples.map(function (s) { return s.t; });
    charts.forEach(function (c) {
      var seen = 0;
      var cols = c.fields.map(function (f) {
        return samples.map(function (s) {
          var v = s.stats[f];
          if (typeof v === "number") { seen++; return v; }
          return null;
        });
      });
      c.u.setData([ts].concat(cols));
      c.fig.dataset.points = String(seen);
      c.fig.classList.toggle("nodata", seen === 0);
    });
  }

  // -- numbers ------------------------------------------------------------------------
  function fill(dl, keys, stats) {
    // The rows are built once per set of fields; after that only their text changes.
    if (dl.dataset.keys !== keys.join(",")) {
      dl.innerHTML = keys.map(function (k) { return "<dt>" + k + "</dt><dd data-field=\"" + k + "\"></dd>"; }).join("");
      dl.dataset.keys = keys.join(",");
    }
    dl.querySelectorAll("dd").forEach(function (dd) {
      var text = fmt(stats[dd.dataset.field]);
      if (dd.textContent !== text) dd.textContent = text;
    });
  }

  function yesno(id, value, good, yes, no) {
    var dd = $(id);
    if (value === undefined) { dd.textContent = "—"; dd.className = ""; return; }
    var on = !!value;
    dd.textContent = on ? yes : no;
    dd.className = on === good ? "ok" : "bad";
  }

  // With several upstreams, /stats has {"addr": {"up": true, ...}}: say how many are up and
  // which are down; an older proxy has only the health gauge.
  function upstreams(ups, gauge) {
    if (!ups || !Object.keys(ups).length) { yesno("st-upstream", gauge, true, "up", "down"); return; }
    var names = Object.keys(ups), down = names.filter(function (a) { return !ups[a].up && !ups[a].removed; });
    var dd = $("st-upstream");
    var live = names.filter(function (a) { return !ups[a].removed; }).length;
    if (live === 1) dd.textContent = down.length ? "down" : "up";
    else dd.textContent = (live - down.length) + "/" + live + " up" + (down.length ? " (down: " + down.join(", ") + ")" : "");
    dd.title = names.map(function (a) {
      var u = ups[a];
      return a + ": " + (u.removed ? "removed" : u.up ? "up" : "down") + ", " + u.sessions_active + " open, " + u.sessions_total + " sessions";
    }).join("\n");
    dd.className = down.length === live ? "bad" : "ok";
  }

  function numbers() {
    var last = samples[samples.length - 1];
    if (!last) return;
    var st = last.stats, health = last.health || {};
    fill($("contract"), CONTRACT, st);
    fill($("extras"), Object.keys(st).filter(function (k) { return CONTRACT.indexOf(k) < 0 && !NOT_EXTRAS[k]; }), st);
    $("now-req").textContent = fmt(st.request_rate_1s) + "/s";
    $("now-resp").textContent = fmt(st.response_rate_1s) + "/s";
    $("now-p50").textContent = st[P50] === undefined ? "—" : fmt(st[P50]) + " ms";
    $("now-p99").textContent = st[P99] === undefined ? "—" : fmt(st[P99]) + " ms";
    $("now-conns").textContent = fmt(st.connections_active);
    upstreams(st.upstreams, health.upstream_up);
    yesno("st-draining", health.draining, false, "yes", "no");
    yesno("st-persistence", health.persistence_ok, true, "ok", "failing");
    if (health.persistence_ok === undefined) $("st-persistence").textContent = "off";
    $("st-uptime").textContent = uptime(st.uptime_s);
  }

  // -- the stream -------------------------------------------------------------------
  function state(name, text) {
    var el = $("conn");
    el.dataset.state = name;
    el.textContent = text;
    document.body.classList.toggle("stale", name === "disconnected");
  }

  function lost() {
    state("disconnected", "disconnected, reconnecting…");
    if (source) { source.close(); source = null; }
    if (!retryTimer) retryTimer = setTimeout(function () { retryTimer = null; connect(); }, 1000);
  }

  function connect() {
    var es = new EventSource("/stats/stream");
    source = es;
    lastEvent = Date.now();
    es.addEventListener("info", function (e) {
      var info = JSON.parse(e.data);
      lastEvent = Date.now();
      $("version").textContent = info.version ? "v" + info.version : "";
      $("st-version").textContent = info.version || "—";
      $("st-workers").textContent = fmt(info.workers);
    });
    es.addEventListener("history", function (e) {
      // A new connection (maybe to a restarted proxy): its history replaces ours.
      samples = JSON.parse(e.data).slice(-HISTORY);
      lastEvent = Date.now();
      state("live", "live");
      draw(); numbers();
    });
    es.addEventListener("sample", function (e) {
      samples.push(JSON.parse(e.data));
      if (samples.length > HISTORY) samples.splice(0, samples.length - HISTORY);
      lastEvent = Date.now();
      state("live", "live");
      draw(); numbers();
    });
    // The browser retries by itself after most errors; a closed source, or silence, is ours to retry.
    es.onerror = function () { if (es === source) lost(); };
  }

  setInterval(function () { if (source && Date.now() - lastEvent > STALE_MS) lost(); }, 1000);
  connect();
})();
