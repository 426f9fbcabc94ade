// The Beckon console's pages. One page is shown at a time, chosen by the URL fragment
// (#/agents, #/calls/<id>, ...). Everything the API returns is put into the page with
// textContent, never as HTML.
import { api, ApiError, query } from "./api.js";
import { loadUsers, setUpUsers } from "./users.js";

const $ = (id) => document.getElementById(id);

/** Creates an element with attributes and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, "");
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return e;
}

function when(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  const ago = Math.round((Date.now() - ms) / 1000);
  const time = d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  if (ago >= 0 && ago < 60) return `${time} (${ago} s ago)`;
  return time;
}

function badge(state, text) {
  return el("span", { class: "badge", "data-state": state, "data-testid": "state" }, text ?? state);
}

function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  node.textContent = error instanceof Error ? error.message : String(error);
  node.hidden = false;
}

/** Runs `fn`; a lost session sends the user to the login page, other errors go to `node`. */
async function guarded(node, fn) {
  try {
    const r = await fn();
    if (node) showError(node, null);
    return r;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401 && state.view !== "login") {
      showLogin("Your session ended: log in again.");
      return undefined;
    }
    if (node) showError(node, e);
    else showError($("global-error"), e);
    return undefined;
  }
}

const state = {
  view: null,
  timer: null,
  events: null,
  // The call whose page is open.
  callId: null,
  agents: [],
  selected: new Set(),
  user: null,
  role: null,
  // Why a single sign-on failed: the console sends the browser back with ?sso_error=...
  loginMessage: new URLSearchParams(location.search).get("sso_error"),
};
// The message is shown once; reloading the page should not show it again.
if (state.loginMessage) history.replaceState(null, "", location.pathname + location.hash);

// What each role may do is what the one before it may, and more (the API enforces it; the
// pages show no control the role cannot use).
const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

/** Whether the logged-in caller has at least `role`. */
function can(role) {
  return (ROLE_RANK[state.role] ?? -1) >= ROLE_RANK[role];
}

/** Shows or hides every control marked `data-needs="ROLE"`, and locks the settings for
 * those who may not change them. */
function applyRole() {
  for (const node of document.querySelectorAll("[data-needs]")) node.hidden = !can(node.dataset.needs);
  for (const fs of document.querySelectorAll("#settings-form fieldset")) fs.disabled = !can("admin");
  document.body.dataset.role = state.role || "";
}

/** Reads who is logged in and with which role; false without a session. */
async function loadAccount() {
  const me = await api("GET", "/account");
  state.user = me.name.replace(/^user:/, "");
  state.role = me.role;
  $("who").textContent = `Logged in as ${state.user} (${state.role})`;
  applyRole();
}

function stopLive() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  if (state.events) state.events.close();
  state.events = null;
}

function show(view) {
  for (const s of document.querySelectorAll("main > section.view")) {
    s.hidden = s.id !== "view-" + view;
  }
  $("top").hidden = view === "login";
  const navView = view === "call" ? "calls" : view;
  for (const a of document.querySelectorAll(".top nav a")) {
    if (a.dataset.view === navView) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  state.view = view;
}

// --- Login ---

function showLogin(message) {
  stopLive();
  show("login");
  showError($("login-error"), message || null);
  $("login-password").value = "";
  $("login-password").focus();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("login-user").value.trim();
  const password = $("login-password").value;
  if (!user || !password) {
    showError($("login-error"), "Enter the user name and the password.");
    return;
  }
  $("login-submit").disabled = true;
  try {
    await api("POST", "/login", { user, password });
    await loadAccount();
    showError($("login-error"), null);
    $("login-password").value = "";
    if (!location.hash || location.hash === "#/login") location.hash = "#/dashboard";
    else route();
  } catch (e) {
    showError($("login-error"), e.status === 401
      ? "Wrong user name or password. Try again."
      : e.message);
    $("login-password").select();
  } finally {
    $("login-submit").disabled = false;
  }
});

$("logout").addEventListener("click", async () => {
  await guarded(null, () => api("POST", "/logout"));
  state.user = null;
  state.role = null;
  location.hash = "#/login";
});

// --- Dashboard ---

function stateCounts(counts) {
  const span = el("span", { class: "counts" });
  for (const [k, v] of Object.entries(counts || {})) span.append(badge(k, `${v} ${k}`));
  return span;
}

async function loadDashboard() {
  const err = $("global-error");
  const [status, online, offline, unknown, calls] = await Promise.all([
    guarded(err, () => api("GET", "/status")),
    guarded(err, () => api("GET", "/agents" + query({ presence: "online", limit: 1000 }))),
    guarded(err, () => api("GET", "/agents" + query({ presence: "offline", limit: 1000 }))),
    guarded(err, () => api("GET", "/agents" + query({ presence: "unknown", limit: 1000 }))),
    guarded(err, () => api("GET", "/calls" + query({ limit: 5 }))),
  ]);
  if (state.view !== "dashboard") return;
  const count = (list, fallback) => (list ? (list.length >= 1000 ? "1000+" : list.length) : fallback);
  $("dash-online").textContent = status ? status.agents_online : count(online, "?");
  $("dash-offline").textContent = count(offline, "?");
  $("dash-unknown").textContent = count(unknown, "?");
  if (status) {
    $("dash-stale").textContent = status.agents_stale ?? "?";
    $("dash-stale-label").textContent = `stale agents (not seen for ${status.stale_after_days} days)`;
  }
  if (status) {
    renderPush(status.push_service);
    renderDatabase(status.database);
  }
  if (calls) {
    const body = $("dash-calls").tBodies[0];
    body.replaceChildren(...calls.map(callRow(false)));
    $("dash-calls-empty").hidden = calls.length > 0;
  }
}

/** The store this console uses; when it is down, the API answers 503 and says so. */
function renderDatabase(db) {
  const line = $("database-line");
  line.hidden = !db;
  if (db) line.textContent = `Database: ${db.kind === "postgresql" ? "PostgreSQL" : "SQLite"}, ${db.url}`;
}

function renderPush(push) {
  const box = $("push-status");
  if (!push) {
    box.dataset.state = "unknown";
    $("push-summary").textContent = "The console did not report its push-service connection.";
    $("push-notice").hidden = true;
    return;
  }
  if (push.connected) {
    box.dataset.state = "connected";
    $("push-summary").textContent = `Connected to the push service since ${when(push.since)}.`;
    $("push-notice").hidden = true;
    return;
  }
  box.dataset.state = "down";
  $("push-summary").textContent = `Not connected since ${when(push.since)}. Wake-up calls stay queued until the console reconnects.`;
  // "Push service servers are not reachable: <why>": the notice as headline, the why below.
  const headline = "Push service servers are not reachable";
  const message = push.message || headline;
  const why = message.startsWith(headline) ? message.slice(headline.length).replace(/^[:\s]+/, "") : message;
  $("push-message").textContent = headline;
  $("push-why").textContent = why;
  $("push-why").hidden = !why;
  const diag = push.diagnosis;
  const paths = diag && Array.isArray(diag.paths) ? diag.paths : [];
  // The doctor's own advice, one line per failing step, when it ran; else a general hint.
  const fixes = [...new Set(paths.flatMap((p) => (p.steps || []).filter((st) => st.verdict === "fail" && st.fix).map((st) => st.fix)))];
  $("push-fix").replaceChildren(...(fixes.length
    ? [el("strong", {}, "Fix: "), el("ul", {}, fixes.map((f) => el("li", {}, f)))]
    : [pushFix(push, why)]));
  $("push-diagnosis-box").hidden = !diag;
  $("push-diagnosis").replaceChildren(...paths.map((p) => el("div", { class: "diag-path" },
    el("p", {}, badge(p.ok ? "online" : "offline", p.ok ? "works" : "fails"), " ", p.description || p.path || ""),
    el("ol", {}, (p.steps || []).map((st) => el("li", {},
      badge(st.verdict === "pass" ? "online" : st.verdict === "fail" ? "offline" : "queued", st.verdict),
      ` ${st.step}: ${st.detail || ""}`))))));
  if (diag && !paths.length) $("push-diagnosis").textContent = JSON.stringify(diag, null, 2);
  $("push-notice").hidden = false;
}

/** What to do about a push-service connection that is down, from its last error. */
function pushFix(push, shown) {
  const text = `${push.message || ""} ${push.last_error || ""}`.toLowerCase();
  const tail = push.last_error && !(shown || "").includes(push.last_error) ? ` Last error: ${push.last_error}.` : "";
  if (text.includes("not connected yet")) {
    return "The console is still connecting; this page refreshes by itself." + tail;
  }
  if (text.includes("certificate") || text.includes("tls")) {
    return "Fix: the broker's certificate is not trusted or names another host. Check --broker and --broker-ca of the console, then run `beckon doctor` from this machine." + tail;
  }
  if (text.includes("refused") || text.includes("timed out") || text.includes("unreachable") || text.includes("resolve")) {
    return "Fix: start the broker or open the path to it (ports 8883 and 443 from the console's machine; a firewall or proxy may block them), then run `beckon doctor` for a step-by-step diagnosis." + tail;
  }
  return "Fix: check that the broker runs and that the console's --broker address is right; `beckon doctor` diagnoses the path step by step." + tail;
}

// --- Calls ---

function callRow(withAuthor) {
  return (c) => el("tr", { "data-testid": "call-row", "data-call-id": c.id },
    el("td", {}, el("a", { href: "#/calls/" + encodeURIComponent(c.id) }, when(c.created_at))),
    el("td", {}, c.target),
    el("td", {}, c.reason || "–"),
    withAuthor ? el("td", {}, c.created_by) : null,
    el("td", {}, stateCounts(c.counts)));
}

async function loadCalls() {
  const calls = await guarded($("calls-error"), () => api("GET", "/calls" + query({ limit: 100 })));
  if (!calls || state.view !== "calls") return;
  $("calls-table").tBodies[0].replaceChildren(...calls.map(callRow(true)));
  $("calls-empty").hidden = calls.length > 0;
}

const STATE_RANK = { queued: 0, sent: 1, delivered: 2, started: 3, finished: 4, expired: 4, failed: 4 };

function deliveryRow(d) {
  const result = d.state === "finished"
    ? `${d.status ?? ""}${d.exit_code !== null && d.exit_code !== undefined ? " (exit " + d.exit_code + ")" : ""}${d.duration_ms !== null && d.duration_ms !== undefined ? ", " + d.duration_ms + " ms" : ""}`
    : (d.detail || "");
  return el("tr", { "data-testid": "delivery-row", "data-agent-id": d.agent_id, "data-state": d.state },
    el("td", { class: "mono" }, d.agent_id),
    el("td", { class: "delivery-state" }, badge(d.state)),
    el("td", {}, when(d.sent_at)),
    el("td", {}, when(d.delivered_at)),
    el("td", {}, when(d.finished_at)),
    el("td", {}, result || "–"));
}

function setDeliveryState(agentId, newState) {
  for (const row of $("call-deliveries").tBodies[0].rows) {
    if (row.dataset.agentId !== agentId) continue;
    if ((STATE_RANK[newState] ?? 0) < (STATE_RANK[row.dataset.state] ?? 0)) return;
    row.dataset.state = newState;
    row.cells[1].replaceChildren(badge(newState));
  }
}

// Reads of the call view are numbered: an answer older than one already shown is dropped.
let callReads = 0;
let callShown = 0;

// The page of deliveries shown: those in one state (or any), of agents after an id (the
// first page: none). A call's page of the API holds its first 500; the rest come a page at
// a time from /calls/<id>/deliveries.
const CALL_PAGE = 500;
const callPage = { state: "", after: null, pages: 0 };

async function loadCall(id) {
  const read = ++callReads;
  const path = "/calls/" + encodeURIComponent(id);
  const { state: only, after } = callPage;
  const [call, page] = await Promise.all([
    guarded($("call-error"), () => api("GET", path)),
    only || after
      ? guarded($("call-error"), () => api("GET", path + "/deliveries" + query({ state: only, after, limit: CALL_PAGE })))
      : Promise.resolve(null),
  ]);
  if (!call || (!page && (only || after)) || state.view !== "call" || read < callShown) return null;
  callShown = read;
  const shown = page || { deliveries: call.deliveries, next_after: call.next_after };
  // A large call is recorded a chunk at a time after it is made: its counts grow to targeted.
  const recorded = Object.values(call.counts).reduce((a, b) => a + b, 0);
  const facts = [
    ["Target", call.target],
    ["Agents", recorded < call.targeted ? `${call.targeted} (${recorded} recorded so far)` : `${call.targeted}`],
    ["Reason", call.reason || "–"], ["Action", call.action || "check in"],
    ["Created", `${when(call.created_at)} by ${call.created_by}`], ["Expires", when(call.expires_at)],
    ["Spread window", `${call.spread} s`],
  ];
  $("call-summary").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
    el("dt", {}, "States"), el("dd", { id: "call-counts" }, stateCounts(call.counts)));
  $("call-deliveries").tBodies[0].replaceChildren(...shown.deliveries.map(deliveryRow));
  const total = only ? (call.counts[only] || 0) : Object.values(call.counts).reduce((a, b) => a + b, 0);
  const first = callPage.pages * CALL_PAGE;
  $("call-page").textContent = shown.deliveries.length
    ? `Agents ${first + 1}–${first + shown.deliveries.length} of ${total}${only ? " " + only : ""}.`
    : (only ? `No agent is ${only}.` : "");
  $("call-first").hidden = !after;
  $("call-next").hidden = !shown.next_after;
  $("call-next").dataset.after = shown.next_after || "";
  return call;
}

function openCall(id) {
  show("call");
  state.callId = id;
  callPage.state = "";
  callPage.after = null;
  callPage.pages = 0;
  $("call-state").value = "";
  $("call-summary").replaceChildren();
  $("call-deliveries").tBodies[0].replaceChildren();
  $("call-page").textContent = "";
  $("call-first").hidden = true;
  $("call-next").hidden = true;
  // The call is read at once, and again each time the event stream is open (the server
  // listens by then): a change between the first read and the stream's start, or while it
  // reconnected, is not missed.
  const es = new EventSource("/api/v1/calls/" + encodeURIComponent(id) + "/events");
  state.events = es;
  let refresh = null;
  es.addEventListener("open", () => {
    $("call-live").textContent = "Live: states update as the agents answer.";
    loadCall(id);
  });
  es.addEventListener("error", () => {
    $("call-live").textContent = "Live updates interrupted; reconnecting…";
  });
  es.addEventListener("delivery", (ev) => {
    let d;
    try { d = JSON.parse(ev.data); } catch (e) { return; }
    setDeliveryState(d.agent_id, d.state);
    // The event carries the state only; fetch the details (times, result) shortly after.
    clearTimeout(refresh);
    refresh = setTimeout(() => loadCall(id), 300);
  });
  es.addEventListener("lagged", () => loadCall(id));
  loadCall(id);
}

$("call-filters").addEventListener("submit", (ev) => ev.preventDefault());
$("call-state").addEventListener("change", () => {
  callPage.state = $("call-state").value;
  callPage.after = null;
  callPage.pages = 0;
  if (state.callId) loadCall(state.callId);
});
$("call-next").addEventListener("click", (ev) => {
  ev.preventDefault();
  callPage.after = $("call-next").dataset.after || null;
  callPage.pages += 1;
  if (state.callId) loadCall(state.callId);
});
$("call-first").addEventListener("click", (ev) => {
  ev.preventDefault();
  callPage.after = null;
  callPage.pages = 0;
  if (state.callId) loadCall(state.callId);
});

// --- Agents ---

function filters() {
  return {
    search: $("agent-search").value.trim(),
    group: $("agent-group").value,
    presence: $("agent-presence").value,
    path: $("agent-path").value,
    stale: $("agent-stale").checked,
    cloned: $("agent-cloned").checked,
  };
}

async function loadGroups() {
  const groups = await guarded($("agents-error"), () => api("GET", "/groups"));
  if (!groups) return;
  const sel = $("agent-group");
  const keep = sel.value;
  sel.replaceChildren(el("option", { value: "" }, "All groups"),
    ...groups.map((g) => el("option", { value: g.name }, `${g.name} (${g.members})`)));
  sel.value = keep;
  $("group-names").replaceChildren(...groups.map((g) => el("option", { value: g.name })));
  state.groups = groups.map((g) => g.name);
}

async function loadAgents() {
  const f = filters();
  const agents = await guarded($("agents-error"), () =>
    api("GET", "/agents" + query({ search: f.search, group: f.group, presence: f.presence, stale: f.stale || undefined, cloned: f.cloned || undefined, limit: 1000 })));
  if (!agents || state.view !== "agents") return;
  // Path is not an API filter: the list is filtered here.
  const paths = new Set(agents.map((a) => a.path).filter(Boolean));
  const pathSel = $("agent-path");
  for (const p of paths) {
    if (![...pathSel.options].some((o) => o.value === p)) pathSel.append(el("option", { value: p }, p));
  }
  state.agents = f.path ? agents.filter((a) => a.path === f.path) : agents;
  const shown = new Set(state.agents.map((a) => a.id));
  for (const id of [...state.selected]) if (!shown.has(id)) state.selected.delete(id);
  renderAgents();
}

function renderAgents() {
  const body = $("agents-table").tBodies[0];
  const focused = document.activeElement && document.activeElement.dataset.agentId;
  body.replaceChildren(...state.agents.map((a) => {
    const box = el("input", {
      type: "checkbox", class: "agent-select", "data-agent-id": a.id,
      "aria-label": "Select " + a.name, "data-testid": "agent-select",
    });
    box.checked = state.selected.has(a.id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(a.id); else state.selected.delete(a.id);
      box.closest("tr").classList.toggle("selected", box.checked);
      updateSelection();
    });
    const addrs = (a.addresses || []).map((x) => `${x.address}/${x.prefix_len}`).join(", ");
    return el("tr", {
      "data-testid": "agent-row", "data-agent-id": a.id, "data-presence": a.presence,
      class: state.selected.has(a.id) ? "selected" : null,
    },
    el("td", {}, box),
    el("td", {}, el("strong", {}, a.name),
      a.cloned ? el("span", { class: "badge", "data-state": "cloned", "data-testid": "agent-cloned",
        title: "This identity is in use on two machines: see Cloned identities below" }, "cloned") : null,
      el("span", { class: "sub mono" }, a.id)),
    el("td", { class: "presence" }, badge(a.presence, a.presence === "unknown" ? "never connected" : a.presence),
      el("span", { class: "sub" }, a.presence_at ? when(a.presence_at) : "")),
    el("td", {}, a.path || "–"),
    el("td", {}, a.hostname || "–", el("span", { class: "sub" }, a.os || "")),
    el("td", { class: "mono" }, addrs || "–", el("span", { class: "sub" }, (a.macs || []).join(", "))),
    el("td", {}, (a.groups || []).join(", ") || "–"),
    el("td", {}, when(a.last_checkin)));
  }));
  if (focused) {
    const again = body.querySelector(`input[data-agent-id="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  $("agents-empty").hidden = state.agents.length > 0;
  renderClones();
  updateSelection();
}

/** The flagged agents of the list, each with both machines, the fix and (for admins) the
 * button that clears the flag once one machine enrolled again. */
function renderClones() {
  const cloned = state.agents.filter((a) => a.cloned);
  $("clones-panel").hidden = cloned.length === 0;
  const machine = (m) => el("li", {},
    el("strong", {}, m.hostname || "(no host name)"), " ", m.os || "",
    el("span", { class: "sub mono" }, [
      (m.addresses || []).map((x) => `${x.address}/${x.prefix_len}`).join(", "),
      (m.macs || []).join(", ")].filter(Boolean).join(" · ") || "no addresses reported"));
  $("clones-list").replaceChildren(...cloned.map((a) => {
    const clear = el("button", { type: "button", class: "secondary", "data-needs": "admin", "data-testid": "clone-clear" }, "Clear flag");
    clear.hidden = !can("admin");
    clear.addEventListener("click", async () => {
      const ok = await guarded($("agents-error"), () => api("DELETE", `/agents/${encodeURIComponent(a.id)}/clone`));
      if (ok) { $("agents-message").textContent = `Cloned flag of ${a.name} cleared.`; loadAgents(); }
    });
    return el("div", { class: "clone", "data-testid": "clone-entry", "data-agent-id": a.id },
      el("h3", {}, `${a.name} `, el("span", { class: "sub mono" }, a.id),
        el("span", { class: "sub" }, "noticed " + when(a.cloned.detected_at))),
      el("ul", { "data-testid": "clone-machines" }, ...a.cloned.machines.map(machine)),
      el("p", { "data-testid": "clone-fix" }, a.cloned.fix),
      clear);
  }));
}

function updateSelection() {
  const n = state.selected.size;
  $("agents-selected-count").textContent = `${n} selected`;
  for (const id of ["action-wake", "action-wol", "action-group", "action-revoke"]) $(id).disabled = n === 0;
  const all = $("agents-select-all");
  all.checked = n > 0 && n === state.agents.length;
  all.indeterminate = n > 0 && n < state.agents.length;
}

$("agents-select-all").addEventListener("change", (ev) => {
  state.selected = ev.target.checked ? new Set(state.agents.map((a) => a.id)) : new Set();
  renderAgents();
});

let searchDelay = null;
$("agent-search").addEventListener("input", () => {
  clearTimeout(searchDelay);
  searchDelay = setTimeout(loadAgents, 250);
});
for (const id of ["agent-group", "agent-presence", "agent-path", "agent-stale", "agent-cloned"]) {
  $(id).addEventListener("change", () => {
    const f = filters();
    const params = query({ presence: f.presence, group: f.group, path: f.path, stale: f.stale ? 1 : undefined, cloned: f.cloned ? 1 : undefined });
    history.replaceState(null, "", "#/agents" + params);
    loadAgents();
  });
}
$("agent-filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadAgents(); });

$("action-wake").addEventListener("click", async () => {
  const ids = [...state.selected];
  $("agents-message").textContent = "";
  const call = await guarded($("agents-error"), () => api("POST", "/calls", {
    target: { agents: ids }, reason: $("wake-reason").value.trim(),
    wake_on_lan: $("wake-with-wol").checked,
  }));
  if (call) location.hash = "#/calls/" + encodeURIComponent(call.id);
});

$("action-wol").addEventListener("click", async () => {
  const ids = [...state.selected];
  $("agents-message").textContent = "";
  showError($("agents-error"), null);
  const failures = [];
  let sent = 0;
  for (const id of ids) {
    try {
      const sends = await api("POST", `/agents/${encodeURIComponent(id)}/wol`);
      sent += sends.length;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) { showLogin("Your session ended: log in again."); return; }
      failures.push(`${id}: ${e.message}`);
    }
  }
  if (failures.length) showError($("agents-error"), "Wake-on-LAN not sent to " + failures.join("; "));
  if (sent) $("agents-message").textContent = `Wake-on-LAN: ${sent} send(s) recorded.`;
  await showWolHistory(ids);
});

async function showWolHistory(ids) {
  const rows = [];
  for (const id of ids) {
    const sends = await guarded($("agents-error"), () => api("GET", `/agents/${encodeURIComponent(id)}/wol`));
    if (sends) rows.push(...sends);
  }
  rows.sort((a, b) => b.at - a.at);
  $("wol-table").tBodies[0].replaceChildren(...rows.map((s) => el("tr", { "data-testid": "wol-row", "data-agent-id": s.agent_id },
    el("td", {}, when(s.at)), el("td", { class: "mono" }, s.agent_id), el("td", { class: "mono" }, s.mac),
    el("td", { class: "mono" }, s.via_agent ? `via agent ${s.via_agent} to ${s.destination}` : s.destination),
    el("td", {}, s.packets),
    el("td", {}, s.error ? el("span", { class: "error" }, s.error)
      : s.relay_state === "requested" ? "asked, no answer yet" : "sent"))));
  $("wol-panel").hidden = false;
}

$("action-group").addEventListener("click", async () => {
  const name = $("group-name").value.trim();
  $("agents-message").textContent = "";
  if (!name) {
    showError($("agents-error"), "Enter a group name to add the selected agents to.");
    $("group-name").focus();
    return;
  }
  // A new name makes the group first.
  if (!(state.groups || []).includes(name)) {
    const made = await guarded($("agents-error"), () => api("POST", "/groups", { name }));
    if (!made) return;
  }
  let added = 0;
  for (const a of state.agents.filter((x) => state.selected.has(x.id))) {
    if (a.groups.includes(name)) continue;
    const ok = await guarded($("agents-error"), () =>
      api("PATCH", `/agents/${encodeURIComponent(a.id)}`, { groups: [...a.groups, name] }));
    if (!ok) return;
    added += 1;
  }
  $("agents-message").textContent = `Added ${added} agent(s) to group ${name}.`;
  await loadGroups();
  loadAgents();
});

$("action-revoke").addEventListener("click", async () => {
  const ids = [...state.selected];
  if (!confirm(`Delete ${ids.length} agent(s)? Their certificates are revoked: the push service refuses them from then on, they can no longer check in and get no wake-ups; they must enroll again.`)) return;
  // One request per thousand agents (the API's limit), e.g. every stale agent at once.
  let removed = 0;
  for (let i = 0; i < ids.length; i += 1000) {
    const r = await guarded($("agents-error"), () => api("POST", "/agents/remove", { ids: ids.slice(i, i + 1000) }));
    if (!r) break;
    removed += r.removed.length;
    for (const id of [...r.removed, ...r.not_found]) state.selected.delete(id);
  }
  $("agents-message").textContent = `Deleted ${removed} agent(s).`;
  loadAgents();
});

function openAgents(params) {
  show("agents");
  state.selected = new Set();
  $("agents-message").textContent = "";
  $("wol-panel").hidden = true;
  $("agent-presence").value = params.get("presence") || "";
  const path = params.get("path") || "";
  if (path && ![...$("agent-path").options].some((o) => o.value === path)) {
    $("agent-path").append(el("option", { value: path }, path));
  }
  $("agent-path").value = path;
  $("agent-stale").checked = Boolean(params.get("stale"));
  $("agent-cloned").checked = Boolean(params.get("cloned"));
  guarded(null, () => api("GET", "/settings")).then((s) => {
    if (s) $("agent-stale-label").textContent = `Only agents not seen for ${s.agents.stale_after_days} days (stale)`;
  });
  loadGroups().then(() => { $("agent-group").value = params.get("group") || ""; loadAgents(); });
  state.timer = setInterval(loadAgents, 3000);
}

// --- Enrollment ---

async function loadTokens() {
  const tokens = await guarded($("tokens-error"), () => api("GET", "/enrollment-tokens"));
  if (!tokens || state.view !== "enroll") return;
  $("tokens-table").tBodies[0].replaceChildren(...tokens.map((t) => {
    const expired = t.expires_at !== null && t.expires_at < Date.now();
    const usedUp = t.max_uses !== null && t.uses >= t.max_uses;
    const st = t.revoked ? "revoked" : expired ? "expired" : usedUp ? "used up" : "valid";
    const revoke = el("button", { type: "button", class: "small danger", "aria-label": "Revoke token " + (t.label || t.id), hidden: !can("admin") }, "Revoke");
    revoke.disabled = st !== "valid";
    revoke.addEventListener("click", async () => {
      await guarded($("tokens-error"), () => api("DELETE", `/enrollment-tokens/${encodeURIComponent(t.id)}`));
      loadTokens();
    });
    return el("tr", { "data-testid": "token-row" },
      el("td", {}, t.label || "–"), el("td", {}, when(t.created_at)),
      el("td", {}, t.expires_at ? when(t.expires_at) : "never"),
      el("td", {}, `${t.uses} of ${t.max_uses ?? "∞"}`), el("td", {}, t.groups.join(", ") || "–"),
      el("td", {}, badge(st === "valid" ? "online" : "offline", st)), el("td", {}, revoke));
  }));
}

/** Quotes a word for a POSIX shell when it needs it. */
function shellWord(s) {
  return /^[A-Za-z0-9_.:\/=@%+-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\\''") + "'";
}

/** The console's URL for agents and the CA of its generated HTTPS certificate (see
 * `enrollment` in GET /status); this page's address when the status cannot be read. */
async function enrollmentHints() {
  try {
    return (await api("GET", "/status")).enrollment || {};
  } catch (_) {
    return {};
  }
}

/** The `agent enroll` command for `token`: the console's public URL (else this page's
 * address) and, when the console's certificate comes from its own CA, that CA written to a
 * file for `--ca`. */
function enrollCommand(token, hints) {
  const url = shellWord(hints.console_url || location.origin);
  const enroll = `beckon agent enroll --console ${url} --token ${shellWord(token)}`;
  if (!hints.console_ca) return enroll;
  return `cat > beckon-console-ca.pem <<'EOF'\n${hints.console_ca.trim()}\nEOF\n` +
    `${enroll} --ca beckon-console-ca.pem`;
}

$("enroll-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { label: $("enroll-label").value.trim() };
  const uses = $("enroll-max-uses").value.trim();
  const hours = $("enroll-expires").value.trim();
  const groups = $("enroll-groups").value.split(",").map((g) => g.trim()).filter(Boolean);
  if (uses !== "") {
    if (!/^\d+$/.test(uses)) { showError($("enroll-error"), "Uses must be a whole number (0: unlimited)."); $("enroll-max-uses").focus(); return; }
    body.max_uses = Number(uses);
  }
  if (hours !== "" && hours !== "0") {
    const h = Number(hours);
    if (!(h > 0)) { showError($("enroll-error"), "Expiry must be a positive number of hours (0 or empty: never)."); $("enroll-expires").focus(); return; }
    body.expires_in_secs = Math.round(h * 3600);
  }
  if (groups.length) body.groups = groups;
  $("enroll-create").disabled = true;
  try {
    const t = await guarded($("enroll-error"), () => api("POST", "/enrollment-tokens", body));
    if (!t) return;
    $("enroll-command").textContent = enrollCommand(t.token, await enrollmentHints());
    $("enroll-copy-status").textContent = "";
    $("enroll-result").hidden = false;
    $("enroll-copy").focus();
    loadTokens();
  } finally {
    $("enroll-create").disabled = false;
  }
});

/** Copies the text of `source` to the clipboard and says so in `status`; without clipboard
 * access (e.g. plain HTTP on another host) selects it for Ctrl+C instead. */
async function copyFrom(source, status) {
  try {
    await navigator.clipboard.writeText(source.textContent);
    status.textContent = "Copied.";
  } catch (e) {
    const range = document.createRange();
    range.selectNodeContents(source);
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    status.textContent = "Selected: press Ctrl+C to copy.";
  }
}

$("enroll-copy").addEventListener("click", () => copyFrom($("enroll-command"), $("enroll-copy-status")));

// --- API tokens ---

async function loadApiTokens() {
  const tokens = await guarded($("api-tokens-error"), () => api("GET", "/api-tokens"));
  if (!tokens || state.view !== "api-tokens") return;
  $("api-tokens-table").tBodies[0].replaceChildren(...tokens.map((t) => {
    const revoke = el("button", { type: "button", class: "small danger", "aria-label": "Revoke API token " + t.name, hidden: !can("admin") }, "Revoke");
    revoke.disabled = t.revoked;
    revoke.addEventListener("click", async () => {
      if (!confirm(`Revoke the API token "${t.name}"? Whatever uses it is refused from then on.`)) return;
      await guarded($("api-tokens-error"), () => api("DELETE", `/api-tokens/${encodeURIComponent(t.id)}`));
      loadApiTokens();
    });
    return el("tr", { "data-testid": "api-token-row", "data-token-id": t.id, "data-revoked": String(t.revoked) },
      el("td", {}, t.name), el("td", {}, t.role), el("td", {}, when(t.created_at)),
      el("td", {}, badge(t.revoked ? "offline" : "online", t.revoked ? "revoked" : "valid")), el("td", {}, revoke));
  }));
  $("api-tokens-empty").hidden = tokens.length > 0;
}

$("api-token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("api-token-name").value.trim();
  if (!name) {
    showError($("api-token-error"), "Enter a name: it says who made the calls this token makes.");
    $("api-token-name").focus();
    return;
  }
  $("api-token-create").disabled = true;
  try {
    const role = $("api-token-role").value;
    const t = await guarded($("api-token-error"), () => api("POST", "/api-tokens", { name, role }));
    if (!t) return;
    $("api-token-result-name").textContent = t.name;
    $("api-token-secret").textContent = t.token;
    $("api-token-copy-status").textContent = "";
    $("api-token-result").hidden = false;
    $("api-token-name").value = "";
    $("api-token-copy").focus();
    loadApiTokens();
  } finally {
    $("api-token-create").disabled = false;
  }
});

$("api-token-copy").addEventListener("click", () => copyFrom($("api-token-secret"), $("api-token-copy-status")));

// --- Settings ---

const lines = (text) => text.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);

function fillSettings(s) {
  $("set-wol-addresses").value = s.wol.addresses.join("\n");
  $("set-wol-subnet").checked = s.wol.subnet_broadcast;
  $("set-wol-relay").checked = s.wol.relay;
  $("set-wol-port").value = s.wol.port;
  $("set-wol-repeats").value = s.wol.repeats;
  $("set-wol-secureon").value = s.wol.secureon;
  $("set-wakeup-expiry").value = s.wakeup.default_expiry_secs;
  $("set-wakeup-spread").value = s.wakeup.spread_secs;
  $("set-wakeup-spread-from").value = s.wakeup.spread_from_agents;
  $("set-broker-endpoints").value = s.broker.endpoints.join("\n");
  $("set-proxy-url").value = s.proxy.url;
  $("set-proxy-direct").checked = s.proxy.direct_fallback;
  $("set-agents-stale").value = s.agents.stale_after_days;
}

function clearFieldErrors() {
  for (const p of document.querySelectorAll("#settings-form .field-error")) {
    p.hidden = true;
    p.textContent = "";
    const input = document.querySelector(`[aria-describedby~="${p.id}"]`);
    if (input) input.removeAttribute("aria-invalid");
  }
  showError($("settings-error"), null);
}

/** Shows an error next to its field: `field` as the API names it (`wol.addresses[1]`). */
function fieldError(field, message) {
  const base = field.replace(/\[\d+\]$/, "");
  const p = document.querySelector(`#settings-form .field-error[data-field="${CSS.escape(base)}"]`);
  if (!p) {
    showError($("settings-error"), message);
    return;
  }
  p.textContent = message;
  p.hidden = false;
  const input = document.querySelector(`[aria-describedby~="${p.id}"]`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

function integer(id, field) {
  const v = $(id).value.trim();
  if (!/^\d+$/.test(v)) throw { field, message: "Enter a whole number." };
  return Number(v);
}

async function loadSettings() {
  clearFieldErrors();
  $("settings-message").textContent = "";
  const s = await guarded($("settings-error"), () => api("GET", "/settings"));
  if (s && state.view === "settings") fillSettings(s);
}

$("settings-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearFieldErrors();
  $("settings-message").textContent = "";
  let body;
  try {
    body = {
      wol: {
        addresses: lines($("set-wol-addresses").value),
        subnet_broadcast: $("set-wol-subnet").checked,
        relay: $("set-wol-relay").checked,
        port: integer("set-wol-port", "wol.port"),
        repeats: integer("set-wol-repeats", "wol.repeats"),
        secureon: $("set-wol-secureon").value.trim(),
      },
      wakeup: {
        default_expiry_secs: integer("set-wakeup-expiry", "wakeup.default_expiry_secs"),
        spread_secs: integer("set-wakeup-spread", "wakeup.spread_secs"),
        spread_from_agents: integer("set-wakeup-spread-from", "wakeup.spread_from_agents"),
      },
      broker: { endpoints: lines($("set-broker-endpoints").value) },
      proxy: { url: $("set-proxy-url").value.trim(), direct_fallback: $("set-proxy-direct").checked },
      agents: { stale_after_days: integer("set-agents-stale", "agents.stale_after_days") },
    };
  } catch (e) {
    fieldError(e.field, e.message);
    return;
  }
  $("settings-save").disabled = true;
  try {
    const saved = await api("PUT", "/settings", body);
    fillSettings(saved);
    $("settings-message").textContent = "Settings saved.";
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) { showLogin("Your session ended: log in again."); return; }
    // "setting wol.addresses[0]: ..." names the field; other refusals (e.g. an address that
    // is not an IP literal fails JSON parsing) are matched by the field they mention.
    const m = /^setting ([a-z_.]+(?:\[\d+\])?): (.*)$/s.exec(e.message);
    // Values that do not even parse: "...: wol.addresses[1]: invalid IP address syntax at line 1 column 40".
    const parse = /: ([a-z_]+\.[a-z_]+)(?:\[(\d+)\])?: (.+?)(?: at line \d+ column \d+)?$/s.exec(e.message);
    if (m) fieldError(m[1], m[2]);
    else if (parse) {
      const [, field, index, reason] = parse;
      const list = field === "wol.addresses" ? body.wol.addresses : field === "broker.endpoints" ? body.broker.endpoints : null;
      const which = index !== undefined && list ? `line ${Number(index) + 1} (${JSON.stringify(list[Number(index)])}): ` : "";
      fieldError(field, which + reason);
    } else {
      const named = ["wol.addresses", "wol.secureon", "wol.port", "wol.repeats", "wakeup.default_expiry_secs",
        "wakeup.spread_secs", "wakeup.spread_from_agents", "broker.endpoints", "proxy.url", "agents.stale_after_days"]
        .find((f) => e.message.includes(f));
      if (named) fieldError(named, e.message);
      else if (/IP address|invalid IP/i.test(e.message)) fieldError("wol.addresses", e.message);
      else showError($("settings-error"), e);
    }
  } finally {
    $("settings-save").disabled = false;
  }
});

// --- Routing ---

async function route() {
  stopLive();
  showError($("global-error"), null);
  const hash = location.hash || "#/dashboard";
  const [path, q] = hash.slice(1).split("?");
  const params = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "login") {
    showLogin(state.loginMessage);
    state.loginMessage = null;
    return;
  }
  // Is the session still valid, and with which role? The account call answers 401 when not.
  if (!state.role) {
    try {
      await loadAccount();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) { showLogin(); return; }
      showError($("global-error"), e);
    }
  }
  switch (parts[0]) {
    case "agents":
      openAgents(params);
      break;
    case "calls":
      if (parts[1]) openCall(decodeURIComponent(parts[1]));
      else { show("calls"); loadCalls(); state.timer = setInterval(loadCalls, 5000); }
      break;
    case "enroll":
      show("enroll");
      loadTokens();
      break;
    case "api-tokens":
      show("api-tokens");
      // The secret of a token made earlier is not shown again.
      $("api-token-result").hidden = true;
      $("api-token-secret").textContent = "";
      loadApiTokens();
      break;
    case "users":
      show("users");
      loadUsers();
      break;
    case "settings":
      show("settings");
      loadSettings();
      break;
    default:
      show("dashboard");
      loadDashboard();
      state.timer = setInterval(loadDashboard, 3000);
  }
  const h1 = document.querySelector("main > section.view:not([hidden]) h1");
  if (h1 && document.activeElement === document.body) h1.setAttribute("tabindex", "-1");
}

/** Offers "Sign in with <provider>" when single sign-on is configured. */
async function loadSignOn() {
  try {
    const info = await api("GET", "/oidc");
    $("sso-name").textContent = info.provider || "";
    $("sso").hidden = !info.enabled;
  } catch (e) {
    // The password form still works; the button stays hidden.
  }
}

setUpUsers({ guarded, when, el });
window.addEventListener("hashchange", route);
loadSignOn();
route();
