// The brokerd cluster page. It follows GET /v1/overview/stream (server-sent
// events) and, when the stream cannot be opened (too many streams, an old
// proxy), polls GET /v1/overview every second. Every value shown is set
// with textContent or setAttribute: destination names come from clients.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 1000;
  let samples = [];
  let capacity = 600;
  let intervalMs = 1000;
  let lastT = 0;
  let pollTimer = null;
  let es = null;
  let streaming = false; // the stream delivers: polling stops

  function $(id) { return document.getElementById(id); }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function setConn(state, text) {
    const c = $("conn");
    c.setAttribute("data-conn", state);
    c.textContent = text;
  }

  // safeAddr accepts host:port forms only, so that a link built from it
  // is always http(s) to that address.
  function safeAddr(a) { return typeof a === "string" && /^[A-Za-z0-9.\-:\[\]]+$/.test(a); }

  function fmtTime(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString();
  }

  function renderMembers(o) {
    const rows = [];
    for (const m of o.members) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-member", m.name);
      tr.setAttribute("data-id", m.id);
      tr.setAttribute("data-state", m.state);
      tr.setAttribute("data-role", m.role);
      tr.setAttribute("data-self", m.self ? "true" : "false");
      tr.appendChild(el("td", m.name, "name"));
      const role = el("td"); role.appendChild(el("span", m.role, "role role-" + m.role)); tr.appendChild(role);
      const state = el("td"); state.appendChild(el("span", m.state, "state state-" + m.state));
      if (m.draining) state.appendChild(el("span", "draining", "state state-draining"));
      tr.appendChild(state);
      const stomp = el("td", null, "addr");
      const listeners = [["", m.stomp_addr], ["tls ", m.stomp_tls_addr], ["ws ", m.stomp_ws_addr], ["wss ", m.stomp_wss_addr]];
      for (const [kind, addr] of listeners) {
        if (addr) stomp.appendChild(el("div", kind + addr));
      }
      if (!stomp.firstChild) stomp.textContent = "–";
      tr.appendChild(stomp);
      const admin = el("td", null, "addr");
      if (m.admin_addr && safeAddr(m.admin_addr) && !m.self) {
        const a = el("a", m.admin_addr);
        a.href = location.protocol + "//" + m.admin_addr + "/";
        admin.appendChild(a);
      } else {
        admin.textContent = m.admin_addr || "–";
      }
      tr.appendChild(admin);
      tr.appendChild(el("td", m.peer_addr || "–", "addr"));
      tr.appendChild(el("td", m.active_since ? new Date(m.active_since).toLocaleString() : "–"));
      rows.push(tr);
    }
    if (rows.length === 0) {
      const tr = el("tr"); const td = el("td", "no members", "empty"); td.colSpan = 7; tr.appendChild(td); rows.push(tr);
    }
    document.querySelector("#members tbody").replaceChildren(...rows);
  }

  function renderDestinations(o) {
    const rows = [];
    for (const d of o.destinations) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-dest", d.name);
      tr.appendChild(el("td", d.name, "name"));
      tr.appendChild(el("td", d.kind));
      tr.appendChild(el("td", d.owner_name || d.owner || "–"));
      const reps = el("td");
      for (const r of d.replicas || []) {
        const s = el("span", (r.name || r.id) + " " + r.state, "rstate rstate-" + r.state);
        s.setAttribute("data-replica", r.name || r.id);
        s.setAttribute("data-replica-state", r.state);
        reps.appendChild(s);
      }
      if (!d.replicas || d.replicas.length === 0) reps.textContent = "–";
      tr.appendChild(reps);
      tr.appendChild(el("td", d.pending, "num"));
      tr.appendChild(el("td", d.in_flight, "num"));
      tr.appendChild(el("td", d.consumers, "num"));
      rows.push(tr);
    }
    if (rows.length === 0) {
      const tr = el("tr"); const td = el("td", "no destinations yet", "empty"); td.colSpan = 7; tr.appendChild(td); rows.push(tr);
    }
    document.querySelector("#destinations tbody").replaceChildren(...rows);
    const more = $("dest-more");
    if (o.destinations_more > 0) {
      more.textContent = "and " + o.destinations_more + " more (" + o.destinations_total + " in all; GET /v1/destinations lists every one)";
      more.hidden = false;
    } else {
      more.hidden = true;
    }
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function fmtNum(v) {
    if (v >= 1000) return (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k";
    if (v >= 10 || v === 0) return v.toFixed(0);
    return v.toPrecision(2);
  }

  // chart draws series (each {key, cls}) of samples into the element with
  // id, over the window ending at now.
  function chart(id, lines, now) {
    const W = 600, H = 160, L = 44, R = 8, T = 8, B = 20;
    const span = capacity * intervalMs;
    const t0 = now - span;
    let max = 0;
    for (const s of samples) for (const ln of lines) {
      const v = s[ln.key];
      if (typeof v === "number" && v > max) max = v;
    }
    max = niceMax(max);
    const x = (t) => L + (W - L - R) * Math.max(0, (t - t0)) / span;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    for (const f of [0, 0.5, 1]) {
      const g = document.createElementNS(SVG, "line");
      g.setAttribute("class", "grid");
      g.setAttribute("x1", L); g.setAttribute("x2", W - R);
      g.setAttribute("y1", y(max * f)); g.setAttribute("y2", y(max * f));
      svg.appendChild(g);
      const lab = document.createElementNS(SVG, "text");
      lab.setAttribute("class", "axis");
      lab.setAttribute("x", L - 4); lab.setAttribute("y", y(max * f) + 4);
      lab.setAttribute("text-anchor", "end");
      lab.textContent = fmtNum(max * f);
      svg.appendChild(lab);
    }
    const mins = Math.round(span / 60000);
    for (const [t, label] of [[t0, "-" + mins + " min"], [now, "now"]]) {
      const lab = document.createElementNS(SVG, "text");
      lab.setAttribute("class", "axis");
      lab.setAttribute("x", t === now ? W - R : L);
      lab.setAttribute("y", H - 5);
      lab.setAttribute("text-anchor", t === now ? "end" : "start");
      lab.textContent = label;
      svg.appendChild(lab);
    }
    for (const ln of lines) {
      let d = "", pen = false;
      for (const s of samples) {
        const v = s[ln.key];
        if (typeof v !== "number" || s.t < t0) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(s.t).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
      }
      const p = document.createElementNS(SVG, "path");
      p.setAttribute("class", "line-" + ln.cls);
      p.setAttribute("d", d || "M0 0");
      svg.appendChild(p);
    }
    const last = samples.length ? samples[samples.length - 1] : null;
    const title = document.createElementNS(SVG, "title");
    title.textContent = last ? lines.map((ln) => ln.cls + " " + (typeof last[ln.key] === "number" ? fmtNum(last[ln.key]) : "–")).join(", ") : "no samples yet";
    svg.appendChild(title);
    $(id).replaceChildren(svg);
  }

  function apply(o) {
    const s = o.series || {};
    capacity = s.capacity || capacity;
    intervalMs = s.interval_ms || intervalMs;
    if (!s.append) { samples = []; lastT = 0; }
    for (const x of s.samples || []) {
      if (x.t > lastT) { samples.push(x); lastT = x.t; }
    }
    if (samples.length > capacity) samples = samples.slice(samples.length - capacity);

    $("cluster-name").textContent = o.cluster_name || "";
    $("node-name").textContent = o.node_name;
    $("traffic-node").textContent = o.node_name;
    $("window").textContent = String(Math.round(capacity * intervalMs / 60000));
    $("epoch").textContent = String(o.epoch);
    $("converged").textContent = o.converged ? "converged" : "not converged";
    $("active-wanted").textContent = String(o.active_members_wanted);
    renderMembers(o);
    renderDestinations(o);
    chart("chart-rate", [{ key: "sent", cls: "sent" }, { key: "delivered", cls: "delivered" }], o.now_ms);
    chart("chart-latency", [{ key: "p50_ms", cls: "p50" }, { key: "p99_ms", cls: "p99" }], o.now_ms);
    const u = $("updated");
    u.setAttribute("datetime", new Date(o.now_ms).toISOString());
    u.setAttribute("data-ms", String(o.now_ms));
    u.textContent = fmtTime(o.now_ms);
  }

  function signedOut() {
    stopPolling();
    if (es) { es.close(); es = null; }
    setConn("signed-out", "signed out: reload the page to sign in");
  }

  function stopPolling() {
    if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; }
  }

  async function poll() {
    pollTimer = null;
    try {
      const r = await fetch("/v1/overview?since=" + lastT, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { signedOut(); return; }
      if (streaming) return;
      if (!r.ok) throw new Error("HTTP " + r.status);
      apply(await r.json());
      setConn("polling", "live (polling)");
    } catch (e) {
      setConn("down", "node unreachable, retrying");
    }
    if (!streaming && !pollTimer) pollTimer = setTimeout(poll, POLL_MS);
  }

  function startPolling() {
    if (!pollTimer) poll();
  }

  function connect() {
    if (!window.EventSource) { startPolling(); return; }
    es = new EventSource("/v1/overview/stream");
    es.addEventListener("overview", (ev) => {
      streaming = true;
      stopPolling();
      setConn("live", "live");
      apply(JSON.parse(ev.data));
    });
    es.onerror = () => {
      streaming = false;
      if (es && es.readyState === EventSource.CLOSED) {
        // Refused (401, 503) or not a stream: poll instead.
        es = null;
        startPolling();
        return;
      }
      // The browser reconnects by itself; poll meanwhile, which also
      // finds out whether the node is gone or the session ended.
      setConn("down", "reconnecting");
      startPolling();
    };
  }

  connect();
})();
