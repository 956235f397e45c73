// The status dashboard: plain JavaScript over the service's own REST API (no framework,
// no build step, nothing from a CDN). The API key lives in this tab's sessionStorage
// only and goes to the API as a bearer token, as any other client's does.

const KEY = "unlearn.apiKey";
const ACTIVE = ["queued", "running", "evaluating"];
const main = document.getElementById("main");
const nav = document.querySelector("header nav");
let cleanup = () => {};

// ---------------------------------------------------------------- DOM and API helpers

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "for") el.htmlFor = value;
    else if (name in el && !name.includes("-")) el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.param = error.param || null;
    this.requestId = error.request_id || null;
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, ...extra };
}

async function api(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal, cache: "no-cache" };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    signOut("Your API key was refused: sign in again.");
    throw new ApiError(401, { code: "invalid_api_key", message: "refused" });
  }
  if (!response.ok) {
    let error = {};
    try { error = (await response.json()).error || {}; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, error);
  }
  return response.json();
}

async function listAll(path, params = {}, max = 1000) {
  const items = [];
  let after = null;
  while (items.length < max) {
    const query = new URLSearchParams({ ...params, limit: "100" });
    if (after) query.set("after", after);
    const page = await api(`${path}?${query}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.last_id;
  }
  return items;
}

function clearToast() {
  document.getElementById("toast").textContent = "";
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  setTimeout(() => { if (el.textContent === message) el.textContent = ""; }, 5000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function every(ms, fn) {
  let stopped = false;
  (async () => {
    while (!stopped) {
      try { await fn(); } catch (err) { if (!(err instanceof ApiError)) console.error(err); }
      await sleep(ms);
    }
  })();
  return () => { stopped = true; };
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function metadataText(metadata) {
  return Object.entries(metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

function parseMetadata(text) {
  const out = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`"${part}" is not key=value`);
    out[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return out;
}

// Field names as people write them: acronyms in capitals, the first word capitalised.
const ACRONYMS = { lr: "LR", sam: "SAM", eos: "EOS", kl: "KL", nll: "NLL", lora: "LoRA", mc: "MC",
  qa: "QA", rmu: "RMU", npo: "NPO", mia: "MIA", auc: "AUC", icl: "ICL", fsdp: "FSDP", id: "ID" };

function humanLabel(name) {
  const words = name.split("_").filter(Boolean).map((w) => ACRONYMS[w.toLowerCase()] ?? w);
  if (words.length && words[0] === words[0].toLowerCase()) words[0] = words[0][0].toUpperCase() + words[0].slice(1);
  return words.join(" ");
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

async function download(path, filename) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) {
    let error = {};
    try { error = (await response.json()).error || {}; } catch (_) { /* a file */ }
    throw new ApiError(response.status, error);
  }
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ------------------------------------------------------------------------- the router

function signOut(message) {
  sessionStorage.removeItem(KEY);
  location.hash = "#/login";
  if (message) toast(message);
}

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", route);
route();

function route() {
  cleanup();
  cleanup = () => {};
  main.replaceChildren();
  const hash = location.hash || "#/jobs";
  const signedIn = Boolean(sessionStorage.getItem(KEY));
  nav.hidden = !signedIn;
  if (!signedIn && hash !== "#/login") {
    location.hash = "#/login";
    return;
  }
  for (const link of nav.querySelectorAll("a")) {
    const current = hash.startsWith(link.getAttribute("href"));
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  let view;
  if (parts[0] === "login") view = loginView();
  else if (parts[0] === "jobs" && parts[1]) view = jobView(decodeURIComponent(parts[1]));
  else if (parts[0] === "files") view = filesView();
  else if (parts[0] === "new") view = newJobView();
  else view = jobsView(params);
  Promise.resolve(view).then((stop) => { if (typeof stop === "function") cleanup = stop; });
  // keyboard users start at the new content, unless the view put them in a field
  if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });
}

// ---------------------------------------------------------------------------- sign in

function loginView() {
  const input = h("input", { type: "password", id: "api-key", name: "api-key", required: true,
    autocomplete: "off", "aria-describedby": "login-help" });
  const error = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "panel login", onsubmit: async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      await api("/v1/models?limit=1");
      clearToast();  // a refusal or "signed out" from before no longer holds
      location.hash = "#/jobs";
    } catch (err) {
      sessionStorage.removeItem(KEY);
      error.textContent = err.status === 401 || err.code === "invalid_api_key"
        ? "This API key was refused. Check it with whoever issued it."
        : `The service did not answer: ${err.message}`;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } },
  h("h1", {}, "Sign in"),
  h("label", { for: "api-key" }, "API key"),
  input,
  h("p", { id: "login-help", class: "muted" },
    "Kept in this browser tab only, and sent to the API as a bearer token."),
  error,
  h("button", { type: "submit" }, "Sign in"));
  main.append(form);
  input.focus();
}

// ----------------------------------------------------------------------------- jobs

function jobsView(params) {
  const status = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"),
    ["queued", "running", "evaluating", "succeeded", "failed", "cancelled"].map(
      (s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const metadata = h("input", { id: "filter-metadata", name: "metadata", value: params.get("metadata") || "",
    placeholder: "ticket=T-1", "aria-describedby": "filter-metadata-hint" });
  const error = h("p", { class: "error", role: "alert" });
  const body = h("tbody");
  const filters = h("form", { class: "filters", onsubmit: (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    if (status.value) query.set("status", status.value);
    if (metadata.value.trim()) query.set("metadata", metadata.value.trim());
    location.hash = `#/jobs?${query}`;
  } },
  h("label", { for: "filter-status" }, "Status", status),
  h("label", { for: "filter-metadata" }, "Metadata",
    metadata, h("span", { id: "filter-metadata-hint", class: "hint" }, "key=value, comma-separated")),
  h("button", { type: "submit", class: "secondary" }, "Filter"));
  main.append(
    h("h1", {}, "Jobs"), filters, error,
    h("table", { "aria-describedby": "jobs-caption" },
      h("caption", { id: "jobs-caption", class: "muted", style: "text-align:left" },
        "Newest first; statuses update live."),
      h("thead", {}, h("tr", {}, ["Job", "Status", "Verdict", "Method", "Model", "Progress", "Metadata", "Submitted"]
        .map((t) => h("th", { scope: "col" }, t)))),
      body));
  return every(2000, async () => {
    const query = new URLSearchParams({ limit: "50" });
    if (params.get("status")) query.set("status", params.get("status"));
    try {
      for (const [k, v] of Object.entries(parseMetadata(params.get("metadata") || ""))) {
        query.set(`metadata[${k}]`, v);
      }
    } catch (err) {
      error.textContent = err.message;
      return;
    }
    const page = await api(`/v1/jobs?${query}`);
    error.textContent = "";
    body.replaceChildren(...(page.data.length ? page.data.map((job) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
      h("td", {}, badge(job.status)),
      h("td", {}, job.verdict ? badge(job.verdict) : "–"),
      h("td", {}, job.method),
      h("td", {}, job.base_model),
      h("td", { class: "num" }, `${job.progress.step}/${job.progress.total_steps ?? "?"}`),
      h("td", {}, metadataText(job.metadata)),
      h("td", {}, when(job.created_at)))) : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs."))]));
  });
}

function lineChart(title, series, yLabel) {
  // series: [{name, points: [[x, y], ...]}]; drawn as SVG polylines with min/max ticks.
  const width = 560, height = 220, left = 48, right = 12, top = 12, bottom = 28;
  const all = series.flatMap((s) => s.points);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const last = series.map((s) => s.points.length ? `${s.name} ${s.points.at(-1)[1].toFixed(3)} at step ${s.points.at(-1)[0]}` : `${s.name}: none yet`);
  svg.setAttribute("aria-label", `${title}: ${last.join("; ")}`);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  add("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom });
  add("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom });
  if (all.length) {
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const sx = (x) => left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - left - right);
    const sy = (y) => height - bottom - ((y - y0) / (y1 - y0)) * (height - top - bottom);
    add("text", { x: 4, y: top + 8 }, y1.toFixed(3));
    add("text", { x: 4, y: height - bottom }, y0.toFixed(3));
    add("text", { x: left, y: height - 8 }, `step ${x0}`);
    add("text", { x: width - right - 60, y: height - 8 }, `step ${x1}`);
    add("text", { x: width / 2 - 20, y: height - 8 }, yLabel);
    series.forEach((s, i) => {
      if (!s.points.length) return;
      add("polyline", { class: `line-${i}`, points: s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") });
    });
  } else {
    add("text", { x: width / 2 - 40, y: height / 2 }, "no data yet");
  }
  return h("figure", { style: "margin:0" },
    h("figcaption", {}, h("strong", {}, title)),
    svg,
    h("div", { class: "legend" }, series.map((s, i) => h("span", { class: `k${i}` }, s.name))));
}

// A job's status read past the server's status cache (STATUS_CACHE_SECONDS): after an event
// said it changed, the cached answer may be up to that old. The periodic poll takes the cache.
const FRESH = { headers: { "Cache-Control": "no-cache" } };

async function followEvents(jobId, lastId, onEvent, onEnd, signal) {
  // The SSE stream read with fetch (EventSource cannot send the key), resumed with
  // Last-Event-ID after a dropped connection.
  while (!signal.aborted) {
    try {
      const headers = authHeaders(lastId ? { "Last-Event-ID": lastId } : {});
      const response = await fetch(`/v1/jobs/${jobId}/events/stream`, { headers, signal });
      if (!response.ok) throw new ApiError(response.status, {});
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "", event = {};
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let at;
        while ((at = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, at).replace(/\r$/, "");
          buffer = buffer.slice(at + 1);
          if (line === "") {
            if (event.event === "end") { onEnd(JSON.parse(event.data)); return; }
            if (event.data !== undefined) {
              const parsed = JSON.parse(event.data);
              lastId = event.id || lastId;
              onEvent(parsed);
            }
            event = {};
          } else if (!line.startsWith(":")) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let text = colon < 0 ? "" : line.slice(colon + 1);
            if (text.startsWith(" ")) text = text.slice(1);
            event[field] = field === "data" && event.data !== undefined ? `${event.data}\n${text}` : text;
          }
        }
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) return;
    }
    await sleep(1500);
  }
}

async function jobView(id) {
  const controller = new AbortController();
  const stopPolling = [];
  const state = { job: null, events: [], steps: [], probes: [], warnings: [], lastId: null, eta: null };
  main.append(h("h1", {}, "Job ", h("span", { class: "mono" }, id)));
  const statusLine = h("p", { id: "job-status", role: "status", "aria-live": "polite" });
  const facts = h("dl", { class: "facts" });
  const progress = h("progress", { id: "job-progress", max: 1, value: 0 });
  const progressText = h("p", { class: "muted", id: "job-progress-text" });
  const charts = h("div", { class: "grid" });
  const problems = h("div");
  const results = h("div", { id: "job-results" });
  main.append(statusLine,
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "job-facts" },
        h("h2", { id: "job-facts", style: "margin-top:0" }, "The job"), facts),
      h("section", { class: "panel", "aria-labelledby": "job-progress-title" },
        h("h2", { id: "job-progress-title", style: "margin-top:0" }, "Progress"),
        h("label", { for: "job-progress" }, "Steps done"), progress, progressText)),
    h("h2", {}, "Curves"), charts, problems, results);

  function renderJob() {
    const job = state.job;
    statusLine.replaceChildren("Status: ", badge(job.status),
      job.cancel_requested && ACTIVE.includes(job.status) ? " (cancel requested)" : "",
      ...(job.verdict ? [" · verdict: ", badge(job.verdict)] : []));
    facts.replaceChildren(...[
      ["Method", job.method], ["Base model", job.base_model],
      ["Forget set", job.forget_file], ["Retain set", job.retain_file || "–"],
      ["Metadata", metadataText(job.metadata) || "–"],
      ["Starts from", job.init_from_job || "the base model"],
      ["Submitted", when(job.created_at)], ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)], ["Attempts", job.attempts],
    ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const p = job.progress;
    // A succeeded job is done, also where its stop rule ended it before the planned steps.
    progress.max = job.status === "succeeded" ? 1 : p.total_steps || 1;
    progress.value = job.status === "succeeded" ? 1 : p.step;
    const loss = p.loss === null || p.loss === undefined ? "" : ` · loss ${p.loss.toFixed(4)}`;
    const eta = ACTIVE.includes(job.status) && state.eta !== null ? ` · about ${duration(state.eta)} left in this phase` : "";
    const stop = job.metrics_summary?.stop_rule;
    const ended = ACTIVE.includes(job.status) ? "" : stop?.reason ? ` · the stop rule ended it: ${stop.reason}` : "";
    const where = ACTIVE.includes(job.status) ? p.phase || job.status : job.status;
    progressText.textContent = `${where} · step ${p.step} of ${p.total_steps ?? "?"}${loss}${eta}${ended}`;
    if (ACTIVE.includes(job.status) && !main.querySelector("#cancel-job")) {
      progressText.after(h("button", { id: "cancel-job", type: "button", class: "secondary", onclick: async () => {
        try { state.job = await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); renderJob(); toast("Cancel requested."); }
        catch (err) { toast(err.message); }
      } }, "Cancel job"));
    } else if (!ACTIVE.includes(job.status)) {
      main.querySelector("#cancel-job")?.remove();
    }
  }

  function renderCharts() {
    charts.replaceChildren(
      lineChart("Loss per step", [{ name: "loss", points: state.steps }], "loss"),
      lineChart("Stop-rule probe (ROUGE-L F1)", [
        { name: "forget", points: state.probes.map((p) => [p.step, p.forget]) },
        { name: "utility", points: state.probes.map((p) => [p.step, p.utility]) },
      ], "F1"));
    const items = [];
    if (state.warnings.length) {
      items.push(h("h2", {}, "Warnings"), h("ul", { class: "plain warning" }, state.warnings.map((w) => h("li", {}, w))));
    }
    if (state.job?.error) {
      items.push(h("h2", {}, "Error"), h("p", { class: "error", role: "alert" },
        h("code", {}, state.job.error.code), ": ", state.job.error.message));
    }
    problems.replaceChildren(...items);
  }

  function take(event) {
    state.events.push(event);
    state.lastId = event.id;
    const data = event.data || {};
    if (event.type === "step") {
      state.steps.push([data.step, data.loss]);
      state.eta = data.eta_seconds ?? null;
      if (state.job) Object.assign(state.job.progress, { step: data.step, total_steps: data.total_steps, loss: data.loss });
    } else if (event.type === "probe") {
      state.probes.push(data);
    } else if (event.type === "warning") {
      state.warnings.push(event.message);
    }
  }

  try {
    state.job = await api(`/v1/jobs/${id}`);
  } catch (err) {
    main.append(h("p", { class: "error", role: "alert" },
      err.status === 404 ? `No job ${id} among yours.` : err.message));
    return () => {};
  }
  for (const event of await listAll(`/v1/jobs/${id}/events`, {}, 100000)) take(event);
  renderJob();
  renderCharts();
  if (!ACTIVE.includes(state.job.status)) {
    await renderResults(id, state.job, results);
  } else {
    let redraw = null;
    followEvents(id, state.lastId, (event) => {
      take(event);
      if (event.type === "status" || event.type === "phase") {
        api(`/v1/jobs/${id}`, FRESH).then((job) => { state.job = job; renderJob(); }).catch(() => {});
      }
      if (!redraw) redraw = setTimeout(() => { redraw = null; renderJob(); renderCharts(); }, 250);
    }, async () => {
      state.job = await api(`/v1/jobs/${id}`, FRESH);
      renderJob();
      renderCharts();
      await renderResults(id, state.job, results);
    }, controller.signal);
    stopPolling.push(every(3000, async () => {  // the progress fields between events
      if (!ACTIVE.includes(state.job.status)) return;
      state.job = await api(`/v1/jobs/${id}`, { signal: controller.signal });
      renderJob();
    }));
  }
  return () => { controller.abort(); stopPolling.forEach((stop) => stop()); };
}

const NEGATIVE_RECOVERY = "negative: the attack made it forget more";

function criterionName(row) {
  // what it measures, in words ("relearning attack recovery"); the spec's name in the tooltip
  const text = row.measures || humanLabel(row.criterion);
  return text[0].toUpperCase() + text.slice(1);
}

async function renderResults(id, job, into) {
  const parts = [];
  if (job.status === "succeeded") {
    const { metrics, summary } = await api(`/v1/jobs/${id}/metrics`);
    if (summary?.headline) parts.push(h("p", { id: "forget-headline" }, h("strong", {}, summary.headline)));
    if (summary && summary.rows.length) {
      const reference = summary.rows.some((r) => r.reference);
      parts.push(h("h2", { id: "before-after" }, "Before and after"),
        h("table", { "aria-labelledby": "before-after" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"), h("th", { scope: "col", class: "num" }, "Before"),
            h("th", { scope: "col", class: "num" }, "After"), reference ? h("th", { scope: "col", class: "num" }, "Never learned it") : null)),
          h("tbody", {}, summary.rows.map((r) => h("tr", {}, h("th", { scope: "row" }, r.metric),
            h("td", { class: "num" }, r.before), h("td", { class: "num" }, r.after),
            reference ? h("td", { class: "num" }, r.reference) : null)))));
    }
    const t = metrics?.tradeoff;
    if (t && t.delta_o !== null && t.delta_o !== undefined) {
      parts.push(h("p", {}, `Trade-off (points): delta f ${t.delta_f.toFixed(2)}, delta u ${t.delta_u.toFixed(2)}, dO ${t.delta_o.toFixed(2)}.`));
    }
    parts.push(h("h2", { id: "evidence" }, "Evidence"),
      h("p", {}, "Verdict: ", badge(metrics?.verdict || "not_evaluated")));
    if (metrics?.criteria?.length) {
      parts.push(h("table", { "aria-label": "Criteria" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Criterion"), h("th", { scope: "col", class: "num" }, "Threshold"),
          h("th", { scope: "col", class: "num" }, "Value"), h("th", { scope: "col" }, "Result"))),
        h("tbody", {}, metrics.criteria.map((r) => h("tr", {},
          h("td", { title: `eval.criteria.${r.criterion}` }, criterionName(r)), h("td", { class: "num" }, r.threshold),
          h("td", { class: "num" }, r.value === null ? "–" : Number(r.value).toFixed(3),
            r.criterion.includes("recovery") && r.value < 0 ? h("div", { class: "hint muted" }, NEGATIVE_RECOVERY) : null),
          h("td", {}, r.passed === true ? badge("pass") : r.passed === false ? badge("fail") : `not evaluated (${r.reason})`))))));
    }
    if (summary?.evidence?.length) {
      parts.push(h("ul", { class: "plain" }, summary.evidence.map((line) => h("li", {}, line.replaceAll("**", "")))));
    }
    const sweep = relearnCells(metrics?.robustness?.relearn);
    if (sweep) parts.push(sweep);
    const artifacts = (await api(`/v1/jobs/${id}/artifacts`)).data;
    // the worker signs each model directory (adapter or full weights) before archiving it
    const models = artifacts.filter((a) => MODEL_ARTIFACTS.includes(a.name)).map((a) => a.name);
    parts.push(h("h2", {}, "Downloads"), h("ul", { class: "plain", id: "downloads" },
      artifacts.map((a) => h("li", {}, h("button", { type: "button", class: "link", "data-artifact": a.name,
        onclick: () => download(`/v1/jobs/${id}/artifacts/${a.name}`, a.filename).catch((e) => toast(e.message)) },
      `${a.name}`), ` ${a.filename}, ${(a.bytes / 1024).toFixed(0)} kB, sha256 `, h("code", {}, a.sha256.slice(0, 16) + "…"))),
      h("li", {}, h("button", { type: "button", class: "link", "data-artifact": "certificate",
        onclick: () => download(`/v1/jobs/${id}/certificate`, `${id}-certificate.json`).catch((e) => toast(e.message)) },
      "certificate"), ": an in-toto statement in a DSSE envelope, signed with Ed25519",
      models.length ? [`; the ${models.join(" and ")} directory signed with OpenSSF model signing (`, h("code", {}, "model.sig"), " in its archive)"] : "",
      models.length ? ". Check both offline with " : ". Check it offline with ", h("code", {}, "unlearn verify"))));
    const report = artifacts.find((a) => a.name === "report");
    if (report) parts.push(await tokenView(id));
  }
  into.replaceChildren(...parts);
}

const MODEL_ARTIFACTS = ["adapter", "model"];

function points(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1);
}

function relearnCells(relearn) {
  // The relearning sweep, one row per cell: its settings, the job's forget KnowMem F1
  // after that attack and its recovery, the reference model's after the same attack.
  if (relearn?.status !== "done" || !relearn.cells?.length) return null;
  const reference = relearn.cells.some((c) => c.reference);
  const columns = ["Data", "Learning rate", "Steps", "Forget KnowMem F1 after the attack", "Recovery",
    ...(reference ? ["Never learned it, after the attack"] : [])];
  const row = (cell) => {
    const worst = cell.cell === relearn.worst_cell;
    const settings = [h("td", {}, cell.data, worst ? [" ", h("span", { class: "badge worst" }, "worst")] : null),
      h("td", { class: "num" }, Number(cell.learning_rate).toExponential()), h("td", { class: "num" }, cell.steps)];
    if (cell.status !== "done") {
      return h("tr", {}, settings, h("td", { colspan: columns.length - 3, class: "muted" }, `off (${cell.reason})`));
    }
    return h("tr", { class: worst ? "worst" : null }, settings,
      h("td", { class: "num" }, points(cell.forget_knowmem_f1)),
      h("td", { class: "num" }, cell.recovery === null || cell.recovery === undefined ? "–" : cell.recovery.toFixed(2),
        cell.recovery < 0 ? h("div", { class: "hint muted" }, NEGATIVE_RECOVERY) : null),
      reference ? h("td", { class: "num" }, points(cell.reference?.forget_knowmem_f1)) : null);
  };
  const f1 = relearn.forget_knowmem_f1;
  return h("section", { "aria-labelledby": "relearn-cells-title" },
    h("h2", { id: "relearn-cells-title" }, "Relearning sweep"),
    h("p", { class: "muted" }, "Each cell fine-tunes every weight of a copy of the model on the attack split "
      + "(qa: forget questions, text: forget texts) and measures forget KnowMem F1 on the other "
      + `${relearn.settings.measured_questions} questions: ${points(f1.before)} before unlearning, ${points(f1.after)} after. `
      + "The job's recovery is the worst cell's"
      + (reference && relearn.reference_after ? `; the reference model answers ${points(relearn.reference_after.forget_knowmem_f1)} before any attack.` : ".")),
    h("table", { id: "relearn-cells", "aria-labelledby": "relearn-cells-title" },
      h("thead", {}, h("tr", {}, columns.map((c, i) => h("th", { scope: "col", class: i === 0 ? null : "num" }, c)))),
      h("tbody", {}, relearn.cells.map(row))));
}

async function tokenView(id) {
  // The report's token probabilities (paper Fig. 2): pi(y_i | x, y_<i) of sample forget
  // answers, before and after; a read for display, which the audit log does not record.
  const section = h("section", { "aria-labelledby": "tokens-title" },
    h("h2", { id: "tokens-title" }, "Token probabilities on forget answers"));
  try {
    const view = await api(`/v1/jobs/${id}/token-probabilities`);
    const shade = (p) => `rgba(11, 92, 173, ${Math.max(0.05, p).toFixed(2)})`;
    const ink = (p) => (p > 0.55 ? "#fff" : "#1d232a");
    section.append(h("div", { class: "token-legend", id: "token-legend" },
      h("span", {}, "Each answer token shaded by the probability the model gives it after the prompt and the tokens before it:"),
      h("span", { class: "tokens", "aria-hidden": "true" }, [0, 0.25, 0.5, 0.75, 1].map((p) =>
        h("span", { style: `background:${shade(p)};color:${ink(p)}` }, p.toFixed(2)))),
      h("span", {}, "(pale: unlikely, dark: likely; hover a token for its value). Forgotten answers turn pale after unlearning.")));
    view.before.slice(0, 3).forEach((sample, i) => {
      const after = view.after[i];
      section.append(h("p", { class: "muted" }, sample.prompt.trim()));
      for (const [label, row] of [["before", sample], ["after", after]]) {
        section.append(h("div", { class: "tokens", role: "group", "aria-label": `${label} unlearning` },
          h("span", { class: "muted" }, `${label}:`),
          row.tokens.map((token, j) => h("span", {
            style: `background:${shade(row.probabilities[j])};color:${ink(row.probabilities[j])}`,
            title: `${token}: ${row.probabilities[j].toFixed(3)}`,
          }, token.replace(/^▁|^Ġ/, " ")))));
      }
    });
  } catch (err) {
    section.append(h("p", { class: "muted" }, `Not shown: ${err.message}`));
  }
  return section;
}

// ---------------------------------------------------------------------------- files

function problemsTable(validation) {
  if (!validation || !validation.problems.length) return h("p", { class: "muted" }, validation?.summary || "");
  return h("div", {},
    h("p", {}, validation.summary),
    h("table", {}, h("thead", {}, h("tr", {}, ["Line", "Field", "Problem"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, validation.problems.map((p) => h("tr", {},
        h("td", { class: "num" }, p.line ?? "file"), h("td", {}, p.field ?? "–"), h("td", {}, p.message))))),
    validation.problems_total > validation.problems.length
      ? h("p", { class: "muted" }, `and ${validation.problems_total - validation.problems.length} more`) : null);
}

async function uploadFile(file, purpose, metadata) {
  const form = new FormData();
  form.append("file", file);
  form.append("purpose", purpose);
  if (metadata && Object.keys(metadata).length) form.append("metadata", JSON.stringify(metadata));
  let uploaded = await api("/v1/files", { method: "POST", body: form });
  while (uploaded.status === "validating") {
    await sleep(700);
    uploaded = await api(`/v1/files/${uploaded.id}`);
  }
  return uploaded;
}

function filesView() {
  const input = h("input", { type: "file", id: "upload-file", required: true, accept: ".jsonl,.json,.txt" });
  const purpose = h("select", { id: "upload-purpose" }, ["forget", "retain", "eval", "contrast"].map((p) => h("option", { value: p }, p)));
  const metadata = h("input", { id: "upload-metadata", placeholder: "ticket=T-1" });
  const result = h("div", { id: "upload-result", role: "status", "aria-live": "polite" });
  const body = h("tbody");
  const refresh = async () => {
    const files = await listAll("/v1/files", {}, 200);
    body.replaceChildren(...(files.length ? files.map((f) => h("tr", {},
      h("td", { class: "mono" }, f.id), h("td", {}, f.filename), h("td", {}, f.purpose),
      h("td", {}, badge(f.status)), h("td", {}, f.kind || "–"), h("td", { class: "num" }, f.records ?? "–"),
      h("td", {}, metadataText(f.metadata)), h("td", {}, when(f.created_at)),
      h("td", {}, f.validation && f.validation.problems.length
        ? h("details", {}, h("summary", {}, `${f.validation.problems_total} problem${f.validation.problems_total === 1 ? "" : "s"}`), problemsTable(f.validation))
        : "–"))) : [h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No files."))]));
  };
  main.append(h("h1", {}, "Files"),
    h("form", { class: "panel row", onsubmit: async (event) => {
      event.preventDefault();
      result.replaceChildren("Uploading…");
      try {
        const file = await uploadFile(input.files[0], purpose.value, parseMetadata(metadata.value));
        result.replaceChildren(h("p", {}, `${file.filename}: `, badge(file.status), ` ${file.kind || ""} ${file.records ?? ""} records`),
          file.status === "invalid" ? problemsTable(file.validation) : "");
        await refresh();
      } catch (err) {
        result.replaceChildren(h("p", { class: "error", role: "alert" }, err.message));
      }
    } },
    h("label", { for: "upload-file" }, "File (JSONL or .txt)", input),
    h("label", { for: "upload-purpose" }, "Purpose", purpose),
    h("label", { for: "upload-metadata" }, "Metadata", metadata),
    h("button", { type: "submit" }, "Upload")),
    result,
    h("h2", {}, "Your files"),
    h("table", {}, h("thead", {}, h("tr", {}, ["File", "Name", "Purpose", "Status", "Kind", "Records", "Metadata", "Uploaded", "Validation"]
      .map((c) => h("th", { scope: "col" }, c)))), body));
  refresh().catch((err) => toast(err.message));
}

// -------------------------------------------------------------------------- new job

const EVAL_SLOTS = [
  ["forget_qa", "Forget questions (QA)"], ["retain_qa", "Retain questions (QA)"],
  ["neighbor_qa", "Neighbour questions (QA, must survive)"],
  ["forget_text", "Forget text (VerbMem)"], ["forget_mc", "Forget-domain MC"],
  ["general_mc", "General MC"], ["holdout", "Holdout (membership inference)"],
];

function fileSlot(id, label, purpose, files, { required = false, hint = "" } = {}) {
  const select = h("select", { id: `${id}-existing`, "data-param": id.replaceAll("-", ".") },
    h("option", { value: "" }, required ? "— choose or upload —" : "— none —"),
    files.filter((f) => f.purpose === purpose && f.status === "valid")
      .map((f) => h("option", { value: f.id }, `${f.filename} (${f.records} records, ${f.id.slice(0, 13)}…)`)));
  const upload = h("input", { type: "file", id: `${id}-upload`, accept: ".jsonl,.json,.txt" });
  const error = h("div", { class: "field-error", id: `${id}-error` });
  select.setAttribute("aria-describedby", error.id);
  const wrap = h("div", { class: "slot" },
    h("label", { for: select.id }, `${label}${required ? " (required)" : ""}`, select),
    h("label", { for: upload.id }, "or upload a file", upload),
    hint ? h("span", { class: "muted" }, hint) : null, error);
  return { wrap, select, upload, error, purpose, label, required };
}

function schemaField(name, schema, prefix) {
  let type = schema.type, nullable = false, spec = schema;
  if (schema.anyOf) {
    const options = schema.anyOf.filter((o) => o.type !== "null");
    nullable = options.length < schema.anyOf.length;
    if (options.length !== 1) return null;
    spec = { ...options[0], ...schema };
    type = options[0].type;
  }
  const id = `${prefix}-${name}`;
  const label = humanLabel(name);
  const fallback = schema.default ?? "";
  let input;
  if (spec.enum) {
    input = h("select", { id }, spec.enum.map((v) => h("option", { value: v, selected: v === fallback }, v)));
  } else if (type === "boolean") {
    input = h("input", { id, type: "checkbox", checked: Boolean(fallback) });
  } else if (type === "integer" || type === "number") {
    input = h("input", { id, type: "number", step: type === "integer" ? 1 : "any", value: fallback,
      min: spec.minimum ?? spec.exclusiveMinimum, max: spec.maximum ?? spec.exclusiveMaximum,
      placeholder: nullable ? "default" : "" });
  } else if (type === "string") {
    input = h("input", { id, value: fallback });
  } else {
    return null;  // lists and objects: the advanced JSON box below takes them
  }
  input.dataset.param = `${prefix}.${name}`;
  input.dataset.initial = input.type === "checkbox" ? String(input.checked) : input.value;
  const error = h("div", { class: "field-error", id: `${id}-error` });
  input.setAttribute("aria-describedby", `${id}-hint ${id}-error`);
  return {
    name,
    wrap: h("label", { for: id }, label, input,
      h("span", { class: "hint", id: `${id}-hint` }, spec.description || ""), error),
    current() {  // what the job will run with: the value shown, or the default
      if (input.type === "checkbox") return input.checked;
      if (type === "integer" || type === "number") return input.value === "" ? (fallback === "" ? null : fallback) : Number(input.value);
      return input.value;
    },
    value() {
      const now = input.type === "checkbox" ? String(input.checked) : input.value;
      if (now === input.dataset.initial) return undefined;  // the server's default holds
      if (input.type === "checkbox") return input.checked;
      if (type === "integer" || type === "number") return now === "" ? null : Number(now);
      return now;
    },
  };
}

async function pastPace(baseModel, method) {
  // The unlearning pace of the tenant's latest succeeded job on this base model (this
  // method where there is one): samples per second, from its metrics. null: none known.
  const page = await api(`/v1/jobs?${new URLSearchParams({ status: "succeeded", limit: "50" })}`);
  const same = page.data.filter((j) => j.base_model === baseModel);
  const job = same.find((j) => j.method === method) || same[0];
  if (!job) return null;
  const { metrics } = await api(`/v1/jobs/${job.id}/metrics`);
  const perSecond = metrics?.throughput?.steps_per_second;
  if (!perSecond) return null;
  const hp = job.hyperparameters;
  return { job: job.id, samplesPerSecond: perSecond * hp.batch_size * (hp.gradient_accumulation_steps || 1),
    maxLength: hp.max_length, wholeJob: Object.values(metrics.timings_s || {}).reduce((a, b) => a + b, 0) };
}

function jobCost(values, forgetFile, pace) {
  // What these settings cost: optimizer steps as the engine counts them
  // (core.engine.train.total_steps), and the unlearning time at a past job's pace.
  const batch = values.batch_size, accumulation = values.gradient_accumulation_steps || 1;
  let steps = values.max_steps, from = "max_steps";
  const perStep = batch * accumulation;
  if (!steps) {
    if (!forgetFile) return "Cost: choose or upload a forget set to see how many steps these settings make.";
    const batches = Math.ceil(forgetFile.records / batch);
    steps = Math.max(1, Math.ceil(values.epochs * batches / accumulation));
    from = `${forgetFile.records} records × ${values.epochs} epochs ÷ batch ${batch}${accumulation > 1 ? ` × ${accumulation}` : ""}`;
  }
  const windows = forgetFile && forgetFile.kind === "text" && !values.max_steps ? "at least " : "";
  let text = `Cost: ${windows}${steps.toLocaleString()} optimizer steps (${from}); the stop rule may end it sooner.`;
  if (pace) {
    const seconds = steps * perStep / pace.samplesPerSecond;
    text += ` At the pace of your job ${pace.job} on this model (${pace.samplesPerSecond.toFixed(1)} samples/s at ` +
      `max_length ${pace.maxLength}): about ${duration(seconds)} of unlearning, before the evaluations and audits ` +
      `(that whole job took ${duration(pace.wholeJob)}).`;
  } else {
    text += " Time: not known until a job on this model has run (its pace is then used here).";
  }
  return text;
}

async function localRecords(file) {
  // A forget file chosen for upload, counted here as the service will (one record a line;
  // raw text is cut into max_length windows, so its steps are a lower bound).
  if (file.size > 64 * 1024 * 1024) return null;
  const lines = (await file.text()).split("\n").filter((line) => line.trim());
  let kind = file.name.endsWith(".txt") ? "text" : "qa";
  try { if (lines.length && "text" in JSON.parse(lines[0])) kind = "text"; } catch (_) { /* the service says */ }
  return { records: file.name.endsWith(".txt") ? 1 : lines.length, kind };
}

async function newJobView() {
  main.append(h("h1", {}, "New job"));
  const [methods, models, files] = await Promise.all([
    listAll("/v1/methods"), listAll("/v1/models"), listAll("/v1/files", {}, 500)]);
  const method = h("select", { id: "job-method", "data-param": "method" },
    methods.map((m) => h("option", { value: m.id, selected: m.id === "catnip" }, m.id)));
  const methodInfo = h("p", { class: "muted", id: "job-method-info" });
  const model = h("select", { id: "job-model", "data-param": "base_model" },
    models.map((m) => h("option", { value: m.id }, m.description ? `${m.id}: ${m.description}` : m.id)));
  const forget = fileSlot("forget_file", "Forget set", "forget", files, { required: true });
  const retain = fileSlot("retain_file", "Retain set", "retain", files);
  const contrast = fileSlot("contrast_file", "Contrast set (FLAT's expected responses)", "contrast", files);
  const evals = EVAL_SLOTS.map(([slot, label]) => fileSlot(`eval-${slot}`, label, "eval", files));
  const adapterType = h("select", { id: "adapter-type", "data-param": "adapter.type" },
    h("option", { value: "lora" }, "LoRA adapter"), h("option", { value: "full" }, "full weights"));
  const rank = h("input", { id: "adapter-r", type: "number", min: 1, value: 8, "data-param": "adapter.r" });
  const alpha = h("input", { id: "adapter-alpha", type: "number", min: 0, step: "any", value: 16, "data-param": "adapter.alpha" });
  const hyper = h("div", { class: "fields", id: "hyperparameters" });
  const maxSamples = h("input", { id: "eval-max_samples", type: "number", min: 1, placeholder: "default", "data-param": "eval.max_samples" });
  const probeEvery = h("input", { id: "eval-probe_every", type: "number", min: 1, placeholder: "about 5% of the steps", "data-param": "eval.probe_every" });
  const advanced = h("textarea", { id: "eval-advanced", rows: 3, placeholder: '{"criteria": {"forget_knowmem_max_ratio": 0.5}}', "data-param": "eval" });
  const metadata = h("input", { id: "job-metadata", placeholder: "ticket=T-1", "data-param": "metadata" });
  const alert = h("div", { role: "alert", class: "error", id: "form-error" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Submit job");
  const cost = h("p", { id: "job-cost", class: "muted", role: "status", "aria-live": "polite" });
  const paces = new Map();
  let fields = [];

  async function showCost() {
    const values = Object.fromEntries(fields.map((f) => [f.name, f.current()]));
    const key = `${model.value} ${method.value}`;
    if (!paces.has(key)) paces.set(key, await pastPace(model.value, method.value).catch(() => null));
    const chosen = forget.upload.files.length ? await localRecords(forget.upload.files[0])
      : files.find((f) => f.id === forget.select.value) || null;
    cost.textContent = jobCost(values, chosen, paces.get(key));
  }

  function showMethod() {
    const m = methods.find((x) => x.id === method.value);
    methodInfo.textContent = `${m.summary}. Trains on: ${m.data}.`;
    retain.wrap.querySelector("label").firstChild.textContent = `Retain set${m.needs_retain ? " (required)" : ""}`;
    retain.required = m.needs_retain;
    contrast.wrap.hidden = !m.uses_contrast;
    fields = Object.entries(m.hyperparameters.properties).map(([n, s]) => schemaField(n, s, "hyperparameters")).filter(Boolean);
    hyper.replaceChildren(...fields.map((f) => f.wrap));
    showCost();
  }
  method.addEventListener("change", showMethod);
  model.addEventListener("change", showCost);
  forget.select.addEventListener("change", showCost);
  forget.upload.addEventListener("change", showCost);
  hyper.addEventListener("input", showCost);

  function clearErrors() {
    alert.textContent = "";
    for (const el of main.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    for (const el of main.querySelectorAll(".field-error")) el.textContent = "";
  }

  function markField(param, message) {
    const target = param && [...main.querySelectorAll("[data-param]")].find(
      (el) => el.dataset.param === param || el.dataset.param === param.replace(/^hyperparameters\./, "hyperparameters."));
    if (!target) return false;
    target.setAttribute("aria-invalid", "true");
    const error = document.getElementById(target.getAttribute("aria-describedby")?.split(" ").at(-1) || "");
    if (error) error.textContent = message;
    target.focus();
    return true;
  }

  async function fileFor(slot) {
    if (slot.upload.files.length) {
      const file = await uploadFile(slot.upload.files[0], slot.purpose);
      if (file.status !== "valid") {
        slot.error.replaceChildren(problemsTable(file.validation));
        slot.select.setAttribute("aria-invalid", "true");
        throw new Error(`${slot.label}: ${file.filename} is not valid (see the problems under it)`);
      }
      // uploaded once: a resubmission after another field's error reuses it
      files.push(file);
      slot.select.append(h("option", { value: file.id }, `${file.filename} (${file.records} records, ${file.id.slice(0, 13)}…)`));
      slot.select.value = file.id;
      slot.upload.value = "";
      return file.id;
    }
    if (!slot.select.value && slot.required) {
      slot.error.textContent = "Choose a file or upload one.";
      slot.select.setAttribute("aria-invalid", "true");
      throw new Error(`${slot.label} is required.`);
    }
    return slot.select.value || null;
  }

  const form = h("form", { novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    clearErrors();
    submit.disabled = true;
    submit.textContent = "Uploading and submitting…";
    try {
      const body = { method: method.value, base_model: model.value,
        adapter: { type: adapterType.value }, hyperparameters: {} };
      if (adapterType.value === "lora") Object.assign(body.adapter, { r: Number(rank.value), alpha: Number(alpha.value) });
      for (const field of fields) {
        const value = field.value();
        if (value !== undefined) body.hyperparameters[field.name] = value;
      }
      body.forget_file = await fileFor(forget);
      const retainId = await fileFor(retain);
      if (retainId) body.retain_file = retainId;
      if (!contrast.wrap.hidden) {
        const contrastId = await fileFor(contrast);
        if (contrastId) body.contrast_file = contrastId;
      }
      const evalSpec = {};
      for (let i = 0; i < evals.length; i++) {
        const fileId = await fileFor(evals[i]);
        if (fileId) evalSpec[EVAL_SLOTS[i][0]] = fileId;
      }
      if (maxSamples.value) evalSpec.max_samples = Number(maxSamples.value);
      if (probeEvery.value) evalSpec.probe_every = Number(probeEvery.value);
      if (advanced.value.trim()) {
        try { Object.assign(evalSpec, JSON.parse(advanced.value)); }
        catch (err) { markField("eval", `Not JSON: ${err.message}`); throw new Error("The advanced evaluation settings are not JSON."); }
      }
      if (Object.keys(evalSpec).length) body.eval = evalSpec;
      const meta = parseMetadata(metadata.value);
      if (Object.keys(meta).length) body.metadata = meta;
      const job = await api("/v1/jobs", { method: "POST", json: body,
        headers: { "Idempotency-Key": `dashboard-${crypto.randomUUID()}` } });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      const where = err.param ? ` (${err.param})` : "";
      alert.textContent = `Not submitted: ${err.message}${where}`;
      if (err.param) markField(err.param, err.message);
    } finally {
      submit.disabled = false;
      submit.textContent = "Submit job";
    }
  } },
  h("fieldset", {}, h("legend", {}, "Method and model"),
    h("div", { class: "fields" },
      h("label", { for: "job-method" }, "Method", method),
      h("label", { for: "job-model" }, "Base model", model)), methodInfo),
  h("fieldset", {}, h("legend", {}, "Training data"), h("div", { class: "fields" }, forget.wrap, retain.wrap, contrast.wrap)),
  h("fieldset", {}, h("legend", {}, "What is trained"),
    h("div", { class: "fields" },
      h("label", { for: "adapter-type" }, "Adapter", adapterType),
      h("label", { for: "adapter-r" }, "LoRA rank", rank),
      h("label", { for: "adapter-alpha" }, "LoRA alpha", alpha))),
  h("fieldset", {}, h("legend", {}, "Hyperparameters (the method's defaults shown; only changed ones are sent)"), hyper, cost),
  h("fieldset", {}, h("legend", {}, "Evaluation and evidence"),
    h("div", { class: "fields" }, evals.map((e) => e.wrap),
      h("label", { for: "eval-max_samples" }, "Questions per eval set", maxSamples),
      h("label", { for: "eval-probe_every" }, "Probe every N steps", probeEvery)),
    h("label", { for: "eval-advanced" }, "More evaluation settings (JSON, merged into eval: criteria, robustness, ...)", advanced,
      h("span", { class: "field-error", id: "eval-advanced-error" }))),
  h("fieldset", {}, h("legend", {}, "Your reference"),
    h("label", { for: "job-metadata" }, "Metadata (key=value, comma-separated)", metadata)),
  alert, submit);
  advanced.setAttribute("aria-describedby", "eval-advanced-error");
  main.append(form);
  showMethod();
}
