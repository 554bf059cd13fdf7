// meshnode dashboard: reads this node's admin API and draws it. Every name
// shown comes from the network (gossip, certificates), so text goes in as
// text nodes only; nothing is parsed as HTML.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
let prevTop = null;
let lastOk = 0;

// --- small DOM helpers -------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const cols = document.querySelectorAll(`#${tableId} thead th`).length;
    body.append(h("tr", {}, h("td", { colspan: cols, class: "muted" }, "none")));
  }
}

function badge(state) {
  return h("span", { class: `badge ${state}` }, state);
}

function ago(unix) {
  if (!unix) return "";
  const d = Math.round(Date.now() / 1000 - unix);
  return duration(Math.abs(d)) + (d >= 0 ? " ago" : " ahead");
}

function duration(secs) {
  if (secs === null || secs === undefined) return "?";
  const neg = secs < 0;
  secs = Math.abs(secs);
  const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
  for (const [u, n] of units) {
    if (secs >= n || u === "s") return (neg ? "-" : "") + Math.floor(secs / n) + u;
  }
  return "";
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (!isFinite(seconds)) return "> 10 s";
  if (seconds < 0.001) return (seconds * 1e6).toFixed(0) + " µs";
  if (seconds < 1) return (seconds * 1000).toFixed(1) + " ms";
  return seconds.toFixed(2) + " s";
}

// --- the admin API -----------------------------------------------------------

function authHeaders() {
  const secret = sessionStorage.getItem("meshnode-secret");
  return secret ? { Authorization: `Bearer ${secret}` } : {};
}

async function get(path, optional) {
  const r = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (r.status === 401) {
    document.getElementById("secret").hidden = false;
    throw new Error("the admin API asks for the secret");
  }
  if (!r.ok) {
    if (optional) return null;
    throw new Error(`${path}: HTTP ${r.status}`);
  }
  return r.json();
}

// --- traffic: rates between two /v1/top snapshots ----------------------------

/// The same interpolated quantile as `meshnode top`.
function quantile(bounds, counts, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const rank = q * total;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    const c = counts[i];
    if (c === 0) continue;
    if (seen + c >= rank) {
      if (i >= bounds.length) return Infinity;
      const lo = i === 0 ? 0 : bounds[i - 1];
      const within = Math.min(1, Math.max(0, (rank - seen) / c));
      return lo + (bounds[i] - lo) * within;
    }
    seen += c;
  }
  return Infinity;
}

function pairKey(p) {
  return [p.direction, p.kind, p.source_service, p.source_cluster, p.destination_service, p.destination_cluster].join("|");
}

/// One row per pair with its rate over the last interval (or since the
/// node started, on the first load).
function traffic(top, prev) {
  const restarted = prev && top.uptime_ms < prev.uptime_ms;
  const base = prev && !restarted ? prev : null;
  const secs = Math.max(1, base ? top.uptime_ms - base.uptime_ms : top.uptime_ms) / 1000;
  const before = new Map((base ? base.pairs : []).map((p) => [pairKey(p), p]));
  return top.pairs.map((p) => {
    const b = before.get(pairKey(p));
    const d = (now, then) => Math.max(0, now - (then || 0));
    const total = d(p.total, b && b.total);
    const errors = d(p.errors, b && b.errors);
    const buckets = p.latency_buckets.map((c, i) => d(c, b && b.latency_buckets[i]));
    return {
      from: `${p.source_service}@${p.source_cluster}`,
      to: `${p.destination_service}@${p.destination_cluster}`,
      direction: p.direction,
      kind: p.kind,
      seen: p.total,
      rate: total / secs,
      errorShare: total ? errors / total : 0,
      p99: quantile(top.latency_bounds, buckets, 0.99),
    };
  });
}

/// Edges by (caller, callee, kind): a call both sent and received by this
/// node (a local caller and callee) is drawn once.
function edges(rows) {
  const m = new Map();
  for (const r of rows) {
    const k = `${r.from}|${r.to}|${r.kind}`;
    const e = m.get(k);
    if (!e || (r.direction === "out" && e.direction !== "out")) m.set(k, r);
  }
  return [...m.values()];
}

function drawTopology(list) {
  const box = document.getElementById("topology");
  if (list.length === 0) {
    box.replaceChildren(h("p", { class: "muted" }, "No calls through this node yet."));
    return;
  }
  // Layers: callers that nobody calls first, each callee one right of its callers.
  const names = [...new Set(list.flatMap((e) => [e.from, e.to]))].sort();
  const layer = new Map(names.map((n) => [n, 0]));
  for (let i = 0; i < names.length; i++) {
    for (const e of list) {
      if (e.from !== e.to && layer.get(e.to) <= layer.get(e.from)) layer.set(e.to, layer.get(e.from) + 1);
    }
  }
  const cols = new Map();
  for (const n of names) {
    const l = Math.min(layer.get(n), names.length);
    if (!cols.has(l)) cols.set(l, []);
    cols.get(l).push(n);
  }
  const colW = 440, rowH = 70, nodeW = 180, nodeH = 34, pad = 20;
  const ncols = Math.max(...cols.keys()) + 1;
  const nrows = Math.max(...[...cols.values()].map((c) => c.length));
  const width = pad * 2 + (ncols - 1) * colW + nodeW;
  const height = pad * 2 + (nrows - 1) * rowH + nodeH;
  const pos = new Map();
  for (const [l, members] of cols) {
    members.forEach((n, i) => {
      const offset = ((nrows - members.length) * rowH) / 2;
      pos.set(n, { x: pad + l * colW, y: pad + offset + i * rowH });
    });
  }
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "who calls whom" });
  const defs = s("defs");
  const marker = s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }));
  defs.append(marker);
  svg.append(defs);
  for (const e of list) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const x1 = a.x + nodeW, y1 = a.y + nodeH / 2, x2 = b.x, y2 = b.y + nodeH / 2;
    const mx = (x1 + x2) / 2;
    const bad = e.errorShare >= 0.05 ? " bad" : e.errorShare > 0 ? " warn" : "";
    const g = s("g", { class: `edge${bad}`, "data-edge": `${e.from}>${e.to}` });
    g.append(s("path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)" }));
    const label = `${e.rate.toFixed(1)}/s · ${(e.errorShare * 100).toFixed(1)}% err · p99 ${ms(e.p99)}`;
    g.append(s("text", { x: mx, y: (y1 + y2) / 2 - 6, "text-anchor": "middle" }, label));
    svg.append(g);
  }
  for (const n of names) {
    const p = pos.get(n);
    const g = s("g", { class: "svc", "data-node": n });
    g.append(s("rect", { x: p.x, y: p.y, width: nodeW, height: nodeH, rx: 6 }));
    g.append(s("text", { x: p.x + nodeW / 2, y: p.y + nodeH / 2 + 5, "text-anchor": "middle" }, n.length > 26 ? n.slice(0, 25) + "…" : n));
    svg.append(g);
  }
  box.replaceChildren(svg);
}

// --- the panels --------------------------------------------------------------

function overview(status, members, services) {
  const alive = members.filter((m) => m.state === "alive").length;
  const healthy = Object.values(services).flat().filter((i) => i.health === "passing" || i.health === "warning").length;
  const card = (title, value, detail, cls) =>
    h("div", { class: `card ${cls || ""}` }, h("div", { class: "muted" }, title), h("div", { class: "value" }, value), h("div", { class: "muted" }, detail));
  const certCls = status.cert_expires_in_seconds < 0 ? "bad" : status.cert_expires_in_seconds < 86400 ? "warn" : "";
  const caCls = status.ca_expires_in_seconds !== null && status.ca_expires_in_seconds < 30 * 86400 ? "warn" : "";
  return [
    card("members alive", `${alive} / ${members.length}`, `cluster ${status.cluster}`),
    card("services", String(Object.keys(services).length), `${healthy} healthy instances or clusters`),
    card("certificate", duration(status.cert_expires_in_seconds), "until it expires (renewed in place)", certCls),
    card("mesh CA", duration(status.ca_expires_in_seconds), "until it expires", caCls),
    card("streams", String(status.active_streams), `${status.upstreams} upstreams here`),
    card("policy", String(status.policy.documents), status.policy.loaded ? "documents, up to date" : "documents, still loading"),
  ];
}

function clusterRows(status, members, wan, services) {
  const clusters = new Map();
  const own = { state: "local", gateways: new Set(), nodes: members.length };
  for (const m of members) if (m.gateway) own.gateways.add(m.node);
  clusters.set(status.cluster, own);
  for (const m of wan || []) {
    if (m.cluster === status.cluster) continue;
    const c = clusters.get(m.cluster) || { state: "unreachable", gateways: new Set(), nodes: null };
    c.gateways.add(`${m.node} (${m.state})`);
    if (m.state === "alive") c.state = "reachable";
    clusters.set(m.cluster, c);
  }
  for (const list of Object.values(services)) {
    for (const e of list) {
      if (!e.remote) continue;
      const c = clusters.get(e.cluster) || { state: "unreachable", gateways: new Set(), nodes: null };
      for (const g of e.gateways) if (![...c.gateways].some((x) => x.startsWith(g))) c.gateways.add(g);
      if (e.reachable) c.state = "reachable";
      clusters.set(e.cluster, c);
    }
  }
  return [...clusters.entries()].sort().map(([name, c]) =>
    h("tr", { "data-cluster": name, "data-state": c.state },
      h("td", {}, name), h("td", {}, badge(c.state)), h("td", {}, [...c.gateways].join(", ") || "–"),
      h("td", {}, c.nodes === null ? "–" : c.nodes)));
}

function memberRows(members) {
  return members
    .slice()
    .sort((a, b) => a.node.localeCompare(b.node))
    .map((m) => h("tr", { "data-member": m.node, "data-state": m.state },
      h("td", {}, m.node), h("td", { class: "mono" }, m.addr), h("td", {}, badge(m.state)), h("td", {}, m.gateway ? "gateway" : "node")));
}

function serviceRows(services) {
  const rows = [];
  for (const name of Object.keys(services).sort()) {
    for (const i of services[name]) {
      const health = i.health;
      if (i.remote) {
        rows.push(h("tr", { "data-service": name, "data-cluster": i.cluster, "data-health": health },
          h("td", {}, name), h("td", {}, i.cluster), h("td", { class: "muted" }, `via ${i.via.join(", ")}`),
          h("td", {}, badge(health)), h("td", {}, i.tags.join(" ")),
          h("td", { class: "muted" }, `${i.healthy} healthy · ${i.reachable ? "reachable" : "unreachable"}${i.rtt_ms !== null ? ` · ${i.rtt_ms} ms` : ""}`)));
      } else {
        rows.push(h("tr", { "data-service": name, "data-cluster": i.cluster, "data-instance": i.node, "data-health": health },
          h("td", {}, name), h("td", {}, i.cluster), h("td", { class: "mono" }, `${i.node} ${i.addr}:${i.port}`),
          h("td", {}, badge(health)), h("td", {}, i.tags.join(" ")),
          h("td", { class: "muted" }, i.check ? (i.check.output || "").slice(0, 80) : i.protocol)));
      }
    }
  }
  return rows;
}

function revocationRows(list) {
  return list.map((r) => h("tr", {},
    h("td", { class: "mono" }, r.identity || (r.serials || []).join(", ") || `${(r.keys || []).length} keys`),
    h("td", {}, r.reason), h("td", {}, ago(r.revoked_at)), h("td", {}, ago(r.expires))));
}

function policyRows(p) {
  return (p.documents || []).map((d) => h("tr", { class: d.deleted ? "muted" : "" },
    h("td", {}, d.kind), h("td", {}, d.name + (d.deleted ? " (deleted)" : "")), h("td", {}, d.version), h("td", {}, d.signer)));
}

function pairRows(rows) {
  return rows
    .slice()
    .sort((a, b) => b.rate - a.rate || b.seen - a.seen)
    .map((r) => h("tr", { "data-pair": `${r.from}>${r.to}`, class: r.errorShare >= 0.05 ? "bad" : "" },
      h("td", {}, r.from), h("td", {}, r.to), h("td", {}, `${r.kind} ${r.direction}`), h("td", {}, r.seen),
      h("td", {}, r.rate.toFixed(1)), h("td", {}, `${(r.errorShare * 100).toFixed(1)}%`), h("td", {}, ms(r.p99))));
}

// --- the loop ----------------------------------------------------------------

async function refresh() {
  const [status, members, services, top, revocations, policy] = await Promise.all([
    get("/v1/status"), get("/v1/members"), get("/v1/services"), get("/v1/top"), get("/v1/revocations"), get("/v1/policy"),
  ]);
  const wan = status.gateway ? await get("/v1/members?pool=wan", true) : null;
  document.getElementById("identity").textContent = `${status.identity}${status.gateway ? " · gateway" : ""}${status.ca ? " · CA" : ""}`;
  document.getElementById("warnings").replaceChildren(...status.warnings.map((w) => h("div", { class: "warning" }, w)));
  document.getElementById("overview").replaceChildren(...overview(status, members, services));
  fill("clusters", clusterRows(status, members, wan, services));
  fill("members", memberRows(members));
  fill("services", serviceRows(services));
  fill("revocations", revocationRows(revocations));
  fill("policy", policyRows(policy));
  const rows = traffic(top, prevTop);
  prevTop = top;
  document.getElementById("topology-note").textContent = "(calls this node made or received; rates over the last refresh)";
  drawTopology(edges(rows));
  fill("pairs", pairRows(rows));
  lastOk = Date.now();
}

async function loop() {
  const live = document.getElementById("live");
  try {
    await refresh();
    live.textContent = "live";
    live.className = "badge alive";
    document.body.dataset.loaded = "true";
  } catch (e) {
    const stale = lastOk ? ` (last update ${Math.round((Date.now() - lastOk) / 1000)} s ago)` : "";
    live.textContent = `offline${stale}`;
    live.className = "badge dead";
    live.title = String(e && e.message ? e.message : e);
  }
  setTimeout(loop, REFRESH_MS);
}

document.getElementById("secret-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("meshnode-secret", document.getElementById("secret-input").value.trim());
  document.getElementById("secret").hidden = true;
});

loop();
