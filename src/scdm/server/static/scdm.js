// scdm serve: the explorer page (templates/index.html). Plain JavaScript, no build step, no inline
// script (the Content-Security-Policy allows only this file). Every URL starts with ROOT, the
// server's --root-path; URLs the API hands out (figures, CSV links, job status) already do.
"use strict";
const ROOT = document.body.dataset.root || "";
const $ = (id) => document.getElementById(id);
const JSON_POST = {method: "POST", headers: {"Content-Type": "application/json"}};
async function apiResponse(path, opts) {
  const r = await fetch(ROOT + path, Object.assign({credentials: "same-origin"}, opts || {}));
  const ct = r.headers.get("content-type") || "";
  const body = ct.includes("json") ? await r.json() : await r.text();
  if (r.status === 401) throw new Error("Not logged in (or the server restarted): reload the page to log in again.");
  if (!r.ok) throw new Error((body && body.error) || r.statusText);
  return {body, headers: r.headers};
}
async function api(path, opts) { return (await apiResponse(path, opts)).body; }
// a paged list route answers at most the server's page size; X-Total-Count holds the rows of every page
function rowCount(rows, headers) {
  const total = Number(headers.get("X-Total-Count"));
  if (!(total > rows.length)) return plural(rows.length, "row");
  return `${rows.length} of ${plural(total, "row")} shown (the server's page size; best mean first): narrow the filters to see the others`;
}
function esc(v) { return v === null || v === undefined ? "" : String(v).replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";"); }
// a number as `scdm results` prints it (scdm.classify.results.metric_text): 3 decimals, more where 3 would
// claim a whole number it is not (an AUROC of 0.9996 reads 0.9996, not 1.000; an sd of 0.0004, not 0.000)
// toFixed rounds an exact binary half up (0.0625 -> "0.063"); Python, and so the CLI and report, round it
// to even ("0.062"): the exact decimal expansion (toFixed(100)) tells a tie, which then keeps the even digit
function fixedEven(v, digits) {
  const t = v.toFixed(digits), exact = Math.abs(v).toFixed(100), cut = exact.indexOf(".") + 1 + digits;
  if (!/^50*$/.test(exact.slice(cut))) return t;
  const kept = exact.slice(0, digits ? cut : cut - 1);
  return Number(kept[kept.length - 1]) % 2 ? t : (v < 0 ? "-" : "") + kept;
}
function metricText(v) {
  let digits = 3, t = fixedEven(v, digits);
  const whole = Math.abs(v - Math.round(v)) < 1e-12;  // float rounding of a whole number is one
  while (Number.isInteger(Number(t)) && !whole && digits < 15) t = fixedEven(v, ++digits);
  return t;
}
function fmt(v) { return typeof v === "number" && !Number.isInteger(v) ? metricText(v) : (typeof v === "object" && v !== null ? JSON.stringify(v) : v); }
// the SQL console shows numbers as stored (a p-value of 3e-7 is not 0.000); other tables round (full value on hover)
function shown(v, raw) { return raw && typeof v === "number" ? String(v) : fmt(v); }
function showError(el, err) { el.innerHTML = `<span class="err">${esc(err.message || err)}</span>`; }
function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }
// missing values sort last in both directions; numbers as numbers, the rest as text
function compare(x, y) {
  const nx = x === null || x === undefined, ny = y === null || y === undefined;
  if (nx || ny) return nx && ny ? 0 : nx ? 1 : -1;
  if (typeof x === "number" && typeof y === "number") return x - y;
  return String(fmt(x)).localeCompare(String(fmt(y)));
}
// long values (params, telemetry JSON) are cut by CSS; the whole text shows on hover
function cell(v, value) {
  const t = esc(v), whole = typeof value === "number" && Number(v) !== value ? esc(String(value)) : "";
  return t.length > 40 || whole ? `<td title="${whole || t}">${t}</td>` : `<td>${t}</td>`;
}
function table(el, rows, columns, raw) {
  if (!rows.length) { el.innerHTML = "<p>(no rows)</p>"; return; }
  columns = columns || Object.keys(rows[0]);
  let sortKey = null, asc = true;
  function draw() {
    const data = rows.slice();
    if (sortKey) data.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey], missing = x === null || x === undefined || y === null || y === undefined;
      return missing ? compare(x, y) : compare(x, y) * (asc ? 1 : -1);
    });
    el.innerHTML = "<table><thead><tr>" + columns.map(c => `<th data-k="${esc(c)}" title="sort">${esc(c)}${c === sortKey ? (asc ? " ▲" : " ▼") : ""}</th>`).join("") +
      "</tr></thead><tbody>" + data.map(r => "<tr>" + columns.map(c => cell(shown(r[c], raw), r[c])).join("") + "</tr>").join("") + "</tbody></table>";
    el.querySelectorAll("th").forEach(th => th.onclick = () => { const k = th.dataset.k; asc = sortKey === k ? !asc : true; sortKey = k; draw(); });
  }
  draw();
}
document.querySelectorAll("nav a").forEach(a => a.onclick = () => show(a.dataset.tab));
const loaders = {leaderboard: () => {}, figures: () => loadFigures(), models: () => loadModels(), runs: () => loadRuns(),
  sql: () => {}, predict: () => loadPredict(), jobs: () => loadJobs()};
function show(tab) {
  if (!(tab in loaders)) tab = "leaderboard";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("on", a.dataset.tab === tab));
  document.querySelectorAll("section").forEach(s => s.classList.toggle("on", s.id === tab));
  history.replaceState(null, "", "#" + tab);  // a reload stays on the tab
  loaders[tab]();
}
// space_id and split_id are part of a result's identity: two pca spaces (other n_comps) or two partitions of one
// dataset (folds paired with another label set's) differ in them alone (scdm results names them the same way);
// folds_from names the label set whose folds a paired split reuses, as the CLI's "(folds of Gefitinib)"
const LEADERBOARD_COLUMNS = ["model", "variant", "space_id", "datasets", "label_set", "head", "head_params", "scenario", "scheme",
  "k", "seed", "split_id", "folds_from", "category_type", "category", "metric", "mean", "sd", "n_folds", "n_null", "folds_done", "folds_expected", "complete", "note"];
// the caveats `scdm results` prints under the same rows (GET /api/leaderboard/notes), in its words, above the table:
// numbers read without them mislead (a transductive baseline, one-class folds, an incomplete mean, unanswered cells)
function notesHtml(r) {
  const lines = r.left_out.map(t => "results: " + t).concat(r.notes.map(t => "note: " + t));
  return lines.map(t => `<p class="note">${esc(t)}</p>`).join("");
}
// AMI and ARI ignore which class is which (an inverted classifier scores as high as a perfect one): MCC, which is
// signed, comes with them, as scdm results adds it (scdm.classify.results.with_signed_partner)
function withSignedPartner(metrics) {
  const out = [...new Set(metrics)], at = out.findIndex(m => m === "ami" || m === "ari");
  if (at >= 0 && !out.includes("mcc")) out.splice(at, 0, "mcc");
  return out;
}
async function loadLeaderboard(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams([...new FormData($("lb-form"))].filter(([k, v]) => v));
  if (q.get("metric")) q.set("metric", withSignedPartner(q.get("metric").split(",")).join(","));
  $("lb-msg").textContent = "loading..."; $("lb-notes").innerHTML = "";
  try {
    const [{body: rows, headers}, notes] = await Promise.all([apiResponse("/api/leaderboard?" + q),
      api("/api/leaderboard/notes?" + q)]);
    $("lb-msg").textContent = rowCount(rows, headers);
    $("lb-notes").innerHTML = notesHtml(notes);
    table($("lb-table"), rows, LEADERBOARD_COLUMNS);
  } catch (e) { showError($("lb-msg"), e); $("lb-table").innerHTML = ""; }  // e.g. a 422 naming the allowed values
}
$("lb-form").onsubmit = loadLeaderboard;
function figureName(path) { return path.split("/").pop().replace(/\.(png|svg|pdf)$/, ""); }
async function loadFigures() {
  try {
    const r = await api("/api/report/figures");
    $("fig-report").hidden = !r.generated;
    if (r.generated) $("fig-report").href = r.index;
    if (!r.generated) {
      $("fig-list").innerHTML = `<p>No report yet in ${esc(r.folder)}: generate it here (radar, bars, projections, ` +
        `scalability), or write it there with <code>scdm report --out ${esc(r.folder)}</code>.</p>`;
      return;
    }
    // one preview per figure: its PNG, else its SVG; a PDF-only figure is a link
    const byName = new Map();
    for (const f of r.figures) {
      const name = figureName(f), ext = f.split(".").pop(), seen = byName.get(name);
      if (!seen || (ext === "png") || (ext === "svg" && seen.split(".").pop() === "pdf")) byName.set(name, f);
    }
    if (!byName.size) {
      $("fig-list").innerHTML = "<p>The report has no figures (the store had no results to draw when it was written); " +
        "open the full report, or generate it again.</p>";
      return;
    }
    // figures of a report written before the results changed read as today's: say so above them
    const outdated = r.current === false ? `<p class="note">The store's results changed after this report was written ` +
      `(results added, fitted again or removed, e.g. by a re-ingest with other labels): these figures show the earlier ` +
      `ones. Generate the report again.</p>` : "";
    $("fig-list").innerHTML = `<div class="notes">${outdated}</div>` + [...byName.values()].map(f => f.endsWith(".pdf")
      ? `<figure><a href="${esc(f)}" target="_blank">${esc(figureName(f))} (PDF)</a></figure>`
      : `<figure data-src="${esc(f)}"><img src="${esc(f)}" alt="${esc(figureName(f))}"><figcaption>${esc(figureName(f).replace(/_/g, " "))}</figcaption></figure>`).join("");
    $("fig-list").querySelectorAll("figure[data-src]").forEach(fig => fig.onclick = () => openFigure(fig.dataset.src, r.figures));
  } catch (e) { showError($("fig-list"), e); }
}
function openFigure(src, all) {
  const svg = src.replace(/\.png$/, ".svg");
  $("fig-view-img").src = src; $("fig-view-img").alt = figureName(src);
  $("fig-view-name").textContent = figureName(src).replace(/_/g, " ");
  $("fig-view-svg").href = svg; $("fig-view-svg").hidden = !all.includes(svg);
  $("fig-view").hidden = false; $("fig-view").scrollIntoView();
}
$("fig-view-close").onclick = () => { $("fig-view").hidden = true; };
function stageText(j) { return j.state === "queued" ? `queued (position ${j.position || "?"})...` : j.stage + "..."; }
async function waitJob(job, onTick) {
  for (;;) {
    const j = await api("/api/jobs/" + job.job_id);
    onTick(j);
    if (!["queued", "running"].includes(j.state)) return j;
    await new Promise(r => setTimeout(r, 300));
  }
}
// what a job warned of, as the scdm command doing the same work prints it (GET /api/jobs/{id}: warnings); lines
// already shown as notes are not repeated
function warningsHtml(j, shownAlready) {
  return (j.warnings || []).filter(t => !(shownAlready || []).includes(t)).map(t => `<p class="note">${esc(t)}</p>`).join("");
}
function jobHtml(j) {
  const when = new Date(j.created_at * 1000).toISOString().slice(0, 19).replace("T", " ");
  const what = j.state === "queued" ? stageText(j) : j.message || j.stage;
  const made = j.result && j.result.dataset ? ` (dataset ${esc(j.result.dataset)})` : "";
  return `<div class="job" data-job="${esc(j.job_id)}"><strong>${esc(j.kind)} ${esc(j.job_id)}</strong> ${esc(when)} UTC: ` +
    `<span class="state">${esc(j.state)}</span>${made}: ${esc(what)}<div class="notes">${warningsHtml(j)}</div></div>`;
}
let JOBS_TIMER = null;
async function loadJobs() {
  clearTimeout(JOBS_TIMER);
  if (!$("jobs-list").innerHTML) $("jobs-msg").textContent = "loading...";
  try {
    const jobs = await api("/api/jobs");
    $("jobs-msg").textContent = jobs.length ? plural(jobs.length, "job") : "No jobs in this server run yet.";
    $("jobs-list").innerHTML = jobs.map(jobHtml).join("");
    // a queued or running job is read again until it ends, while the tab is open: a state shown once would go stale
    if (jobs.some(j => ["queued", "running"].includes(j.state)) && $("jobs").classList.contains("on")) JOBS_TIMER = setTimeout(loadJobs, 1000);
  } catch (e) { showError($("jobs-msg"), e); $("jobs-list").innerHTML = ""; }
}
$("jobs-reload").onclick = () => loadJobs();
$("fig-make").onclick = async () => {
  $("fig-make").disabled = true;
  try {
    const j = await waitJob(await api("/api/report", Object.assign({body: "{}"}, JSON_POST)), j => $("fig-msg").textContent = stageText(j));
    if (j.state !== "done") throw new Error(j.message);
    $("fig-msg").textContent = "report ready"; $("fig-msg").insertAdjacentHTML("beforeend", `<span class="notes">${warningsHtml(j)}</span>`);
    await loadFigures();
  } catch (e) { showError($("fig-msg"), e); } finally { $("fig-make").disabled = false; }
};
async function loadModels() {
  try {
    const models = await api("/api/models");
    $("model-list").innerHTML = models.length ? models.map(m => `<button data-m="${esc(m.model)}">${esc(m.model)} (${plural(m.n_embeddings, "embedding")})</button>`).join("")
      : "<p>No embeddings yet: run <code>scdm embed</code>.</p>";
    $("model-list").querySelectorAll("button").forEach(b => b.onclick = () => loadModel(b.dataset.m));
  } catch (e) { showError($("model-msg"), e); }
}
async function loadModel(name) {
  try {
    const m = await api("/api/models/" + encodeURIComponent(name));
    $("model-msg").textContent = ""; $("model-name").textContent = name;
    const d = $("model-detail"); d.innerHTML = "<h3>Embeddings</h3><div id=me></div><h3>Leaderboard (all cells)</h3><div id=mn class=notes></div><div id=ml></div><h3>Trained heads</h3><div id=mh></div>";
    // space_id ties an embedding to its leaderboard rows; the checkpoint (org/name@commit or the folder) tells two
    // embeddings of one model and dataset apart, as scdm ls prints them
    table($("me"), m.embeddings, ["embedding_id", "dataset_name", "variant", "space_id", "checkpoint_source", "dim", "status",
      "n_cells", "note", "params", "telemetry"]);
    $("mn").innerHTML = notesHtml(m);
    table($("ml"), m.leaderboard, ["variant", "space_id", "datasets", "label_set", "head", "head_params", "scenario", "scheme", "k",
      "seed", "split_id", "folds_from", "metric", "mean", "sd", "n_folds", "folds_done", "folds_expected", "complete", "note"]);
    // revision_note and note say why a head's predictions may be wrong now (an older revision fitted it; an older
    // gene table), as GET /api/heads and scdm predict's warning say; threshold turns its probabilities into labels
    table($("mh"), m.trained_heads, ["head_id", "head", "datasets", "label_set", "category_type", "category", "n_train", "threshold",
      "revision_note", "note", "created_at"]);
  } catch (e) { showError($("model-msg"), e); }
}
// GET /api/runs answers oldest first; the tab lists newest first, times as stored (UTC, to the second)
const RUN_COLUMNS = ["kind", "state", "status", "started", "finished", "tasks", "fitted", "reused", "skipped", "target",
  "n_source", "n_target", "label_set", "heads", "seconds", "run_id"];
function when(iso) { return iso ? String(iso).replace("T", " ").slice(0, 19) : null; }
function runRows(runs) {
  return runs.slice().reverse().map(r => ({kind: r.kind, state: r.state, status: r.status, started: when(r.created_at),
    finished: when(r.finished_at), tasks: r.n_tasks, fitted: r.n_done, reused: r.n_reused, skipped: r.n_skipped,
    target: r.target, n_source: r.n_source, n_target: r.n_target, label_set: r.label_set, heads: r.heads,
    seconds: r.seconds, run_id: r.run_id}));
}
function runSummary(runs) {
  const states = {};
  runs.forEach(r => { states[r.state] = (states[r.state] || 0) + 1; });
  return plural(runs.length, "run") + (runs.length ? ": " + Object.entries(states).map(([s, n]) => `${n} ${s}`).join(", ") : "");
}
async function loadRuns() {
  $("runs-msg").textContent = "loading...";
  try {
    const runs = await api("/api/runs");
    $("runs-msg").textContent = runSummary(runs);
    table($("runs-table"), runRows(runs), RUN_COLUMNS);
  } catch (e) { showError($("runs-msg"), e); $("runs-table").innerHTML = ""; }
}
async function runSql() {
  $("sql-msg").textContent = "running...";
  try {
    const r = await api("/api/sql", Object.assign({body: JSON.stringify({query: $("sql-text").value, max_rows: 500})}, JSON_POST));
    $("sql-msg").textContent = `${plural(r.n_rows, "row")}${r.truncated ? " (truncated)" : ""} in ${r.seconds} s`;
    table($("sql-table"), r.rows, r.columns, true);
  } catch (e) { showError($("sql-msg"), e); $("sql-table").innerHTML = ""; }
}
$("sql-run").onclick = runSql;
$("sql-text").onkeydown = (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runSql(); } };
// heads of one model and category trained on two drugs' labels (JHU006's Gefitinib and Vorinostat) differ in
// their label set and training datasets alone: both are named, so the head predicts the drug the user means
function headText(h) {
  const on = Array.isArray(h.datasets) ? h.datasets.join(",") : h.datasets;
  return `${h.head_id} ${h.head} on ${h.model}${h.variant && h.variant !== "frozen" ? " " + h.variant : ""} ` +
    `(${h.category_type}=${h.category}): ${h.label_set || "default labels"} of ${on}`;
}
async function loadPredict() {
  try {
    const [heads, datasets] = await Promise.all([api("/api/heads"), api("/api/datasets")]);
    $("pred-head").innerHTML = heads.map(h => `<option value="${esc(h.head_id)}">${esc(headText(h))}</option>`).join("");
    $("pred-dataset").innerHTML = datasets.map(d => `<option>${esc(d.name)}</option>`).join("");
    $("pred-submit").disabled = !heads.length || !datasets.length;
    if (!heads.length) $("pred-msg").textContent = "No trained heads yet: train one with `scdm train-head`.";
    else if (!datasets.length) $("pred-msg").textContent = "No datasets yet: ingest one with `scdm ingest`.";
  } catch (e) { showError($("pred-msg"), e); }
}
let PRED_ROWS = 200;  // rows of the prediction table (the CSV holds every cell)
$("pred-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const body = Object.fromEntries(new FormData($("pred-form")));
  const bar = $("pred-progress"); bar.hidden = false; bar.value = 0; $("pred-csv").hidden = true; $("pred-table").innerHTML = "";
  $("pred-notes").innerHTML = "";
  $("pred-submit").disabled = true; $("pred-msg").textContent = "submitting...";
  try {
    const job = await api("/api/jobs/predict", Object.assign({body: JSON.stringify(body)}, JSON_POST));
    const j = await waitJob(job, j => { bar.value = j.progress; $("pred-msg").textContent = stageText(j); });
    if (j.state !== "done") throw new Error(j.message);
    bar.value = 1; $("pred-msg").textContent = `${plural(j.result.n_cells, "cell")}, ${j.result.n_sensitive} predicted sensitive (mean probability ${metricText(j.result.mean_proba)})` +
      (j.result.n_trained_on ? `; ${j.result.n_trained_on} of them trained the head (column trained_on): fitted values, not held-out predictions` : "");
    // the warnings scdm predict prints about these predictions, in its words: a training score read as held-out misleads
    $("pred-notes").innerHTML = (j.result.notes || []).map(t => `<p class="note">note: ${esc(t)}</p>`).join("") +
      warningsHtml(j, j.result.notes);
    $("pred-csv").href = j.result.csv_url; $("pred-csv").hidden = false;
    const {body: rows, headers} = await apiResponse(`/api/predictions?head_id=${encodeURIComponent(j.result.head_id)}&dataset=${encodeURIComponent(body.dataset)}&limit=${PRED_ROWS}`);
    // the table holds the first cells only: sorting it by proba ranks those, not the dataset
    const total = Number(headers.get("X-Total-Count"));
    if (total > rows.length) $("pred-notes").innerHTML += `<p class="note">The table shows the first ${rows.length} of ${plural(total, "cell")} (sorting orders these only); the CSV holds all ${total}.</p>`;
    table($("pred-table"), rows, ["cell_id", "proba", "label", "response", "label_set", "trained_on"]);
  } catch (e) { showError($("pred-msg"), e); bar.hidden = true; } finally { $("pred-submit").disabled = false; }
};
loadLeaderboard();
show(location.hash.slice(1));
