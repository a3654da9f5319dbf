// Markdown to safe DOM in the browser, for an answer while it streams. The
// finished answer is the server's HTML (conversations/rendering.py); this
// renders the same way so that the swap to it changes nothing on screen:
//
// - markdown-it 14.1.0, the version markdown-it-py (the server's parser) is a
//   port of, with the same options: CommonMark, tables, strikethrough, raw
//   HTML off, no linkify;
// - DOMPurify 3.5.0 with the server's allow-list (nh3 there): the same tags,
//   the same attributes per tag, http/https/mailto links that open in a new
//   tab without an opener;
// - highlight.js 11.12.0 (its common languages) for code; its token classes
//   are coloured like the server's Pygments ones.
//
// The three are vendored, pinned, under static/vendor/ (no CDN, no build step)
// and loaded once, when the first answer streams (see `loadMarkdown`).

import "../vendor/markdown-it-14.1.0/markdown-it.min.js"; // UMD: sets globalThis.markdownit
import DOMPurify from "../vendor/dompurify-3.5.0/purify.es.js";
import hljs from "../vendor/highlight.js-11.12.0/highlight.min.js";

// conversations/rendering.py: ALLOWED_TAGS, ALLOWED_ATTRIBUTES, url_schemes.
const ALLOWED_TAGS = [
  "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "span", "blockquote",
  "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "a",
  "table", "thead", "tbody", "tr", "th", "td",
];
const ALLOWED_ATTRIBUTES = {
  a: new Set(["href", "title"]),
  code: new Set(["class"]),
  span: new Set(["class"]),
  pre: new Set(["class"]),
  ol: new Set(["start"]),
};
// http, https and mailto, or a relative address (no scheme at all).
const ALLOWED_URI = /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i;

const purifier = DOMPurify(window);
purifier.addHook("uponSanitizeAttribute", (node, data) => {
  const allowed = ALLOWED_ATTRIBUTES[node.nodeName.toLowerCase()];
  if (!allowed || !allowed.has(data.attrName)) data.keepAttr = false;
});
purifier.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});
const PURIFY = {
  ALLOWED_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "start", "target", "rel"],
  ALLOWED_URI_REGEXP: ALLOWED_URI,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

function highlight(code, lang) {
  const name = (lang || "").trim();
  if (!name || !hljs.getLanguage(name)) return ""; // markdown-it escapes it
  try {
    return hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
  } catch {
    return "";
  }
}

const md = globalThis.markdownit("commonmark", { html: false, linkify: false, highlight });
md.enable(["table", "strikethrough"]);

// Block tokens of `source` (markdown-it's `parse`), for `render` below.
export function parse(source) {
  return md.parse(source, {});
}

// A sanitised fragment for `tokens` (a run of whole blocks of one parse).
export function render(tokens) {
  return purifier.sanitize(md.renderer.render(tokens, md.options, {}), PURIFY);
}
