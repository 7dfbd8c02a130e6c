// Flotilla dashboard: job list, job detail with live logs, submit form, nodes.
// Vanilla JS, no dependencies, no build step. The page is a client of the HTTP API like any
// other: it sends the key the user typed (kept in localStorage) as `Authorization: Bearer`.
// Every piece of text from the API reaches the DOM through text nodes, never as HTML.
"use strict";

const KEY_STORAGE = "flotilla.apiKey";
const AGENT_STORAGE = "flotilla.agentId";
const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
// Nodes have no change stream: their view polls.
const NODES_POLL_MS = 2000;
// With `/jobs/events` pushing job changes, polling them is only a safety net.
const SAFETY_POLL_MS = 15000;

// ---------------------------------------------------------------------------------------------
// DOM and formatting helpers

/** `h("td", {class: "num"}, "text", childNode)`. Attribute names are always literals here. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function statusBadge(status, id) {
  const known = STATUSES.includes(status) ? status : "";
  return h("span", { class: `status ${known}`, id }, status || "?");
}

function jobHref(jobId) {
  return `#/jobs/${encodeURIComponent(jobId)}`;
}

function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** How long the job ran, or has been running. */
function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return end - new Date(job.started_at);
}

function orDash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/** A promise resolved after `ms`, or at once when `signal` aborts. */
function delay(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// ---------------------------------------------------------------------------------------------
// API access

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.field = error.field;
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** JSON request; errors come back as `ApiError` with the envelope's code, message and field. */
async function api(method, path, body, signal) {
  const init = { method, headers: authHeaders(), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) {
    if (response.status === 401) keyNeeded();
    const error = data && data.error ? data.error : { code: "http", message: `HTTP ${response.status}` };
    throw new ApiError(response.status, error);
  }
  return data;
}

/**
 * Follows a server-sent event stream with fetch() rather than EventSource, because EventSource
 * cannot send the Authorization header. Reconnects (with `Last-Event-ID` when events carry ids)
 * if the stream drops before an `end` event. Calls `onEvent(name, data)` for each event and
 * `onState(text)` as the connection comes and goes.
 */
async function followSse(path, onEvent, onState, signal) {
  let lastId = null;
  while (!signal.aborted) {
    const headers = authHeaders();
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(path, { headers, signal });
      if (!response.ok) {
        if (response.status === 401) keyNeeded();
        onState(`cannot follow (HTTP ${response.status})`);
        return;
      }
      onState("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let event = { name: "message", data: [], id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line === "") {
            // A blank line ends an event (SSE framing); comments and keep-alives carry no data.
            if (event.data.length > 0) {
              if (event.id !== null) lastId = event.id;
              const data = JSON.parse(event.data.join("\n"));
              onEvent(event.name, data);
              if (event.name === "end") return;
            }
            event = { name: "message", data: [], id: null };
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const fieldValue = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") event.name = fieldValue;
            else if (field === "data") event.data.push(fieldValue);
            else if (field === "id") event.id = fieldValue;
          }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      onState(`connection lost (${e.message}); reconnecting`);
    }
    // The stream closed without `end`: the gateway restarted or the network dropped.
    await delay(2000, signal);
  }
}

/** A job's output (`GET /jobs/{id}/logs`), until its `end` event. */
function followLogs(jobId, onEvent, onState, signal) {
  const state = (text) => onState(text === "live" ? "following live output" : text);
  return followSse(`/jobs/${encodeURIComponent(jobId)}/logs`, onEvent, state, signal);
}

/**
 * Calls `onChange(name, data)` for every change `GET /jobs/events?query` pushes, and `onOpen()`
 * each time the stream (re)connects: changes made while it was down are not replayed, so the
 * caller reloads then.
 */
function followJobEvents(query, onChange, onOpen, signal) {
  const path = query ? `/jobs/events?${query}` : "/jobs/events";
  return followSse(path, onChange, (state) => { if (state === "live") onOpen(); }, signal);
}

// ---------------------------------------------------------------------------------------------
// Shell: API key, notice, health, routing

const notice = document.getElementById("notice");

function showNotice(text) {
  notice.textContent = text;
  notice.hidden = false;
}

function keyNeeded() {
  const stored = localStorage.getItem(KEY_STORAGE);
  showNotice(stored
    ? "The API key was refused. Enter the right key at the top right."
    : "This gateway needs an API key. Enter it at the top right.");
  document.getElementById("key-form").classList.add("needed");
}

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const refresh = () => {
    input.placeholder = localStorage.getItem(KEY_STORAGE) ? "API key (saved)" : "API key";
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    input.value = "";
    form.classList.remove("needed");
    notice.hidden = true;
    refresh();
    route();
  });
  document.getElementById("api-key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    refresh();
    route();
  });
  refresh();
}

async function pollHealth() {
  const el = document.getElementById("health");
  for (;;) {
    try {
      const response = await fetch("/health");
      const body = await response.json();
      el.className = `health ${body.status === "ok" ? "ok" : "degraded"}`;
      el.textContent = `${body.status} · ${body.checks.nodes} · ${body.checks.pool}`;
    } catch {
      el.className = "health degraded";
      el.textContent = "gateway unreachable";
    }
    await new Promise((resolve) => setTimeout(resolve, 5000));
  }
}

let currentView = null;

/** Renders the view named by the URL fragment: #/jobs, #/jobs/<id>, #/submit, #/nodes. */
function route() {
  if (currentView) currentView.abort();
  currentView = new AbortController();
  const signal = currentView.signal;
  const fragment = location.hash.replace(/^#\/?/, "");
  const [path, query] = fragment.split("?");
  const parts = path.split("/").filter(Boolean).map((part) => {
    try { return decodeURIComponent(part); } catch { return part; }
  });
  const view = document.getElementById("view");
  view.replaceChildren();
  let name = parts[0] || "jobs";
  if (name === "jobs" && parts[1]) {
    jobView(view, parts[1], signal);
  } else if (name === "groups" && parts[1]) {
    name = "jobs";
    groupView(view, parts[1], signal);
  } else if (name === "submit") {
    submitView(view, signal);
  } else if (name === "nodes") {
    nodesView(view, signal);
  } else {
    name = "jobs";
    jobsView(view, new URLSearchParams(query || ""), signal);
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === name);
  }
}

/** Runs `tick` now and every `ms` until `signal` aborts; a failure is shown, then retried. */
async function poll(tick, ms, signal, onError) {
  while (!signal.aborted) {
    try {
      await tick();
      onError(null);
    } catch (e) {
      if (signal.aborted) return;
      onError(e);
    }
    await delay(ms, signal);
  }
}

function errorLine() {
  const el = h("p", { class: "error", hidden: true });
  const show = (e) => {
    el.hidden = !e;
    el.textContent = e ? e.message : "";
  };
  return [el, show];
}

// ---------------------------------------------------------------------------------------------
// Job list

function jobsView(root, params, signal) {
  const filters = {
    status: params.get("status") || "",
    agent_id: params.get("agent_id") || "",
    engine: params.get("engine") || "",
    profile: params.get("profile") || "",
  };
  let offset = Number(params.get("offset")) || 0;
  const limit = 50;
  const [error, showError] = errorLine();

  const statusSelect = h("select", { id: "filter-status" },
    h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const agentInput = h("input", { id: "filter-agent", value: filters.agent_id, placeholder: "any" });
  const engineInput = h("input", { id: "filter-engine", value: filters.engine, placeholder: "any", list: "engine-ids" });
  const profileInput = h("input", { id: "filter-profile", value: filters.profile, placeholder: "any", list: "profile-names" });
  const engineIds = h("datalist", { id: "engine-ids" });
  const profileNames = h("datalist", { id: "profile-names" });
  const tbody = h("tbody");
  const summary = h("span", { class: "muted" });
  const prev = h("button", { type: "button" }, "← Newer");
  const next = h("button", { type: "button" }, "Older →");

  root.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" },
      h("label", {}, "Status", statusSelect),
      h("label", {}, "Agent", agentInput),
      h("label", {}, "Engine", engineInput),
      h("label", {}, "Profile", profileInput),
      engineIds, profileNames),
    error,
    h("table", { id: "jobs-table" },
      h("thead", {}, h("tr", {},
        ["Job", "Status", "Agent", "Engine", "Profile", "Created", "Duration", "Node", "Exit"]
          .map((title) => h("th", {}, title)))),
      tbody),
    h("div", { class: "pager" }, prev, next, summary));

  // Suggestions for the engine and profile filters; the list works without them.
  api("GET", "/engines", undefined, signal)
    .then((body) => engineIds.replaceChildren(...body.engines.map((e) => h("option", { value: e.id }))))
    .catch(() => {});
  api("GET", "/profiles", undefined, signal)
    .then((body) => profileNames.replaceChildren(...body.profiles.map((p) => h("option", { value: p.name }))))
    .catch(() => {});

  let generation = 0;
  const load = async () => {
    // A filter change and the poll may both be in flight: only the latest request may draw.
    const mine = ++generation;
    const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
    const body = await api("GET", `/jobs?${query}`, undefined, signal);
    if (signal.aborted || mine !== generation) return;
    tbody.replaceChildren(...body.jobs.map(jobRow));
    if (body.jobs.length === 0) {
      tbody.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No jobs match.")));
    }
    const first = body.total === 0 ? 0 : offset + 1;
    summary.textContent = `${first}–${offset + body.jobs.length} of ${body.total}`;
    prev.disabled = offset === 0;
    next.disabled = offset + body.jobs.length >= body.total;
  };

  // Live: a change of a matching job reloads the page, coalesced; the stream follows the filters.
  let reloadQueued = false;
  const reloadSoon = () => {
    if (reloadQueued) return;
    reloadQueued = true;
    setTimeout(() => { reloadQueued = false; load().catch(showError); }, 200);
  };
  let live = null;
  const follow = () => {
    if (live) live.abort();
    live = new AbortController();
    signal.addEventListener("abort", () => live.abort(), { once: true });
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
    followJobEvents(query.toString(), reloadSoon, reloadSoon, live.signal);
  };

  // Filters live in the fragment (so a reload keeps them), replaced without a hashchange so the
  // inputs keep focus while the user types.
  const changed = () => {
    filters.status = statusSelect.value;
    filters.agent_id = agentInput.value.trim();
    filters.engine = engineInput.value.trim();
    filters.profile = profileInput.value.trim();
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
    if (offset) query.set("offset", String(offset));
    const text = query.toString();
    history.replaceState(null, "", text ? `#/jobs?${text}` : "#/jobs");
    load().catch(showError);
    follow();
  };
  statusSelect.addEventListener("change", () => { offset = 0; changed(); });
  for (const input of [agentInput, engineInput, profileInput]) {
    input.addEventListener("input", () => { offset = 0; changed(); });
  }
  prev.addEventListener("click", () => { offset = Math.max(0, offset - limit); changed(); });
  next.addEventListener("click", () => { offset += limit; changed(); });

  follow();
  poll(load, SAFETY_POLL_MS, signal, showError);
}

function jobRow(job) {
  return h("tr", { "data-job-id": job.job_id },
    h("td", {}, h("a", { href: jobHref(job.job_id), class: "mono" }, job.job_id)),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, job.agent_id),
    h("td", {}, job.engine),
    h("td", {}, job.profile),
    h("td", {}, fmtTime(job.created_at)),
    h("td", { class: "num" }, fmtDuration(jobDuration(job))),
    h("td", { class: "mono nowrap" }, orDash(job.node_id)),
    h("td", { class: "num" }, orDash(job.exit_code)));
}

// ---------------------------------------------------------------------------------------------
// Job detail

function jobView(root, jobId, signal) {
  const [error, showError] = errorLine();
  const badge = h("span", { id: "job-status" });
  const cancel = h("button", { id: "job-cancel", type: "button", class: "danger", disabled: true }, "Cancel");
  const fields = h("dl", { class: "fields", id: "job-fields" });
  const result = h("div", { id: "job-result" });
  const change = h("div", { id: "job-change" });
  const attempts = h("div", { id: "job-attempts" });
  const log = h("pre", { class: "log", id: "log" });
  const logState = h("span", { class: "log-state", id: "log-state" }, "connecting");

  root.append(
    h("h1", {}, h("span", { class: "mono" }, jobId), badge, cancel),
    error,
    h("div", { class: "panel" }, fields),
    h("h2", {}, "Output ", logState),
    log,
    result,
    change,
    attempts);

  let lastJson = "";
  let job = null;
  const render = (record) => {
    job = record;
    badge.replaceChildren(statusBadge(record.status));
    cancel.disabled = TERMINAL.has(record.status);
    // Redraw only on change, so a selection in the page survives the polling.
    const json = JSON.stringify(record);
    if (json === lastJson) return;
    lastJson = json;
    fields.replaceChildren(...jobFields(record));
    result.replaceChildren(...resultSection(record));
    change.replaceChildren(...changeSection(record));
    attempts.replaceChildren(...attemptsSection(record));
  };
  const load = async () => render(await api("GET", `/jobs/${encodeURIComponent(jobId)}`, undefined, signal));

  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${jobId}?`)) return;
    cancel.disabled = true;
    try {
      await api("DELETE", `/jobs/${encodeURIComponent(jobId)}`, undefined, signal);
      await load();
    } catch (e) {
      showError(e);
      if (job) cancel.disabled = TERMINAL.has(job.status);
    }
  });

  // The record as it changes (pushed), read again whenever the stream (re)connects, and
  // after the job ends too: a cancelled job gets its output a moment later.
  followJobEvents(`job_id=${encodeURIComponent(jobId)}`,
    (name, data) => { if (name === "job") render(data); else load().catch(showError); },
    () => load().catch(showError), signal);
  poll(load, SAFETY_POLL_MS, signal, showError);

  // Stick to the bottom of the log unless the user scrolled up to read.
  const append = (text, stream) => {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    log.append(stream === "stdout" ? document.createTextNode(text) : h("span", { class: stream }, text));
    if (atBottom) log.scrollTop = log.scrollHeight;
  };
  const onEvent = (name, data) => {
    if (name === "log") {
      append(data.data, data.stream);
    } else if (name === "end") {
      logState.textContent = `ended: ${data.status}${data.exit_code === null ? "" : ` (exit ${data.exit_code})`}`;
      if (data.error) append(`\n${data.error}\n`, "system");
      load().catch(showError);
    }
  };
  followLogs(jobId, onEvent, (state) => { logState.textContent = state; }, signal);
}

function jobFields(job) {
  const rows = [
    ["Agent", job.agent_id],
    ["Engine", job.engine],
    ["Profile", job.profile],
    ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)],
    ["Duration", fmtDuration(jobDuration(job))],
    ["Node", orDash(job.node_id)],
    ["Attempt", orDash(job.attempt)],
    ["Exit code", orDash(job.exit_code)],
    ["Error", orDash(job.error)],
    ["Dry run", job.dry_run ? "yes" : "no"],
    ["Timeout", job.timeout_seconds ? `${job.timeout_seconds} s` : "—"],
  ];
  if (job.usage) {
    const u = job.usage;
    rows.push(["Usage", `${u.input_tokens} in / ${u.output_tokens} out tokens, $${Number(u.cost_usd).toFixed(4)}`]);
  }
  const metadata = Object.entries(job.metadata || {});
  if (metadata.length) rows.push(["Metadata", metadata.map(([k, v]) => `${k}=${v}`).join(", ")]);
  return rows.flatMap(([name, value]) => [h("dt", {}, name), h("dd", { class: name === "Error" && job.error ? "error" : null }, value)]);
}

function resultSection(job) {
  const r = job.result;
  if (!r) return [];
  const facts = [
    r.session_id ? `session ${r.session_id}` : null,
    r.num_turns !== null && r.num_turns !== undefined ? `${r.num_turns} turns` : null,
    r.cost_usd !== null && r.cost_usd !== undefined ? `$${Number(r.cost_usd).toFixed(4)}` : null,
    r.truncated ? "output truncated" : null,
  ].filter(Boolean);
  return [
    h("h2", {}, "Result"),
    h("div", { class: "panel" },
      facts.length ? h("p", { class: "muted" }, facts.join(" · ")) : null,
      r.command ? h("p", {}, "Command: ", h("code", {}, r.command.join(" "))) : null,
      h("pre", { class: "result-text", id: "job-result-text" }, r.text || "")),
  ];
}

/** The repository change and the artifacts of a job: figures, links, downloads. */
function changeSection(job) {
  const r = job.result;
  if (!r) return [];
  const items = [];
  const id = encodeURIComponent(job.job_id);
  if (r.diff_stat) {
    const d = r.diff_stat;
    items.push(h("p", { id: "job-diff-stat" },
      `${d.files} files changed, +${d.insertions} −${d.deletions} against `,
      h("code", {}, (r.base_commit || "").slice(0, 12)), " · ",
      download(`/jobs/${id}/diff`, `${job.job_id}.diff`, "download the patch")));
  }
  if (r.branch) items.push(h("p", {}, "Pushed to ", h("code", {}, r.branch), r.commit ? ` (${r.commit.slice(0, 12)})` : ""));
  if (r.pull_request_url) items.push(h("p", {}, "Pull request: ", h("a", { href: r.pull_request_url, rel: "noopener noreferrer", target: "_blank" }, r.pull_request_url)));
  if (job.parent) items.push(h("p", {}, "Continues ", ...job.chain.flatMap((j, i) => [i ? " → " : "", h("a", { href: jobHref(j) }, j)])));
  const artifacts = r.artifacts || [];
  if (artifacts.length) {
    items.push(h("table", { id: "job-artifacts" },
      h("thead", {}, h("tr", {}, ["Artifact", "Size", "SHA-256"].map((t) => h("th", {}, t)))),
      h("tbody", {}, artifacts.map((a) => h("tr", {},
        h("td", {}, download(`/jobs/${id}/artifacts/${a.path.split("/").map(encodeURIComponent).join("/")}`, a.path.split("/").pop(), a.path)),
        h("td", { class: "num" }, `${a.size} B`),
        h("td", { class: "mono" }, a.sha256.slice(0, 16)))))),
      h("p", {}, download(`/jobs/${id}/artifacts.zip`, `${job.job_id}-artifacts.zip`, "download all (zip)")));
  }
  return items.length ? [h("h2", {}, "Change and artifacts"), h("div", { class: "panel" }, ...items)] : [];
}

/** A link that downloads `path` with the API key (a plain link would not send it). */
function download(path, fileName, text) {
  const link = h("a", { href: path, class: "download", "data-path": path }, text);
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      const response = await fetch(path, { headers: authHeaders() });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const url = URL.createObjectURL(await response.blob());
      const a = h("a", { href: url, download: fileName });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      showNotice(`Download failed: ${e.message}`);
    }
  });
  return link;
}

// ---------------------------------------------------------------------------------------------
// A group's variants side by side (POST /groups)

function groupView(root, groupId, signal) {
  const [error, showError] = errorLine();
  const body = h("tbody", { id: "group-variants" });
  const commit = h("p", { class: "muted", id: "group-commit" });
  root.append(
    h("h1", {}, "Comparison ", h("span", { class: "mono" }, groupId)),
    error,
    commit,
    h("table", { class: "compare" },
      h("thead", {}, h("tr", {}, ["Variant", "Status", "Duration", "Cost", "Tokens in/out", "Turns", "Change", "Artifacts", "Result"].map((t) => h("th", {}, t)))),
      body));
  let lastJson = "";
  const load = async () => {
    const group = await api("GET", `/groups/${encodeURIComponent(groupId)}`, undefined, signal);
    const json = JSON.stringify(group);
    if (json === lastJson) return;
    lastJson = json;
    commit.textContent = group.same_commit === null ? "" :
      group.same_commit ? "Every variant ran on the same commit." : "The variants ran on different commits.";
    body.replaceChildren(...group.variants.map(variantRow));
  };
  poll(load, 2000, signal, showError);
}

function variantRow(v) {
  const d = v.diff_stat;
  return h("tr", { "data-job": v.job_id },
    h("td", {}, h("a", { href: jobHref(v.job_id) }, v.name)),
    h("td", {}, statusBadge(v.status)),
    h("td", { class: "num" }, v.duration_ms === null ? "—" : fmtDuration(v.duration_ms)),
    h("td", { class: "num" }, v.cost_usd === null ? "—" : `$${Number(v.cost_usd).toFixed(4)}`),
    h("td", { class: "num" }, v.input_tokens === null ? "—" : `${v.input_tokens}/${v.output_tokens}`),
    h("td", { class: "num" }, orDash(v.turns)),
    h("td", { class: "num" }, d ? `${d.files} files +${d.insertions} −${d.deletions}` : "—"),
    h("td", { class: "num" }, String(v.artifacts.length)),
    h("td", {}, h("pre", { class: "result-head" }, v.text_head || "")));
}

function attemptsSection(job) {
  if (!job.attempts || job.attempts.length === 0) return [];
  return [
    h("h2", {}, "Attempts"),
    h("table", {},
      h("thead", {}, h("tr", {}, ["#", "Node", "Started", "Finished", "Outcome", "Start latency"].map((t) => h("th", {}, t)))),
      h("tbody", {}, job.attempts.map((a) => h("tr", {},
        h("td", { class: "num" }, a.attempt),
        h("td", { class: "mono" }, a.node_id),
        h("td", {}, fmtTime(a.started_at)),
        h("td", {}, fmtTime(a.finished_at)),
        h("td", {}, orDash(a.outcome)),
        h("td", { class: "num" }, a.start_ms === null || a.start_ms === undefined ? "—" : `${a.start_ms.toFixed(1)} ms`))))),
  ];
}

// ---------------------------------------------------------------------------------------------
// Submit form, generated from GET /profiles and GET /engines

async function submitView(root, signal) {
  const [error, showError] = errorLine();
  root.append(h("h1", {}, "Submit a job"), error);
  let profiles;
  let engines;
  try {
    [profiles, engines] = await Promise.all([
      api("GET", "/profiles", undefined, signal).then((b) => b.profiles),
      api("GET", "/engines", undefined, signal).then((b) => b.engines),
    ]);
  } catch (e) {
    if (!signal.aborted) showError(e);
    return;
  }
  if (signal.aborted) return;

  const agent = h("input", {
    id: "f-agent", name: "agent_id", required: true, pattern: "[A-Za-z0-9_\\-]{1,64}",
    value: localStorage.getItem(AGENT_STORAGE) || "dashboard",
  });
  const profile = h("select", { id: "f-profile", name: "profile" },
    profiles.map((p) => h("option", { value: p.name, selected: p.name === "default" }, p.name)));
  const engine = h("select", { id: "f-engine", name: "engine" });
  const profileHint = h("span", { class: "hint" });
  const prompt = h("textarea", { id: "f-prompt", name: "prompt", placeholder: "For the shell engine, the prompt is a /bin/sh script." });
  const promptHint = h("span", { class: "hint" });
  const vars = h("fieldset", { id: "f-vars" });
  const dryRun = h("input", { id: "f-dry-run", type: "checkbox" });
  const timeout = h("input", { id: "f-timeout", type: "number", min: 1, max: 86400, step: 1, placeholder: "profile's" });
  const submit = h("button", { id: "f-submit", type: "submit", class: "primary" }, "Submit");
  const form = h("form", { id: "submit-form", class: "form" },
    h("div", { class: "row" },
      h("label", { class: "field" }, h("span", { class: "required" }, "Agent id"), agent,
        h("span", { class: "hint" }, "Letters, digits, - and _; the job id starts with it.")),
      h("label", { class: "field" }, "Profile", profile, profileHint),
      h("label", { class: "field" }, "Engine", engine)),
    h("label", { class: "field" }, "Prompt", prompt, promptHint),
    vars,
    h("div", { class: "row" },
      h("label", { class: "field" }, "Timeout (seconds)", timeout),
      h("div", { class: "field" })),
    h("label", { class: "check" }, dryRun, "Dry run",
      h("span", { class: "hint" }, "record the command line instead of running the engine")),
    h("div", {}, submit));
  root.append(form);

  const current = () => profiles.find((p) => p.name === profile.value) || profiles[0];
  const inputs = new Map(); // variable name -> {spec, el}

  const renderProfile = () => {
    const p = current();
    profileHint.textContent = p ? orDash(p.description) : "";
    // With an engine in the profile the request may leave it out; otherwise one must be chosen.
    engine.replaceChildren(
      h("option", { value: "" }, p && p.engine ? `profile's (${p.engine})` : "choose an engine"),
      ...engines.map((e) => h("option", { value: e.id, title: e.description || "" },
        e.available ? e.name || e.id : `${e.name || e.id} (unavailable)`)));
    engine.required = !(p && p.engine);
    // Required variables first, then by name.
    const specs = Object.entries((p && p.prompt_vars) || {})
      .sort(([a, x], [b, y]) => Number(y.required) - Number(x.required) || a.localeCompare(b));
    promptHint.textContent = specs.length
      ? "Leave empty to use the profile's template with the variables below."
      : "";
    inputs.clear();
    vars.replaceChildren(h("legend", {}, specs.length ? "Template variables" : "This profile has no template variables"));
    vars.hidden = specs.length === 0;
    for (const [name, spec] of specs) {
      const el = varInput(name, spec);
      inputs.set(name, { spec, el });
      const label = h("span", { class: spec.required ? "required" : null }, name);
      const hint = spec.description ? h("span", { class: "hint" }, spec.description) : null;
      vars.append(spec.type === "boolean"
        ? h("label", { class: "check" }, el, label, hint)
        : h("label", { class: "field" }, label, el, hint));
    }
  };
  profile.addEventListener("change", renderProfile);
  renderProfile();

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(null);
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
    const body = { agent_id: agent.value.trim(), profile: profile.value };
    if (engine.value) body.engine = engine.value;
    if (prompt.value.trim()) body.prompt = prompt.value;
    if (dryRun.checked) body.dry_run = true;
    if (timeout.value) body.timeout_seconds = Number(timeout.value);
    const promptVars = {};
    for (const [name, { spec, el }] of inputs) {
      const value = varValue(spec, el);
      if (value !== undefined) promptVars[name] = value;
    }
    if (Object.keys(promptVars).length) body.prompt_vars = promptVars;
    submit.disabled = true;
    try {
      const accepted = await api("POST", "/jobs", body, signal);
      localStorage.setItem(AGENT_STORAGE, body.agent_id);
      location.hash = jobHref(accepted.job_id);
    } catch (err) {
      if (signal.aborted) return;
      showError(err);
      const bad = fieldElement(err.field, { agent, engine, prompt, profile, timeout, inputs });
      if (bad) { bad.classList.add("invalid"); bad.focus(); }
    } finally {
      submit.disabled = false;
    }
  });
}

/** The input for one typed template variable: string, integer, float/number, boolean, enum. */
function varInput(name, spec) {
  const id = `f-var-${name}`;
  const hasDefault = spec.default !== null && spec.default !== undefined;
  if (Array.isArray(spec.enum) && spec.enum.length) {
    return h("select", { id, name, required: spec.required },
      spec.required && hasDefault ? null : h("option", { value: "" }, spec.required ? "choose" : "(default)"),
      spec.enum.map((v) => h("option", { value: String(v), selected: hasDefault && v === spec.default }, String(v))));
  }
  switch (spec.type) {
    case "boolean":
      return h("input", { id, name, type: "checkbox", checked: spec.default === true });
    case "integer":
      return h("input", { id, name, type: "number", step: 1, required: spec.required, value: hasDefault ? spec.default : null });
    case "float":
    case "number":
      return h("input", { id, name, type: "number", step: "any", required: spec.required, value: hasDefault ? spec.default : null });
    default:
      return h("input", { id, name, type: "text", required: spec.required, value: hasDefault ? spec.default : null });
  }
}

/** The JSON value for a variable, or undefined to leave it to the profile's default. */
function varValue(spec, el) {
  if (spec.type === "boolean" && el.type === "checkbox") return el.checked;
  if (el.value === "") return undefined;
  if (Array.isArray(spec.enum) && spec.enum.length) {
    // Enum values keep their declared type (a number enum must be sent as a number).
    const match = spec.enum.find((v) => String(v) === el.value);
    return match === undefined ? el.value : match;
  }
  if (spec.type === "integer") return parseInt(el.value, 10);
  if (spec.type === "float" || spec.type === "number") return Number(el.value);
  return el.value;
}

/** The form control an API error's `field` names (e.g. `prompt_vars.query`), if any. */
function fieldElement(field, controls) {
  if (!field) return null;
  const direct = { agent_id: controls.agent, engine: controls.engine, prompt: controls.prompt,
    profile: controls.profile, timeout_seconds: controls.timeout };
  if (direct[field]) return direct[field];
  const match = /^prompt_vars\.(.+)$/.exec(field);
  return match && controls.inputs.has(match[1]) ? controls.inputs.get(match[1]).el : null;
}

// ---------------------------------------------------------------------------------------------
// Nodes

function nodesView(root, signal) {
  const [error, showError] = errorLine();
  const summary = h("p", { class: "muted", id: "nodes-summary" });
  const tbody = h("tbody");
  root.append(
    h("h1", {}, "Nodes"),
    error,
    summary,
    h("table", { id: "nodes-table" },
      h("thead", {}, h("tr", {},
        ["Node", "Host", "Slots (busy / total)", "Warm pool", "Pool hits / misses", "Refill", "Engines", "Version", "Heartbeat"]
          .map((t) => h("th", {}, t)))),
      tbody));

  const load = async () => {
    const { nodes } = await api("GET", "/nodes", undefined, signal);
    if (signal.aborted) return;
    const busy = nodes.reduce((n, node) => n + node.slots_busy, 0);
    const total = nodes.reduce((n, node) => n + node.slots_total, 0);
    const warm = nodes.reduce((n, node) => n + Object.values(node.warm || {}).reduce((a, b) => a + b, 0), 0);
    summary.textContent = `${nodes.length} live node${nodes.length === 1 ? "" : "s"} · ${busy} of ${total} slots busy · ${warm} warm container${warm === 1 ? "" : "s"}`;
    tbody.replaceChildren(...nodes.map(nodeRow));
    if (nodes.length === 0) {
      tbody.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No live nodes.")));
    }
  };
  poll(load, NODES_POLL_MS, signal, showError);
}

function nodeRow(node) {
  const pools = Object.entries(node.warm || {});
  const age = Date.now() - new Date(node.heartbeat_at).getTime();
  return h("tr", { "data-node-id": node.node_id },
    h("td", { class: "mono nowrap" }, node.node_id),
    h("td", {}, node.host),
    h("td", { class: "nowrap" },
      h("meter", { min: 0, max: Math.max(node.slots_total, 1), value: node.slots_busy }),
      `${node.slots_busy} / ${node.slots_total}`),
    h("td", { class: "nowrap" }, pools.length
      ? pools.map(([image, count]) => h("span", { class: "pool" }, h("code", {}, image), `: ${count}`))
      : "—"),
    h("td", { class: "num" }, `${node.pool_hits} / ${node.pool_misses}`),
    h("td", { class: "num" }, node.pool_refill_ms ? fmtDuration(node.pool_refill_ms) : "—"),
    h("td", {}, h("span", { class: "chips" }, node.engines.map((e) => h("span", { class: "chip" }, e)))),
    h("td", {}, node.version),
    h("td", { class: "num", title: fmtTime(node.heartbeat_at) }, `${Math.max(0, age / 1000).toFixed(1)} s ago`));
}

// ---------------------------------------------------------------------------------------------

setupKeyForm();
window.addEventListener("hashchange", route);
route();
pollHealth();
