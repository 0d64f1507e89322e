// fedscan status page: renders /api/status every 2 s. Every text is set with textContent
// (site names and error reasons come from the sites), never as HTML.
"use strict";

const REFRESH_MS = 2000;
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
let lastCharts = "";

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  return value.toFixed(digits);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// A cell holding a number: the exact value in data-value, the rounded one as text.
function numCell(value, digits, attrs) {
  const cell = el("td", fmt(value, digits), {...attrs, class: "num"});
  if (typeof value === "number") cell.dataset.value = String(value);
  return cell;
}

function outcomeCell(outcome, attrs) {
  const cls = {trained: "ok", replied: "ok", declined: "warn", waiting: "warn",
               rejected: "bad", error: "bad"}[outcome];
  return el("td", outcome || "—", {...attrs, class: cls});
}

function replaceBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

function renderHeader(view) {
  const run = view.run;
  document.getElementById("run-name").textContent = run.name;
  const badge = document.getElementById("run-state");
  const state = run.stale ? "not responding" : run.state;
  badge.textContent = state;
  badge.className = `badge ${run.stale ? "stale" : run.state}`;
  const meta = [run.task, run.mode, run.strategy].filter(Boolean).join(" · ");
  document.getElementById("run-meta").textContent = meta;
  document.getElementById("updated").textContent =
    run.updated ? `live state written ${ago(view.now - run.updated)}` : "no live state (summary only)";
  const notice = document.getElementById("notice");
  const notes = [];
  if (run.held) notes.push("Held: the run folder has a file named 'hold'; no new round starts until it is deleted.");
  if (run.stale) notes.push("The server has not updated its live state for a while: it may have stopped.");
  if (run.reason) notes.push(`Run failed: ${run.reason}`);
  notice.textContent = notes.join(" ");
  notice.hidden = notes.length === 0;
}

function renderCards(view) {
  const r = view.rounds;
  const done = document.getElementById("rounds-done");
  done.textContent = `${r.done} of ${r.total}`;
  done.dataset.done = String(r.done);
  done.dataset.total = String(r.total);
  const flight = document.getElementById("in-flight");
  flight.dataset.round = r.in_flight === null ? "" : String(r.in_flight);
  if (r.in_flight === null) {
    flight.textContent = view.run.held ? "held" : "—";
  } else {
    const what = r.phase === "final_evaluate" ? "final evaluation" : `round ${r.in_flight}`;
    const n = r.replies || {waiting: 0, replied: 0, error: 0};
    const sent = n.waiting + n.replied + n.error;
    const failed = n.error ? `, ${n.error} failed` : "";
    flight.textContent = `${what}, ${duration(view.now - r.in_flight_since)}`;
    flight.title = `${n.replied} of ${sent} sites replied${failed}`;
    flight.append(el("div", `${n.replied} of ${sent} replied${failed}`, {class: "muted"}));
  }
  document.getElementById("eta").textContent = r.eta_seconds === null ? "—" : duration(r.eta_seconds);
  const faults = view.faults.filter((f) => f.kind !== "flagged");  // data-check flags: below
  const errors = faults.filter((f) => f.kind === "error").length;
  document.getElementById("fault-count").textContent =
    `${errors} / ${faults.length - errors}`;
}

function headline(view) {
  return view.metrics.find((m) => m.headline) || view.metrics[0] || null;
}

function renderSites(view) {
  const metric = headline(view);
  document.getElementById("sites-metric").textContent =
    metric ? `Latest ${metric.key}` : "Latest metric";
  const rows = view.sites.map((s) => {
    const tr = el("tr", null, {"data-site": s.name});
    tr.append(el("th", s.name));
    const online = s.online === null ? "—" : s.online ? "online" : "offline";
    tr.append(el("td", online, {"data-key": "online",
                                class: s.online === null ? "" : s.online ? "ok" : "bad"}));
    tr.append(el("td", s.last_contact ? ago(view.now - s.last_contact) : "—",
                 {"data-key": "last_contact"}));
    const flight = outcomeCell(s.in_flight, {"data-key": "in_flight"});
    if (s.error) flight.title = s.error;
    tr.append(flight);
    const last = s.last_round === null ? "—" : `${s.last_outcome || "—"} (round ${s.last_round})`;
    tr.append(el("td", last, {"data-key": "last_outcome"}));
    const eps = el("td", null, {"data-key": "epsilon"});
    if (s.epsilon === null) {
      eps.textContent = s.privacy_status === "off" ? "no DP" : "—";
    } else {
      const share = s.epsilon_budget ? Math.min(1, s.epsilon / s.epsilon_budget) : 0;
      const bar = el("span", null, {class: share >= 0.999 ? "bar full" : "bar"});
      const fill = el("span");
      fill.style.width = `${(100 * share).toFixed(1)}%`;
      bar.append(fill);
      const value = el("span", fmt(s.epsilon, 3), {"data-value": s.epsilon});
      const budget = el("span", ` of ${fmt(s.epsilon_budget, 3)}`,
                        {"data-budget": s.epsilon_budget});
      eps.append(bar, value, budget);
    }
    tr.append(eps);
    tr.append(el("td", `${bytes(s.bytes_down)} / ${bytes(s.bytes_up)}`,
                 {"data-key": "bytes", "data-down": s.bytes_down, "data-up": s.bytes_up}));
    const latest = metric ? s.metrics[metric.key] : undefined;
    tr.append(numCell(latest === undefined ? null : latest, 4, {"data-key": "metric"}));
    return tr;
  });
  replaceBody(document.getElementById("sites"), rows);
}

function renderPerRound(view) {
  const table = document.getElementById("per-round");
  const keys = view.metrics.map((m) => m.key);
  const head = el("tr");
  for (const name of ["Round", "Seconds", "Site", "Outcome", ...keys, "Train loss", "ε", "DP status"]) {
    head.append(el("th", name));
  }
  table.tHead.replaceChildren(head);
  const rows = [];
  for (const r of view.per_round) {
    for (const site of view.sites.map((s) => s.name)) {
      const v = r.sites[site];
      if (!v) continue;
      const at = {"data-round": r.round, "data-site": site};
      const tr = el("tr", null, at);
      tr.append(el("td", r.round), numCell(r.seconds, 1), el("td", site));
      tr.append(outcomeCell(v.outcome, {...at, "data-key": "outcome"}));
      for (const key of keys) {
        const value = key in v.metrics ? v.metrics[key] : null;
        tr.append(numCell(value, 4, {...at, "data-key": key}));
      }
      tr.append(numCell(v.loss === undefined ? null : v.loss, 4, {...at, "data-key": "loss"}));
      tr.append(numCell(v.epsilon === undefined ? null : v.epsilon, 3, {...at, "data-key": "epsilon"}));
      tr.append(el("td", v.status || "—", {...at, "data-key": "status"}));
      rows.push(tr);
    }
    const at = {"data-round": r.round, "data-site": "aggregate"};
    const tr = el("tr", null, {...at, class: "aggregate"});
    tr.append(el("td", r.round), numCell(r.seconds, 1), el("th", "aggregate"), el("td", ""));
    for (const key of keys) {
      tr.append(numCell(key in r.aggregate ? r.aggregate[key] : null, 4, {...at, "data-key": key}));
    }
    tr.append(el("td", ""), el("td", ""), el("td", ""));
    rows.push(tr);
  }
  replaceBody(table, rows);
}

function renderFaults(view) {
  const rows = view.faults.map((f) => {
    const tr = el("tr");
    tr.append(el("td", f.round), el("td", f.site), el("td", f.phase),
              el("td", f.kind, {class: "bad"}), el("td", f.reason));
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", "none", {colspan: 5}));
    rows.push(tr);
  }
  replaceBody(document.getElementById("faults"), rows);
}

function renderCrossSite(view) {
  const cs = view.cross_site;
  document.getElementById("cross-site-section").hidden = !cs;
  if (!cs) return;
  document.getElementById("cross-site-metric").textContent = cs.metric;
  const table = document.getElementById("cross-site");
  const head = el("tr");
  head.append(el("th", "model"), ...cs.sites.map((s) => el("th", s)),
              el("th", "off-diagonal"), el("th", "global there"));
  table.tHead.replaceChildren(head);
  replaceBody(table, cs.rows.map((r) => {
    const tr = el("tr", null, {"data-model": r.model});
    tr.append(el("th", r.model),
              ...r.values.map((v, i) => numCell(v, 4, {"data-site": cs.sites[i]})),
              numCell(r.off_diagonal, 4, {"data-key": "off_diagonal"}),
              numCell(r.global_there, 4, {"data-key": "global_there"}));
    return tr;
  }));
  const refused = Object.entries(cs.not_shared).map(([s, why]) => `${s}: ${why}`);
  document.getElementById("cross-site-not-shared").textContent =
    refused.length ? `No local model from ${refused.join("; ")}.` : "";
}

function chartDiv(container, key) {
  let div = container.querySelector(`[data-chart="${CSS.escape(key)}"]`);
  if (!div) {
    div = el("div", null, {class: "chart", "data-chart": key});
    container.append(div);
  }
  return div;
}

function series(view, site, pick) {
  const xs = [], ys = [];
  for (const r of view.per_round) {
    const value = pick(r, site);
    if (typeof value === "number") { xs.push(r.round); ys.push(value); }
  }
  return {xs, ys};
}

function renderCharts(view) {
  if (typeof Plotly === "undefined") return;
  const signature = JSON.stringify([view.per_round, view.metrics, view.sites.map((s) => s.name)]);
  if (signature === lastCharts) return;  // redraw only when the data changed
  lastCharts = signature;
  const container = document.getElementById("charts");
  const sites = view.sites.map((s) => s.name);
  const color = (i) => PALETTE[i % PALETTE.length];
  const layout = (title, ytitle) => ({
    title: {text: title, font: {size: 14}}, margin: {l: 55, r: 10, t: 36, b: 40},
    xaxis: {title: {text: "round"}, dtick: 1}, yaxis: {title: {text: ytitle}},
    legend: {orientation: "h", y: -0.25}, paper_bgcolor: "white", plot_bgcolor: "white",
  });
  const config = {displaylogo: false, responsive: true};
  const privateSites = sites.filter((site) =>
    view.per_round.some((r) => r.sites[site] && typeof r.sites[site].epsilon === "number"));
  // Metrics first, then privacy, in the same order on every refresh.
  const order = view.metrics.map((m) => m.key).concat(privateSites.length ? ["epsilon"] : []);
  container.append(...order.map((key) => chartDiv(container, key)));
  for (const metric of view.metrics) {
    const traces = sites.map((site, i) => {
      const s = series(view, site, (r, name) => r.sites[name] && r.sites[name].metrics[metric.key]);
      return {x: s.xs, y: s.ys, name: site, mode: "lines+markers", line: {color: color(i)}};
    });
    const agg = series(view, null, (r) => r.aggregate[metric.key]);
    traces.push({x: agg.xs, y: agg.ys, name: "aggregate", mode: "lines+markers",
                 line: {color: "#555", dash: "dash", width: 3}});
    const unit = metric.unit ? ` (${metric.unit})` : "";
    Plotly.react(chartDiv(container, metric.key), traces,
                 layout(`${metric.key}${unit} per round`, metric.key), config);
  }
  if (privateSites.length) {
    const traces = [];
    privateSites.forEach((site) => {
      const i = sites.indexOf(site);
      const s = series(view, site, (r, name) => r.sites[name] && r.sites[name].epsilon);
      traces.push({x: s.xs, y: s.ys, name: site, mode: "lines+markers", line: {color: color(i)}});
      const b = series(view, site, (r, name) => r.sites[name] && r.sites[name].epsilon_budget);
      traces.push({x: b.xs, y: b.ys, name: `${site} budget`, mode: "lines",
                   line: {color: color(i), dash: "dot"}, showlegend: false});
    });
    Plotly.react(chartDiv(container, "epsilon"), traces,
                 layout("privacy spent (ε) per round; dotted: budget", "ε"), config);
  }
}

async function refresh() {
  try {
    const response = await fetch("/api/status", {cache: "no-store", credentials: "same-origin"});
    if (!response.ok) throw new Error(`status ${response.status}`);
    const view = await response.json();
    renderHeader(view);
    renderCards(view);
    renderSites(view);
    renderPerRound(view);
    renderFaults(view);
    renderCrossSite(view);
    renderCharts(view);
    document.body.dataset.updated = String(view.now);
  } catch (error) {
    const badge = document.getElementById("run-state");
    badge.textContent = `page not reachable (${error.message})`;
    badge.className = "badge stale";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
