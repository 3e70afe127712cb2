// tempomq console: a small single-page app over the JSON API (docs/console.md).
//
// Every call goes through api(), which sends the token from sessionStorage as a Bearer header
// and, on a 401, shows the login form and retries the call with the token entered. Pages are
// functions of the route (location.hash) that build DOM with h(); nothing user-supplied is ever
// parsed as HTML. A page may start a poll with every(); leaving the page stops it.
"use strict";

const TOKEN_KEY = "tempomq.token";
const main = document.getElementById("main");
let pageTimers = [];

// -- DOM helpers -----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty || "Nothing here.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.num ? "num" : null }, x.label || x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) =>
      h("td", { class: headers[i].num ? "num" : null }, c))))));
}

function props(pairs) {
  return h("dl", { class: "props" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

function when(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace("Z", "");
}

function fromNow(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = ms - Date.now();
  const a = Math.abs(d);
  const text = a < 1000 ? `${a} ms` : a < 120000 ? `${(a / 1000).toFixed(1)} s`
    : a < 7200000 ? `${Math.round(a / 60000)} min` : a < 172800000 ? `${Math.round(a / 3600000)} h`
      : `${Math.round(a / 86400000)} d`;
  return d >= 0 ? `in ${text}` : `${text} ago`;
}

function num(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US");
}

function link(href, text) { return h("a", { href }, text); }
function enc(s) { return encodeURIComponent(s); }
function topicHref(t) { return `#/topics/${enc(t)}`; }
function messageHref(id) { return `#/messages/${id}`; }
function bodyText(m) { return m.body !== undefined ? m.body : `(base64) ${m.body_b64}`; }
function preview(m) { const b = bodyText(m); return b.length > 80 ? b.slice(0, 80) + "…" : b; }

function flash(text, isError) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = isError ? "error" : "";
  el.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 3000);
}

function every(ms, fn) {
  fn();
  pageTimers.push(setInterval(fn, ms));
}

// A click is a press and a release on the same element: a refresh that replaces the element
// between the two loses the click (no error, nothing sent). Refreshes that rebuild controls
// await released() before they touch the page; it resolves at once when no pointer is down,
// else after the release and the click it makes.
let pointerDown = false;
let releaseWaiters = [];
document.addEventListener("pointerdown", () => { pointerDown = true; }, true);
for (const type of ["pointerup", "pointercancel"]) {
  document.addEventListener(type, () => setTimeout(() => {
    pointerDown = false;
    releaseWaiters.splice(0).forEach((resolve) => resolve());
  }), true);
}

function released() {
  return pointerDown ? new Promise((resolve) => releaseWaiters.push(resolve)) : Promise.resolve();
}

// The same for the keyboard: a rebuild drops the focus of a control it replaces to the page's
// start. keepFocus(el, build) rebuilds el and focuses again the control that had the focus in
// it, found by its data-focus attribute, its link, or its form's id and its name.
const CONTROLS = "[data-focus], a[href], form[id] [name]";

function controlKey(x) {
  return x.getAttribute("data-focus") || x.getAttribute("href")
    || (x.name && x.form && x.form.id ? `${x.form.id} ${x.name}` : null);
}

function keepFocus(el, build) {
  const had = el.contains(document.activeElement) ? controlKey(document.activeElement) : null;
  build();
  if (had) {
    const again = [...el.querySelectorAll(CONTROLS)].find((x) => controlKey(x) === had);
    if (again) again.focus();
  }
}

// A page re-rendered by its own action (a create, a send: the route is the same) rebuilds its
// forms, which emptied what was typed and not submitted yet. show(...) puts the page in main
// and, on the same route, gives back the fields the user changed (those of forms with an id,
// matched by form id and name) and the focus. A form an action was done with is reset first
// (see act), so it starts empty again.
function show(...children) {
  const build = () => main.replaceChildren(...children);
  if (main.dataset.route !== location.hash) {
    main.dataset.route = location.hash;
    build();
    return;
  }
  const typed = new Map();
  for (const x of main.querySelectorAll("form[id] [name]")) {
    if (changed(x)) typed.set(controlKey(x), x.type === "checkbox" ? x.checked : x.value);
  }
  keepFocus(main, build);
  for (const x of main.querySelectorAll("form[id] [name]")) {
    const value = typed.get(controlKey(x));
    if (value === undefined) continue;
    if (x.type === "checkbox") x.checked = value; else x.value = value;
  }
}

function changed(x) {
  if (x.type === "checkbox") return x.checked !== x.defaultChecked;
  if (x.tagName === "SELECT") return [...x.options].some((o) => o.selected !== o.defaultSelected);
  return x.value !== x.defaultValue;
}

// -- the API, with login on 401 --------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${body.error}: ${body.message}` : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

let loginWaiters = null;

function askLogin(message) {
  const dialog = document.getElementById("login");
  const error = document.getElementById("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  if (!loginWaiters) {
    loginWaiters = [];
    document.getElementById("login-token").value = "";
    dialog.showModal();
  }
  return new Promise((resolve) => loginWaiters.push(resolve));
}

document.getElementById("login-form").addEventListener("submit", () => {
  const token = document.getElementById("login-token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("logout").hidden = false;
  const waiters = loginWaiters || [];
  loginWaiters = null;
  waiters.forEach((resolve) => resolve());
});

document.getElementById("login").addEventListener("cancel", (e) => e.preventDefault());

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("logout").hidden = true;
  route();
});

async function api(method, path, body) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (r.status === 401) {
      await askLogin(token ? "That token was not accepted." : "");
      continue;
    }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }
}

// An action from a button or form: runs it, reports the error, re-renders on success. A form
// given is done with on success: it is reset before the re-render (which keeps the others').
async function act(fn, done, form) {
  try {
    const text = await fn();
    if (text) flash(text);
    if (form) form.reset();
    if (done) await done();
  } catch (e) {
    flash(e.message, true);
  }
}

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

// -- charts (plain SVG) ----------------------------------------------------------------------

function sparkline(values) {
  const w = 180, hgt = 40;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(hgt - 2 - (v / max) * (hgt - 4)).toFixed(1)}`);
  return svg("svg", { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none" },
    svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2f6fd6", "stroke-width": "1.5" }));
}

function barChart(bars, opts) {
  // bars: [{label, value}]; one bar per entry, labelled under it, value above it.
  const w = 1000, hgt = (opts && opts.height) || 200, pad = 28;
  const max = Math.max(1, ...bars.map((b) => b.value));
  const bw = (w - 20) / Math.max(1, bars.length);
  const g = bars.map((b, i) => {
    const bh = (b.value / max) * (hgt - 2 * pad);
    const x = 10 + i * bw;
    return svg("g", {},
      svg("rect", { x: x + bw * 0.15, y: hgt - pad - bh, width: bw * 0.7, height: Math.max(bh, 0.5),
        fill: b.color || "#2f6fd6", "data-label": b.label, "data-value": b.value }),
      svg("text", { x: x + bw / 2, y: hgt - pad - bh - 4, "text-anchor": "middle" }, num(b.value)),
      svg("text", { x: x + bw / 2, y: hgt - 8, "text-anchor": "middle" }, b.label));
  });
  return h("div", { class: "chart" }, svg("svg", { viewBox: `0 0 ${w} ${hgt}` }, g));
}

// -- pages -----------------------------------------------------------------------------------

const RATES = [
  ["stored", "Stored / s"], ["received", "Received / s"], ["acked", "Acked / s"],
  ["delayed_released", "Released / s"],
];

async function pageOverview() {
  const history = Object.fromEntries(RATES.map(([k]) => [k, []]));
  let last = null;
  const tiles = h("div", { class: "cards", id: "rates" });
  const state = h("div", {});
  show(h("h1", {}, "Overview"), tiles, state);
  async function refresh() {
    const [o, ready] = await Promise.all([api("GET", "/v1/overview"), readiness()]);
    if (last) {
      const dt = Math.max(1, o.now - last.now) / 1000;
      for (const [k] of RATES) {
        history[k].push(Math.max(0, (o.counters[k] - last.counters[k]) / dt));
        if (history[k].length > 60) history[k].shift();
      }
    }
    last = o;
    tiles.replaceChildren(...RATES.map(([k, label]) => {
      const series = history[k];
      const now = series.length ? series[series.length - 1] : 0;
      return h("div", { class: "card", "data-rate": k },
        h("div", { class: "label" }, label), h("div", { class: "value" }, num(Math.round(now))), sparkline(series));
    }));
    const tx = o.transactions;
    const probe = o.probe === null
      ? h("span", { class: "muted" }, "no probe in this server (--probe-interval)")
      : h("span", { class: o.probe.ok ? "ok" : "bad" }, `${o.probe.ok ? "ok" : "FAILED"} · ${fromNow(o.probe.last_run_at)}`);
    state.replaceChildren(
      h("h2", {}, "State"),
      h("div", { class: "cards" },
        card("Total lag", num(o.lag), "lag"), card("Delayed pending", num(o.delayed_pending), "pending"),
        card("Topics", num(o.topics)), card("Groups", num(o.groups)),
        card("Open transactions", num(tx.prepared), "tx-open"), card("Parked transactions", num(tx.check_max), "tx-parked"),
        card("Resolved transactions", num(tx.committed + tx.rolled_back), "tx-resolved"),
        card("Dead-lettered", num(o.counters.dead_lettered))),
      h("h2", {}, "Last probe"), h("p", { id: "probe" }, probe),
      h("h2", {}, "Readiness"), ready);
  }
  every(2000, () => refresh().catch((e) => flash(e.message, true)));
}

function card(label, value, id) {
  return h("div", { class: "card", "data-card": id }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

async function readiness() {
  // /readyz answers 503 with the failing checks; both are shown, neither is an error here.
  const r = await fetch("/readyz");
  const data = await r.json();
  if (r.ok) return h("p", { id: "ready", class: "ok" }, "ready: every check passes");
  return h("div", { id: "ready" }, table(["check", "reason"],
    Object.entries(data.checks || {}).map(([k, v]) => [k, h("span", { class: "bad" }, v)])));
}

async function pageTopics() {
  const { topics } = await api("GET", "/v1/topics");
  const details = await Promise.all(topics.slice(0, 200).map((t) => api("GET", `/v1/topics/${enc(t.name)}`)));
  const rows = details.map((t) => {
    const total = t.queue_offsets.reduce((s, q) => s + (q.max_offset - q.min_offset), 0);
    return [link(topicHref(t.name), t.name), num(t.queues), num(total), when(t.created_at)];
  });
  const form = h("form", { class: "inline", id: "create-topic", onsubmit: (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    act(async () => {
      await api("POST", "/v1/topics", { name: v.name, queues: v.queues ? Number(v.queues) : undefined });
      return `topic ${v.name} created`;
    }, pageTopics, e.target);
  } },
  h("label", {}, "Name", h("input", { name: "name", required: true, placeholder: "orders" })),
  h("label", {}, "Queues", h("input", { name: "queues", type: "number", min: 1, placeholder: "8" })),
  h("button", { type: "submit" }, "Create topic"));
  const lookup = h("form", { class: "inline", id: "find-message", onsubmit: (e) => {
    e.preventDefault();
    location.hash = messageHref(formValues(e.target).id.trim());
  } },
  h("label", {}, "Message id", h("input", { name: "id", required: true, size: 34, placeholder: "32 hex digits" })),
  h("button", { type: "submit", class: "secondary" }, "Find"));
  show(h("h1", {}, "Topics"), form,
    table(["topic", { label: "queues", num: true }, { label: "messages", num: true }, "created"], rows, "No topics yet."),
    h("h2", {}, "Find a message by id"), lookup);
}

function messagesTable(messages, extra) {
  return table(
    [{ label: "offset", num: true }, "msg_id", "tags", "keys", "body", "stored", ...(extra ? extra.headers : [])],
    messages.map((m) => [num(m.queue_offset), h("code", {}, link(messageHref(m.msg_id), m.msg_id)), m.tags,
      m.keys.join(", "), preview(m), when(m.stored_at), ...(extra ? extra.cells(m) : [])]),
    "No messages.");
}

// The topic page's forms and the key search's results, kept while the same topic is shown: a
// re-render (after a send, say) must not wipe what was typed or found meanwhile.
let topicForms = null;

function formsOfTopic(name, params) {
  if (topicForms && topicForms.name === name && document.body.contains(topicForms.send)) {
    topicForms.params = params;
    return topicForms;
  }
  const forms = { name, params };
  const keyResults = h("div", { id: "key-results" });
  const byKey = h("form", { class: "inline", id: "by-key", onsubmit: (e) => {
    e.preventDefault();
    act(async () => {
      const { messages } = await api("GET", `/v1/topics/${enc(name)}/messages?key=${enc(formValues(e.target).key)}`);
      keyResults.replaceChildren(messagesTable(messages));
    });
  } }, h("label", {}, "Key", h("input", { name: "key", required: true })), h("button", { type: "submit", class: "secondary" }, "Find by key"));
  const send = h("form", { class: "inline", id: "send", onsubmit: (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    const msg = { body: v.body };
    if (v.tags) msg.tags = v.tags;
    if (v.keys) msg.keys = v.keys.split(",").map((k) => k.trim()).filter(Boolean);
    if (v.delay_ms) msg.delay_ms = Number(v.delay_ms);
    act(async () => {
      const r = await api("POST", `/v1/topics/${enc(name)}/messages`, msg);
      return r.deliver_at ? `scheduled ${r.msg_id} for ${when(r.deliver_at)}` : `sent ${r.msg_id} to queue ${r.queue_id}`;
    }, () => pageTopic(name, forms.params));
  } },
  h("label", {}, "Body", h("textarea", { name: "body", required: true })),
  h("label", {}, "Tags", h("input", { name: "tags", size: 10 })),
  h("label", {}, "Keys (comma-separated)", h("input", { name: "keys" })),
  h("label", {}, "Delay ms", h("input", { name: "delay_ms", type: "number", min: 0, size: 8 })),
  h("button", { type: "submit" }, "Send test message"));
  Object.assign(forms, { byKey, keyResults, send });
  topicForms = forms;
  return forms;
}

async function pageTopic(name, params) {
  const t = await api("GET", `/v1/topics/${enc(name)}`);
  const queue = Number(params.get("queue") || 0);
  const q = new URLSearchParams({ limit: 50 });
  if (params.get("offset")) q.set("offset", params.get("offset"));
  if (params.get("since")) q.set("since", String(Date.parse(params.get("since") + "Z")));
  const page = await api("GET", `/v1/topics/${enc(name)}/queues/${queue}/messages?${q}`);
  const go = (p) => { location.hash = `${topicHref(name)}?${new URLSearchParams(p)}`; };
  const browse = h("form", { class: "inline", id: "browse", onsubmit: (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    const p = { queue: v.queue };
    if (v.since) p.since = v.since; else if (v.offset !== "") p.offset = v.offset;
    go(p);
  } },
  h("label", {}, "Queue", h("select", { name: "queue" }, t.queue_offsets.map((x) =>
    h("option", { value: x.queue_id, selected: x.queue_id === queue }, `${x.queue_id} (${num(x.max_offset - x.min_offset)})`)))),
  h("label", {}, "From offset", h("input", { name: "offset", type: "number", min: 0, value: page.offset })),
  h("label", {}, "or stored since (UTC)", h("input", { name: "since", type: "datetime-local", step: 1 })),
  h("button", { type: "submit" }, "Show"));
  const nav = h("p", {},
    page.offset > page.min_offset ? h("button", { class: "secondary", onclick: () => go({ queue, offset: Math.max(page.min_offset, page.offset - 50) }) }, "← Older") : null, " ",
    page.next_offset < page.max_offset ? h("button", { class: "secondary", onclick: () => go({ queue, offset: page.next_offset }) }, "Newer →") : null,
    h("span", { class: "muted" }, ` offsets ${num(page.offset)}–${num(page.next_offset)} of ${num(page.min_offset)}–${num(page.max_offset)}`));
  const { byKey, keyResults, send } = formsOfTopic(name, params);
  // The forms come before the list a send refreshes: a list that grows above them would move
  // them under the pointer, and a click whose press and release land on different elements
  // is no click at all.
  show(h("h1", {}, `Topic ${name}`),
    h("h2", {}, "Send a test message"), send, h("h2", {}, "Find by key"), byKey, keyResults,
    h("h2", {}, "Messages"), browse, nav, messagesTable(page.messages));
}

async function pageMessage(id) {
  const t = await api("GET", `/v1/messages/${id}/trace`);
  const m = t.message;
  const parts = [h("h1", {}, `Message ${id}`)];
  if (t.delayed) {
    parts.push(h("h2", {}, "Delay schedule"), props([
      ["state", h("span", { class: "badge", id: "delay-state" }, t.delayed.state)], ["topic", t.delayed.topic],
      ["deliver at", `${when(t.delayed.deliver_at)} (${fromNow(t.delayed.deliver_at)})`]]));
  }
  if (m) {
    parts.push(h("h2", {}, "Message"), props([
      ["topic", link(topicHref(m.topic), m.topic)], ["queue / offset", `${m.queue_id} / ${m.queue_offset}`],
      ["tags", m.tags], ["keys", m.keys.join(", ")], ["born", when(m.born_at)], ["stored", when(m.stored_at)],
      ["DELIVER_AT", m.properties.DELIVER_AT ? when(Number(m.properties.DELIVER_AT)) : null],
      ["RELEASED_AT", m.properties.RELEASED_AT ? when(Number(m.properties.RELEASED_AT)) : null],
      ...Object.entries(m.properties).filter(([k]) => k !== "DELIVER_AT" && k !== "RELEASED_AT")]),
    h("h2", {}, "Body"), h("pre", { class: "body" }, bodyText(m)),
    h("h2", {}, "Groups"), table(["group", "state", { label: "delivery attempt", num: true }],
      t.groups.map((g) => [g.group, h("span", { class: `badge ${g.state === "acked" ? "ok" : g.state === "inflight" ? "warn" : ""}` }, g.state),
        g.delivery_attempt ?? "—"]), "No group receives from this topic yet."));
  }
  parts.push(h("h2", {}, "Stored records"), table(["topic", { label: "queue", num: true }, { label: "offset", num: true }, "stored"],
    t.records.map((r) => [r.topic, r.queue_id, r.queue_offset, when(r.stored_at)]), "Not stored in a topic yet."));
  show(...parts);
}

async function pageGroups() {
  const { groups } = await api("GET", "/v1/groups");
  const rows = groups.map((g) => [
    g.name, g.fifo ? "FIFO" : "concurrent", num(g.max_attempts),
    h("span", {}, g.topics.map((t) => h("span", {}, link(`#/groups/${enc(g.name)}/${enc(t.topic)}`, t.topic), ` (lag ${num(t.lag)}) `))),
    g.dlq_messages ? link(topicHref(g.dlq_topic), num(g.dlq_messages)) : "0",
    h("button", { class: "danger", onclick: () => deleteGroup(g.name) }, "Delete")]);
  const form = h("form", { class: "inline", id: "create-group", onsubmit: (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    act(async () => { await api("POST", "/v1/groups", { name: v.name, fifo: v.fifo === "on" }); return `group ${v.name} created`; },
      pageGroups, e.target);
  } }, h("label", {}, "Name", h("input", { name: "name", required: true })),
  h("label", {}, "FIFO", h("input", { name: "fifo", type: "checkbox" })), h("button", { type: "submit" }, "Create group"));
  show(h("h1", {}, "Groups"), form,
    table(["group", "kind", { label: "max attempts", num: true }, "topics (lag)", { label: "DLQ", num: true }, ""], rows, "No groups yet."));
}

function deleteGroup(name) {
  if (!confirm(`Delete group ${name}? Its offsets are forgotten; its messages stay.`)) return;
  act(async () => { await api("DELETE", `/v1/groups/${enc(name)}`); return `group ${name} deleted`; },
    () => { location.hash = "#/groups"; return route(); });
}

async function pageGroup(group, topic) {
  const base = `/v1/topics/${enc(topic)}/groups/${enc(group)}`;
  const [s, inflight, { groups }] = await Promise.all([
    api("GET", base), api("GET", `${base}/inflight?limit=100`), api("GET", "/v1/groups")]);
  const dead = (groups.find((g) => g.name === group) || {}).dlq_messages || 0;
  const reset = h("form", { class: "inline", id: "reset", onsubmit: (e) => {
    e.preventDefault();
    const v = formValues(e.target);
    const ts = v.at ? Date.parse(v.at + "Z") : Date.now();
    if (!confirm(`Reset ${group} on ${topic} to ${when(ts)}? Deliveries out now lose their receipts.`)) return;
    act(async () => { await api("POST", `${base}/reset`, { timestamp: ts }); return `${group} reset to ${when(ts)}`; },
      () => pageGroup(group, topic), e.target);
  } }, h("label", {}, "Reset to time (UTC; empty: now)", h("input", { name: "at", type: "datetime-local", step: 1 })),
  h("button", { type: "submit", class: "danger" }, "Reset offsets"));
  show(h("h1", {}, `Group ${group} on ${topic}`),
    h("div", { class: "cards" }, card("Lag", num(s.lag), "group-lag"), card("In flight", num(s.inflight), "group-inflight"),
      card("Kind", s.fifo ? "FIFO" : "concurrent"), card("Max attempts", num(s.max_attempts))),
    h("h2", {}, "Queues"),
    table(["topic", { label: "queue", num: true }, { label: "min", num: true }, { label: "committed", num: true },
      { label: "max", num: true }, { label: "in flight", num: true }, { label: "lag", num: true }],
    s.queues.map((q) => [q.topic, q.queue_id, num(q.min_offset), num(q.committed_offset), num(q.max_offset), num(q.inflight), num(q.lag)])),
    h("h2", {}, "In flight"),
    messagesTable(inflight.messages, { headers: [{ label: "attempt", num: true }, "invisible until"],
      cells: (m) => [m.delivery_attempt, m.redeliver_at ? `redelivery ${fromNow(m.redeliver_at)}` : fromNow(m.invisible_until)] }),
    h("h2", {}, "Replay"), reset,
    h("p", {}, dead ? link(topicHref(`%DLQ%${group}`), `Browse the ${num(dead)} dead letters`) : "No dead letters.", " · ",
      h("button", { class: "danger", onclick: () => deleteGroup(group) }, "Delete group")));
}

async function pageDelayed() {
  const t = await api("GET", "/v1/delay/timeline?limit=20");
  const lat = t.lateness.buckets.map((b) => ({ label: b.le === null ? "more" : b.le < 1 ? `≤${b.le * 1000}ms` : `≤${b.le}s`, value: b.count }));
  const result = h("div", { id: "delayed-result" });
  const lookup = h("form", { class: "inline", id: "delayed-lookup", onsubmit: (e) => {
    e.preventDefault();
    const id = formValues(e.target).id.trim();
    const op = e.submitter ? e.submitter.value : "get";
    act(async () => {
      let info;
      if (op === "cancel") {
        if (!confirm(`Cancel delayed message ${id}?`)) return null;
        info = await api("DELETE", `/v1/delayed/${id}`);
      } else if (op === "move") {
        const at = formValues(e.target).at;
        if (!at) throw new Error("give the new time");
        info = await api("PATCH", `/v1/delayed/${id}`, { deliver_at: Date.parse(at + "Z") });
      } else {
        info = await api("GET", `/v1/delayed/${id}`);
      }
      result.replaceChildren(props([["msg_id", link(messageHref(info.msg_id), info.msg_id)], ["topic", info.topic],
        ["state", h("span", { class: "badge", "data-state": info.state }, info.state)],
        ["deliver at", `${when(info.deliver_at)} (${fromNow(info.deliver_at)})`]]));
      return op === "get" ? null : `${id}: ${info.state}`;
    }, op === "get" ? null : refreshTimeline);
  } },
  h("label", {}, "Delayed message id", h("input", { name: "id", required: true, size: 34 })),
  h("label", {}, "New time (UTC)", h("input", { name: "at", type: "datetime-local", step: 1 })),
  h("button", { type: "submit", value: "get", class: "secondary" }, "Look up"),
  h("button", { type: "submit", value: "move", class: "secondary" }, "Reschedule"),
  h("button", { type: "submit", value: "cancel", class: "danger" }, "Cancel"));
  const timeline = h("div", { id: "timeline" });
  async function refreshTimeline() {
    const x = await api("GET", "/v1/delay/timeline?limit=20");
    await released();  // its Cancel buttons are rebuilt: never between a click's press and release
    keepFocus(timeline, () => timeline.replaceChildren(
      h("p", {}, `${num(x.pending)} pending`),
      barChart(x.buckets.map((b) => ({ label: b.label, value: b.count, color: b.label === "overdue" ? "#c23b3b" : "#2f6fd6" }))),
      h("h2", {}, "Next due"),
      table(["msg_id", "topic", "keys", "deliver at", ""], x.next.map((d) => [
        h("code", {}, link(messageHref(d.msg_id), d.msg_id)), d.topic, d.keys.join(", "), `${when(d.deliver_at)} (${fromNow(d.deliver_at)})`,
        h("button", { class: "danger", onclick: () => {
          if (!confirm(`Cancel delayed message ${d.msg_id}?`)) return;
          act(async () => { await api("DELETE", `/v1/delayed/${d.msg_id}`); return `${d.msg_id} cancelled`; }, refreshTimeline);
        }, "data-focus": `cancel ${d.msg_id}` }, "Cancel")]), "Nothing scheduled.")));
  }
  // The form first: the timeline below it changes every few seconds (see pageTopic).
  show(h("h1", {}, "Delayed messages"),
    h("h2", {}, "Look up, reschedule or cancel"), lookup, result, h("h2", {}, "What falls due"), timeline,
    h("h2", {}, `Release lateness (${num(t.lateness.count)} released by this server)`), barChart(lat, { height: 160 }));
  every(3000, () => refreshTimeline().catch((e) => flash(e.message, true)));
}

const TX_STATES = [["prepared", "Prepared / checking"], ["check_max", "Parked"], ["committed", "Committed"], ["rolled_back", "Rolled back"]];

async function pageTransactions(params) {
  const state = params.get("state") || "check_max";
  const q = new URLSearchParams({ state, limit: 100 });
  if (params.get("after")) q.set("after", params.get("after"));
  const [{ transactions, next }, counts] = await Promise.all([
    api("GET", `/v1/transactions?${q}`), api("GET", "/v1/overview").then((o) => o.transactions)]);
  const tabs = h("div", { class: "tabs" }, TX_STATES.map(([s, label]) =>
    h("a", { href: `#/transactions?state=${s}`, class: s === state ? "active" : null }, `${label} (${num(counts[s])})`)));
  const open = state === "prepared" || state === "check_max";
  const rows = transactions.map((t) => {
    const history = h("div", {});
    const showChecks = h("button", { class: "secondary", onclick: () => act(async () => {
      const d = await api("GET", `/v1/transactions/${enc(t.tx_id)}/checks`);
      history.replaceChildren(table(["asked at", "answer", "answered by"], d.checks.map((c) => [when(c.at), c.answer, c.via]), "No check-back yet."));
    }) }, `Checks (${t.check_count})`);
    const end = (verb) => h("button", { class: verb === "commit" ? null : "danger", onclick: () => {
      if (!confirm(`${verb === "commit" ? "Commit" : "Roll back"} transaction ${t.tx_id}?`)) return;
      act(async () => { const r = await api("POST", `/v1/transactions/${enc(t.tx_id)}/${verb}`); return `${t.tx_id}: ${r.state}`; },
        () => pageTransactions(params));
    } }, verb === "commit" ? "Commit" : "Roll back");
    return [h("code", {}, t.tx_id), link(messageHref(t.msg_id), t.msg_id.slice(0, 12) + "…"), t.topic, t.producer_group,
      t.state === "prepared" && t.check_count ? h("span", { class: "badge warn" }, "checking") : h("span", { class: "badge" }, t.state),
      when(t.created_at), h("div", {}, showChecks, " ", open ? [end("commit"), " ", end("rollback")] : null, history)];
  });
  show(h("h1", {}, "Transactions"), tabs,
    table(["tx_id", "msg_id", "topic", "producer group", "state", "created", ""], rows, "No transactions in this state."),
    ...(next ? [h("p", {}, link(`#/transactions?state=${state}&after=${enc(next)}`, "Next page →"))] : []));
}

async function pageServers() {
  const body = h("div", { id: "servers" });
  show(h("h1", {}, "Delay servers"), body);
  async function refresh() {
    const s = await api("GET", "/v1/delay/servers");
    if (s.store !== "redis") {
      body.replaceChildren(h("p", { class: "empty" }, "This server keeps delayed messages in its embedded store: no other server shares them. With --redis-url, delay servers sharing one Redis split its shards through leases, shown here."));
      return;
    }
    body.replaceChildren(
      h("h2", {}, "Servers"), table(["server", { label: "shards", num: true }, "heartbeat until"],
        s.servers.map((x) => [h("span", {}, x.server, x.server === s.this_server ? h("span", { class: "badge ok" }, " this one") : null),
          num(x.shards), `${when(x.expires_at)} (${fromNow(x.expires_at)})`])),
      h("h2", {}, "Shards"), table([{ label: "shard", num: true }, "lease holder", "lease expires"],
        s.shards.map((x) => [x.shard, x.holder || h("span", { class: "bad" }, "free"), x.expires_at ? fromNow(x.expires_at) : "—"])));
  }
  every(2000, () => refresh().catch((e) => flash(e.message, true)));
}

// -- routing ---------------------------------------------------------------------------------

async function route() {
  pageTimers.forEach(clearInterval);
  pageTimers = [];
  const [path, query] = (location.hash.slice(1) || "/overview").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === parts[0]));
  document.getElementById("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  try {
    switch (parts[0]) {
      case "topics": return await (parts[1] ? pageTopic(parts[1], params) : pageTopics());
      case "messages": return await pageMessage(parts[1]);
      case "groups": return await (parts[2] ? pageGroup(parts[1], parts[2]) : pageGroups());
      case "delayed": return await pageDelayed();
      case "transactions": return await pageTransactions(params);
      case "servers": return await pageServers();
      default: return await pageOverview();
    }
  } catch (e) {
    show(h("h1", {}, "Error"), h("p", { class: "error", id: "page-error" }, e.message));
  }
}

window.addEventListener("hashchange", route);
route();
