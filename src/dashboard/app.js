// keygate operator dashboard: reads the admin API with the pasted token and redraws every
// few seconds. No dependencies; served with a CSP that allows only this origin.
"use strict";

const TOKEN_KEY = "keygate.token";
const REFRESH_MS = 5000;
const num = new Intl.NumberFormat();
const $ = (id) => document.getElementById(id);
let timer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token() }, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : "HTTP " + response.status;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function duration(secs) {
  if (secs < 90) return num.format(secs) + " s";
  if (secs < 5400) return num.format(Math.round(secs / 60)) + " min";
  return num.format(Math.round(secs / 3600)) + " h";
}

function when(iso) {
  if (!iso) return "—";
  const t = new Date(iso);
  const ago = Math.round((Date.now() - t.getTime()) / 1000);
  const rel = ago >= 0 ? duration(ago) + " ago" : "in " + duration(-ago);
  return t.toLocaleString() + " (" + rel + ")";
}

function meter(window, label) {
  const ratio = window.limit > 0 ? Math.min(1, window.used / window.limit) : 0;
  const cls = ratio >= 1 ? "meter full" : ratio >= 0.8 ? "meter warn" : "meter";
  const bar = el("div", {
    class: cls, role: "meter", "aria-label": label,
    "aria-valuemin": "0", "aria-valuemax": String(window.limit), "aria-valuenow": String(window.used),
  }, el("span"));
  // Through the CSSOM: a style attribute would be blocked by the page's CSP.
  bar.firstChild.style.width = (ratio * 100).toFixed(1) + "%";
  const text = el("div", { class: "meter-text" },
    num.format(window.used) + " / " + num.format(window.limit) + " · resets in " + duration(window.reset_secs));
  return [bar, text];
}

function renderTeams(usage) {
  const body = $("teams");
  body.replaceChildren(...usage.teams.map((t) => el("tr", { "data-team": t.team },
    el("th", { scope: "row" }, t.team),
    el("td", { "data-label": "Plan" }, t.plan),
    el("td", { "data-label": "Minute", class: "minute" }, ...meter(t.minute, t.team + " minute quota")),
    el("td", { "data-label": "Day", class: "day" }, ...meter(t.day, t.team + " day quota")),
  )));
  $("upstream").textContent = usage.upstream
    ? "Upstream key ceiling: minute " + num.format(usage.upstream.minute.used) + " / " + num.format(usage.upstream.minute.limit)
      + ", day " + num.format(usage.upstream.day.used) + " / " + num.format(usage.upstream.day.limit)
    : "";
}

const SERIES = [["forwarded", "bar-forwarded", "forwarded"], ["denied", "bar-denied", "401/403"],
  ["rate_limited", "bar-limited", "429"], ["upstream_error", "bar-failed", "upstream error"]];

function renderSeries(data) {
  const ns = "http://www.w3.org/2000/svg";
  const figures = data.teams.map((team) => {
    const minutes = data.minutes;
    const totals = Array.from({ length: minutes }, (_, i) => SERIES.reduce((s, [k]) => s + (team.series[k] || [])[i] || 0, 0));
    const peak = Math.max(1, ...totals);
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + minutes * 10 + " 100");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const sums = SERIES.map(([k, , label]) => label + " " + num.format((team.series[k] || []).reduce((a, b) => a + b, 0)));
    svg.setAttribute("aria-label", team.team + ", last " + minutes + " minutes: " + sums.join(", "));
    for (let i = 0; i < minutes; i++) {
      let y = 100;
      for (const [key, cls, label] of SERIES) {
        const v = (team.series[key] || [])[i] || 0;
        if (!v) continue;
        const h = (v / peak) * 96;
        y -= h;
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(i * 10 + 1));
        rect.setAttribute("width", "8");
        rect.setAttribute("y", y.toFixed(2));
        rect.setAttribute("height", h.toFixed(2));
        rect.setAttribute("class", cls);
        const title = document.createElementNS(ns, "title");
        title.textContent = (minutes - i) + " min ago: " + num.format(v) + " " + label;
        rect.append(title);
        svg.append(rect);
      }
    }
    return el("figure", { "data-team": team.team }, el("figcaption", {}, team.team + " · peak " + num.format(peak) + "/min"), svg,
      el("div", { class: "hint" }, sums.join(" · ")));
  });
  $("series").replaceChildren(...(figures.length ? figures : [el("p", { class: "hint" }, "No traffic yet.")]));
}

function renderAlerts(data) {
  const rows = data.alerts.slice(-50).reverse().map((a) => el("tr", {},
    el("td", {}, when(a.at)), el("td", {}, a.kind), el("td", {}, a.team || "—"), el("td", {}, a.key_id || "—"),
    el("td", {}, a.signal || a.window || a.mode || "—"), el("td", {}, a.text || "")));
  $("alerts").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "6", class: "hint" }, "No alerts."))]));
}

function renderKeys(data) {
  $("keys-note").hidden = true;
  $("keys-table").hidden = false;
  $("keys").replaceChildren(...data.keys.map((k) => el("tr", {},
    el("th", { scope: "row" }, k.id), el("td", {}, k.team), el("td", {}, k.scopes.join(", ")), el("td", {}, k.env),
    el("td", {}, k.origin), el("td", {}, when(k.created)), el("td", {}, when(k.expires)), el("td", {}, when(k.last_used)))));
}

function renderHealth(ready) {
  const store = ready.store || {};
  const state = store.state || "ok";
  const cls = ready.status === "ready" && state === "ok" ? "ok" : state === "ok" ? "bad" : "warn";
  $("health").replaceChildren(el("span", { class: "badge " + cls }, ready.status + (state !== "ok" ? " · store " + state : "")),
    " v" + (ready.version || "?"));
  const facts = [["Store", (store.kind || "?") + " — " + state], ["Mode on store error", store.mode || "—"],
    ["Last store error", store.last_error || "—"], ["Degraded since", store.degraded_since ? when(store.degraded_since) : "—"],
    ["Upstream keys", (ready.upstream_keys || []).length ? ready.upstream_keys.map((p) => p.env + ": " + p.problem).join("; ") : "all readable"],
    ["Version", ready.version || "?"]];
  $("health-detail").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function refresh() {
  try {
    const ready = await fetch("/readyz", { cache: "no-store" }).then((r) => r.json()).catch(() => null);
    if (ready) renderHealth(ready);
    if (!token()) return;
    const usage = await api("/admin/usage");
    renderTeams(usage);
    const [series, alerts] = await Promise.all([api("/admin/series?minutes=60"), api("/admin/alerts")]);
    renderSeries(series);
    renderAlerts(alerts);
    const isAdmin = usage.caller && usage.caller.scopes.includes("admin");
    if (isAdmin) {
      renderKeys(await api("/admin/keys"));
    } else {
      $("keys").replaceChildren();
      $("keys-table").hidden = true;
      $("keys-note").hidden = false;
      $("keys-note").textContent = "Listing keys needs a token with scope admin.";
    }
    showError("");
    $("content").hidden = false;
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (e) {
    showError(e.message);
    if (e.status === 401 || e.status === 403) {
      $("content").hidden = true;
      stop();
    }
  }
}

function start() {
  stop();
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

function stop() {
  if (timer) clearInterval(timer);
  timer = null;
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    stop();
    $("content").hidden = true;
    showError("");
  });
  refresh();
  if (token()) start();
});
