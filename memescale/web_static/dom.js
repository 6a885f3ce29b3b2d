// DOM helpers shared by the search page (serve/static/app.js) and the labelling page
// (memescale/quality/static/label.js), loaded before either. Untrusted strings reach a page
// only through textContent or attributes set with setAttribute after a scheme check
// (safeUrl): never through innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function safeUrl(value) {
  // An http(s) URL string, or null: javascript:, data: and other schemes are refused.
  if (typeof value !== "string" || !value) return null;
  try {
    const u = new URL(value, window.location.href);
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
  } catch (e) {
    return null;
  }
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}
