// memescale search page: plain DOM, no build step; $, el, safeUrl and setStatus come from
// /common/dom.js. Untrusted strings (titles, subreddits, URLs) only ever reach the page
// through textContent or attributes set with setAttribute after a scheme check: never
// through innerHTML.
"use strict";

const TELEMETRY_KEY = "memescale.telemetry";
const COL_WIDTH = 260;

const state = {
  query: null,        // {text} | {terms} | {like} | {image_url} | {image}: the current query input
  label: "",          // what the status line calls it
  cursor: null,       // next_cursor of the last page
  loading: false,
  seq: 0,             // bumps on every new search; late answers of older ones are dropped
  info: null,
  seen: new Set(),    // ids shown for this query (pages of an approximate search may overlap)
  items: [],          // results shown, in order (re-laid out on resize)
  columns: 0,
};

// ---------------------------------------------------------------- small helpers

function dateToUnix(value) {
  return value ? Math.floor(Date.parse(value + "T00:00:00Z") / 1000) : null;
}

function unixToDate(value) {
  return value ? new Date(Number(value) * 1000).toISOString().slice(0, 10) : "";
}

// ---------------------------------------------------------------- options <-> request
function weightInputs() {
  return Array.from(document.querySelectorAll("#weights input[type=range]"));
}

function currentWeights() {
  const w = {};
  for (const input of weightInputs()) {
    const v = Number(input.value);
    if (v !== 0) w[input.dataset.name] = v;
  }
  return w;
}

function currentFilters() {
  const f = { nsfw: $("nsfw").checked };
  const after = dateToUnix($("after").value);
  const before = dateToUnix($("before").value);
  if (after !== null) f.after = after;
  if (before !== null) f.before = before;
  const subs = subredditList($("subreddits").value);
  if (subs.length) f.subreddits = subs;
  const notSubs = subredditList($("exclude-subreddits").value);
  if (notSubs.length) f.exclude_subreddits = notSubs;
  const score = $("min-score").value.trim();
  if (/^-?[0-9]{1,12}$/.test(score)) f.min_score = Number(score);
  return f;
}

function subredditList(text) {
  return text.split(/[\s,]+/).map((s) => s.replace(/^\/?r\//, "")).filter(Boolean);
}

function pageSize() {
  return (state.info && state.info.default_k) || 24;
}

function requestBody(cursor) {
  const body = Object.assign({}, state.query, {
    k: pageSize(),
    weights: currentWeights(),
    filters: currentFilters(),
    dedup: $("dedup").checked,
  });
  if (cursor) body.cursor = cursor;
  return body;
}

// ---------------------------------------------------------------- multi-term queries
// The search box is the first term; "+ term" adds rows of text and weight (negative: away
// from it). With extra terms the request is {terms: [{text, weight}, ...]}.
function addTermRow(text, weight) {
  const row = el("div", { class: "term" });
  const input = el("input", { class: "term-text", type: "search", maxlength: "1000", "aria-label": "Term text",
                              placeholder: "another term…" });
  input.value = text || "";
  const w = el("input", { class: "term-weight", type: "number", step: "0.1", min: "-10", max: "10",
                          "aria-label": "Term weight" });
  w.value = String(weight === undefined ? -0.5 : weight);
  const remove = el("button", { class: "term-remove", type: "button", "aria-label": "Remove term" }, "×");
  remove.addEventListener("click", () => {
    row.remove();
    showTermWeights();
    if (state.query && state.query.terms) submitText();
  });
  row.append(input, w, remove);
  $("terms").appendChild(row);
  showTermWeights();
  return input;
}

function showTermWeights() {
  $("q-weight").hidden = !document.querySelector("#terms .term");
}

function termWeight(input, fallback) {
  const v = Number(input.value);
  return Number.isFinite(v) && v !== 0 ? Math.max(-10, Math.min(10, v)) : fallback;
}

function extraTerms() {
  return Array.from(document.querySelectorAll("#terms .term"))
    .map((row) => ({ text: row.querySelector(".term-text").value.trim(),
                     weight: termWeight(row.querySelector(".term-weight"), 0) }))
    .filter((t) => t.text && t.weight !== 0);
}

function describeTerms(terms) {
  return terms.map((t, i) => {
    const sign = t.weight < 0 ? "− " : (i ? "+ " : "");
    const w = Math.abs(t.weight) === 1 ? "" : `${Math.abs(t.weight)} × `;
    return `${sign}${w}"${t.text}"`;
  }).join(" ");
}

function submitText() {
  const text = $("q").value.trim();
  if (!text) return;
  const extra = extraTerms();
  if (!extra.length) return startSearch({ text }, `"${text}"`);
  const terms = [{ text, weight: termWeight($("q-weight"), 1) }, ...extra];
  return startSearch({ terms }, describeTerms(terms));
}

// ---------------------------------------------------------------- URL state
function writeUrl(push) {
  const p = new URLSearchParams();
  const q = state.query || {};
  if (q.text !== undefined) p.set("q", q.text);
  if (q.terms) {
    p.set("q", q.terms[0].text);
    if (q.terms[0].weight !== 1) p.set("qw", String(q.terms[0].weight));
    for (const t of q.terms.slice(1)) p.append("t", `${t.weight}:${t.text}`);
  }
  if (q.like !== undefined) p.set("like", String(q.like));
  if (q.image_url !== undefined) p.set("url", q.image_url);
  for (const [k, v] of Object.entries(currentWeights())) p.set("w." + k, String(v));
  const f = currentFilters();
  if (f.nsfw) p.set("nsfw", "1");
  if (f.after) p.set("after", $("after").value);
  if (f.before) p.set("before", $("before").value);
  if (f.subreddits) p.set("sub", f.subreddits.join(","));
  if (f.exclude_subreddits) p.set("xsub", f.exclude_subreddits.join(","));
  if (f.min_score !== undefined) p.set("score", String(f.min_score));
  if (!$("dedup").checked) p.set("dedup", "0");
  const url = p.toString() ? "?" + p.toString() : window.location.pathname;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

function readUrl() {
  const p = new URLSearchParams(window.location.search);
  for (const input of weightInputs()) {
    const v = Number(p.get("w." + input.dataset.name) || 0);
    input.value = Number.isFinite(v) ? String(Math.max(-2, Math.min(2, v))) : "0";
    input.dispatchEvent(new Event("input"));
  }
  $("nsfw").checked = p.get("nsfw") === "1";
  $("dedup").checked = p.get("dedup") !== "0";
  $("after").value = p.get("after") || "";
  $("before").value = p.get("before") || "";
  $("subreddits").value = (p.get("sub") || "").split(",").filter(Boolean).join(", ");
  $("exclude-subreddits").value = (p.get("xsub") || "").split(",").filter(Boolean).join(", ");
  $("min-score").value = /^-?[0-9]{1,12}$/.test(p.get("score") || "") ? p.get("score") : "";
  $("q").value = p.get("q") || "";
  $("q-weight").value = p.get("qw") || "1";
  $("terms").replaceChildren();
  for (const t of p.getAll("t")) {
    const m = /^(-?[0-9]*\.?[0-9]+):(.+)$/.exec(t);
    if (m) addTermRow(m[2], Number(m[1]));
  }
  showTermWeights();
  $("image-url").value = p.get("url") || "";
  if (p.has("q") && p.get("q").trim()) {
    const extra = extraTerms();
    if (!extra.length) return { query: { text: p.get("q") }, label: `"${p.get("q")}"` };
    const terms = [{ text: p.get("q").trim(), weight: termWeight($("q-weight"), 1) }, ...extra];
    return { query: { terms }, label: describeTerms(terms) };
  }
  const like = p.get("like") || "";
  if (/^[0-9]{1,19}$/.test(like)) return { query: { like }, label: `images like ${like}` };
  if (p.get("url")) return { query: { image_url: p.get("url") }, label: "the image at that URL" };
  return null;
}

// ---------------------------------------------------------------- masonry grid
function columnCount() {
  const width = $("grid").clientWidth || window.innerWidth;
  return Math.max(1, Math.floor(width / COL_WIDTH));
}

function layout(force) {
  const n = columnCount();
  if (!force && n === state.columns) return;
  state.columns = n;
  const grid = $("grid");
  grid.replaceChildren();
  for (let i = 0; i < n; i++) grid.appendChild(el("div", { class: "col" }));
  for (const item of state.items) place(item);
}

function place(item) {
  // Shortest column first, using each card's aspect ratio: the layout is final before any
  // image has loaded, so appending a page never moves what is already on screen.
  const cols = Array.from($("grid").children);
  let best = 0;
  for (let i = 1; i < cols.length; i++) if (colHeight(cols[i]) < colHeight(cols[best])) best = i;
  cols[best].appendChild(item.node);
  cols[best].dataset.h = String(colHeight(cols[best]) + item.ratio + 0.25);
}

function colHeight(col) {
  return Number(col.dataset.h || 0);
}

function card(r) {
  const w = Number(r.width) > 0 ? Number(r.width) : 1;
  const h = Number(r.height) > 0 ? Number(r.height) : 1;
  const ratio = Math.min(Math.max(h / w, 0.2), 4);
  const node = el("article", { class: "card", "data-id": String(r.id), "data-image-id": String(r.image_id || "") });
  const frame = el("button", { class: "frame", type: "button", title: "Search by this image" });
  frame.style.aspectRatio = `${w} / ${h}`;
  if (r.image_id) frame.addEventListener("click", () => startSearch({ like: r.image_id }, `images like ${r.image_id}`, r));
  const src = safeUrl(r.url);
  if (src) {
    const img = el("img", { loading: "lazy", decoding: "async", referrerpolicy: "no-referrer", alt: "" });
    img.setAttribute("src", src);
    img.alt = String(r.title || "");
    frame.appendChild(img);
  }
  node.appendChild(frame);
  const meta = el("div", { class: "meta" });
  const link = safeUrl(r.permalink);
  const title = link
    ? el("a", { class: "title", href: link, target: "_blank", rel: "noopener noreferrer" }, r.title)
    : el("span", { class: "title" }, r.title);
  meta.appendChild(title);
  const sub = el("div", { class: "sub" });
  const when = r.created_utc ? new Date(r.created_utc * 1000).toISOString().slice(0, 10) : "";
  sub.textContent = [r.subreddit ? "r/" + r.subreddit : "", when, `sim ${Number(r.similarity).toFixed(3)}`]
    .filter(Boolean).join(" · ");
  if (r.nsfw) sub.appendChild(el("span", { class: "nsfw" }, "NSFW"));
  meta.appendChild(sub);
  node.appendChild(meta);
  return { node, ratio };
}

function clearResults() {
  state.items = [];
  state.seen = new Set();
  state.cursor = null;
  layout(true);
  $("more").hidden = true;
}

function append(results) {
  let added = 0;
  for (const r of results) {
    if (state.seen.has(r.id)) continue;
    state.seen.add(r.id);
    const item = card(r);
    state.items.push(item);
    place(item);
    added++;
  }
  return added;
}

// ---------------------------------------------------------------- searching
async function postSearch(body) {
  const resp = await fetch("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const detail = data && (data.message || data.detail);
    throw new Error(typeof detail === "string" ? detail : `HTTP ${resp.status}`);
  }
  return data;
}

function showQueryImage(src, label) {
  const box = $("query-image");
  const url = src && (src.startsWith("data:image/") ? src : safeUrl(src));
  box.hidden = !url;
  if (url) {
    $("query-thumb").setAttribute("src", url);
    $("query-label").textContent = label;
  }
}

function startSearch(query, label, fromResult) {
  state.query = query;
  state.label = label;
  if (query.text === undefined && !query.terms) {
    $("q").value = "";
    $("terms").replaceChildren();  // terms belong to a text search
    showTermWeights();
  }
  if (fromResult) showQueryImage(fromResult.url, label);
  else if (query.image_url) showQueryImage(query.image_url, label);
  else if (!query.image) showQueryImage(null);
  if (!query.image) writeUrl(true);
  else history.pushState(null, "", window.location.pathname);  // an upload is not shareable
  window.scrollTo(0, 0);
  return runSearch();
}

async function runSearch() {
  if (!state.query) return;
  const seq = ++state.seq;
  state.loading = true;
  setStatus("Searching…");
  const t0 = performance.now();
  try {
    const data = await postSearch(requestBody(null));
    if (seq !== state.seq) return;
    clearResults();
    append(data.results);
    state.cursor = data.next_cursor;
    $("more").hidden = !state.cursor;
    const s = data.stats;
    const ms = Math.round(performance.now() - t0);
    setStatus(data.results.length
      ? `Results for ${state.label} · ${ms} ms (index ${s.ms.toFixed(1)} ms, ${s.reads} reads${s.filtered ? ", filtered" : ""})`
      : `No results for ${state.label}.`);
    track("search", { kind: Object.keys(state.query)[0], results: data.results.length, ms });
  } catch (e) {
    if (seq !== state.seq) return;
    clearResults();
    setStatus(e.message, true);
  } finally {
    if (seq === state.seq) state.loading = false;
  }
  maybeLoadMore();
}

async function loadMore() {
  if (state.loading || !state.cursor || !state.query) return;
  const seq = state.seq;
  state.loading = true;
  $("more").disabled = true;
  try {
    const data = await postSearch(requestBody(state.cursor));
    if (seq !== state.seq) return;
    append(data.results);
    state.cursor = data.next_cursor;
    $("more").hidden = !state.cursor;
    track("page", { offset: data.offset });
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
  } finally {
    $("more").disabled = false;
    if (seq === state.seq) state.loading = false;
  }
  maybeLoadMore();
}

function maybeLoadMore() {
  // Keep loading while the sentinel below the grid is on screen (a short first page).
  const r = $("sentinel").getBoundingClientRect();
  if (r.top < window.innerHeight + 400) loadMore();
}

// ---------------------------------------------------------------- telemetry (opt-out)
function telemetryAllowed() {
  if (localStorage.getItem(TELEMETRY_KEY) === "off") return false;
  if (navigator.doNotTrack === "1" || navigator.globalPrivacyControl === true) return false;
  return true;
}

function track(type, props) {
  if (!telemetryAllowed()) return;
  fetch("/api/telemetry", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ events: [{ type, props, ts: Date.now() / 1000 }] }),
    keepalive: true,
  }).catch(() => {});
}

// ---------------------------------------------------------------- setup
function buildSliders(names) {
  const box = $("weights");
  $("weights-none").hidden = names.length > 0;
  for (const name of names) {
    const label = el("label", { class: "weight" });
    label.appendChild(el("span", {}, name));
    const input = el("input", { type: "range", min: "-2", max: "2", step: "0.1", value: "0",
                                id: "w-" + name, "aria-label": name + " weight" });
    input.dataset.name = name;
    const out = el("output", { for: "w-" + name }, "0");
    input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(1); });
    input.addEventListener("change", () => { if (state.query) { writeUrl(false); runSearch(); } });
    label.appendChild(input);
    label.appendChild(out);
    box.appendChild(label);
  }
}

function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function init() {
  $("telemetry").checked = localStorage.getItem(TELEMETRY_KEY) !== "off";
  $("telemetry").addEventListener("change", (e) => {
    localStorage.setItem(TELEMETRY_KEY, e.target.checked ? "on" : "off");
  });
  $("toggle-options").addEventListener("click", () => {
    const opts = $("options");
    opts.hidden = !opts.hidden;
    $("toggle-options").setAttribute("aria-expanded", String(!opts.hidden));
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submitText();
  });
  $("add-term").addEventListener("click", () => addTermRow("", -0.5).focus());
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = safeUrl($("image-url").value.trim());
    if (url) startSearch({ image_url: url }, "the image at that URL");
    else setStatus("Give an http(s) image URL.", true);
  });
  $("upload").addEventListener("change", async (e) => {
    const file = e.target.files && e.target.files[0];
    if (!file) return;
    const max = (state.info && state.info.max_body_bytes) || 8 * 1024 * 1024;
    if (file.size * 4 / 3 > max - 1024) { setStatus("That image is too large to upload.", true); return; }
    const dataUrl = await fileToBase64(file);
    showQueryImage(dataUrl, file.name);
    startSearch({ image: dataUrl.slice(dataUrl.indexOf(",") + 1) }, `"${file.name}"`);
  });
  for (const id of ["nsfw", "dedup", "after", "before", "subreddits", "exclude-subreddits", "min-score"]) {
    $(id).addEventListener("change", () => { if (state.query) { writeUrl(false); runSearch(); } });
  }
  $("more").addEventListener("click", loadMore);
  new IntersectionObserver((entries) => {
    if (entries.some((en) => en.isIntersecting)) loadMore();
  }, { rootMargin: "400px" }).observe($("sentinel"));
  window.addEventListener("resize", () => layout(false));
  window.addEventListener("popstate", () => fromUrl());

  try {
    const resp = await fetch("/api/info");
    state.info = await resp.json();
    buildSliders(state.info.weights || []);
    if (!state.info.text_search) $("q").placeholder = "This index takes embedding queries only";
    if (state.info.image_search === false) $("by-image").hidden = true;
    setStatus(`${state.info.size.toLocaleString()} images · ${state.info.model}`);
  } catch (e) {
    setStatus("The search service is not reachable.", true);
  }
  layout(true);
  fromUrl();
  document.body.dataset.ready = "1";
}

function fromUrl() {
  const parsed = readUrl();
  if (!parsed) return;
  state.query = parsed.query;
  state.label = parsed.label;
  showQueryImage(parsed.query.image_url || null, parsed.label);
  runSearch();
}

init();
