// memescale labelling page: plain DOM, no build step; $, el, safeUrl and setStatus come from
// /common/dom.js. Untrusted strings (titles, subreddits, URLs) only reach the page through textContent or
// attributes set with setAttribute after a scheme check: never through innerHTML.
// Image ids stay strings end to end (64-bit hashes do not fit a JavaScript number).
"use strict";

// channel, row name, keys for the five grades (left much better .. right much better)
const CHANNELS = [["meme", "Meme", "12345"], ["aesthetic", "Aesthetic", "qwert"], ["useful", "Useful", "asdfg"]];
const GRADES = [["left_much_better", "left much better"], ["left_better", "left better"], ["equal", "equal"],
                ["right_better", "right better"], ["right_much_better", "right much better"]];
const CAPTION = new Map(GRADES);
const KEYMAP = new Map(); // key -> [channel, label]

const state = {
  pair: null,       // the /api/pair answer shown; null while the next one loads
  done: new Map(),  // channel -> label stored for the shown pair
  loading: false,
  shown: 0,         // pairs shown so far (body[data-pairs])
  rater: "",
};

function showCounts(data) {
  const n = data.labelled_count;
  $("count").textContent = `${n} label${n === 1 ? "" : "s"} by ${state.rater || "you"} · ${data.total_count} in the store`;
}

// ---------------------------------------------------------------- controls
function buildControls() {
  const box = $("controls");
  for (const [channel, name, keys] of CHANNELS) {
    const row = el("div", { class: "row", "data-channel": channel });
    row.appendChild(el("span", { class: "channel" }, name));
    GRADES.forEach(([label, caption], i) => {
      const b = el("button", { type: "button", "data-channel": channel, "data-label": label,
                               title: `${name}: ${caption} (key ${keys[i]})`, "aria-pressed": "false" });
      b.appendChild(el("kbd", {}, keys[i]));
      b.appendChild(el("span", {}, caption));
      b.addEventListener("click", () => { b.blur(); sendLabel(channel, label); });
      row.appendChild(b);
      KEYMAP.set(keys[i], [channel, label]);
    });
    box.appendChild(row);
  }
}

function markChosen() {
  for (const b of document.querySelectorAll("#controls button")) {
    const chosen = state.done.get(b.dataset.channel) === b.dataset.label;
    b.classList.toggle("chosen", chosen);
    b.setAttribute("aria-pressed", String(chosen));
  }
}

// ---------------------------------------------------------------- the pair
function renderSide(node, item) {
  node.dataset.id = item.image_id;
  const frame = node.querySelector(".frame");
  const placeholder = el("span", { class: "placeholder" }, "image unavailable");
  const src = safeUrl(item.url);
  if (src) {
    const img = el("img", { referrerpolicy: "no-referrer", decoding: "async" });
    img.alt = String(item.title || "");
    // a late error of an image already replaced by the next pair must not touch the new one
    img.addEventListener("error", () => { if (img.isConnected) frame.replaceChildren(placeholder); });
    img.setAttribute("src", src);
    frame.replaceChildren(img);
  } else {
    frame.replaceChildren(placeholder);
  }
  const link = safeUrl(item.permalink);
  const title = link
    ? el("a", { class: "title", href: link, target: "_blank", rel: "noopener noreferrer" }, item.title)
    : el("span", { class: "title" }, item.title);
  node.querySelector("figcaption").replaceChildren(title, el("span", { class: "sub" }, item.subreddit ? "r/" + item.subreddit : ""));
}

async function loadPair() {
  if (state.loading) return;
  state.loading = true;
  state.pair = null;
  try {
    const r = await fetch("/api/pair", { cache: "no-store" });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    state.rater = data.rater;
    state.done = new Map();
    renderSide($("left"), data.left);
    renderSide($("right"), data.right);
    $("source").textContent = data.source === "active" ? "Pair chosen where the model is least sure." : "Random pair.";
    markChosen();
    showCounts(data);
    state.pair = data;
    state.shown += 1;
    document.body.dataset.pairs = String(state.shown);
    document.body.dataset.ready = "1";
  } catch (e) {
    setStatus(`Could not load a pair: ${e.message} (N to retry)`, true);
  } finally {
    state.loading = false;
  }
}

async function sendLabel(channel, label) {
  const pair = state.pair;
  if (!pair) return;
  try {
    const r = await fetch("/api/label", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ left: pair.left.image_id, right: pair.right.image_id, channel, label }),
    });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    showCounts(data);
    setStatus(`Saved ${channel}: ${CAPTION.get(label)}.`);
    if (state.pair !== pair) return;
    state.done.set(channel, label);
    markChosen();
    if (state.done.size === CHANNELS.length) loadPair();
  } catch (e) {
    setStatus(`Not saved: ${e.message}`, true);
  }
}

// ---------------------------------------------------------------- keys
function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const key = e.key.toLowerCase();
  if (key === " " || key === "n") {
    e.preventDefault();
    loadPair();
    return;
  }
  const action = KEYMAP.get(key);
  if (action) {
    e.preventDefault();
    sendLabel(...action);
  }
}

buildControls();
$("skip").addEventListener("click", (e) => { e.currentTarget.blur(); loadPair(); });
document.addEventListener("keydown", onKey);
loadPair();
