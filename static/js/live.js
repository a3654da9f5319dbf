// An answer formatted while it streams: headings, lists, tables, links and
// (highlighted) code appear as their text arrives; an unclosed code fence is
// an open code block. Cheap at any length: the text is split into blocks that
// can no longer change (every block but the last: markdown never reaches back
// into a block once a later one has started) and the last one. Finished
// blocks are rendered once and kept; only the last block is parsed and
// rendered again, at most once per frame (less often if that gets slow).
//
// Until the markdown modules have loaded (they load on the first answer), the
// text shows as plain text, as before.

// bench/page_render.py opens the page with #measure: each render leaves a
// `live-render` performance measure.
export const MEASURE = location.hash === "#measure";
const SLOW_RENDER_MS = 8; // a render slower than this spaces the next ones out
// Blocks whose last element holds the text that grows.
const CONTAINERS = /^(UL|OL|LI|BLOCKQUOTE|TABLE|THEAD|TBODY|TR|DIV|PRE)$/;
// A last line of markers only ("-", "##", "```", "1.") is held back until it
// has text or ends: shown alone it would flash as something else for a frame
// (a lone "-" under a paragraph is a setext heading underline).
const MARKERS_ONLY = /^ {0,3}(?:[-=*_+#`~>|]+|\d{1,9}[.)]?)$/;

let markdown = null;
let loading = null;

// Load the parser and sanitiser (once); resolves to the module or null.
export function loadMarkdown() {
  if (!loading) {
    loading = import("./markdown.js").then(
      (module) => (markdown = module),
      () => null, // stays plain text; the finished answer is the server's HTML anyway
    );
  }
  return loading;
}

function textAfter(node) {
  for (let n = node.nextSibling; n; n = n.nextSibling) if (n.nodeType === 3 && n.data.trim()) return true;
  return false;
}

// Offset in `text` of the start of line `line` (0-based).
function lineOffset(text, line) {
  let at = 0;
  for (let i = 0; i < line; i++) {
    const next = text.indexOf("\n", at);
    if (next < 0) return text.length;
    at = next + 1;
  }
  return at;
}

// `body` is the answer's `.msg-body`; `enhance(fragment)` adds what the page
// adds to rendered HTML (code block heads and their copy buttons).
export function createLiveAnswer(body, { enhance, onRender }) {
  let source = ""; // the whole text so far
  let done = 0; // source[0:done] is rendered for good (finished blocks)
  let live = []; // the nodes of the last block(s), replaced on each render
  let plain = null; // the text node used until markdown is loaded
  let scheduled = 0;
  let timer = 0;
  let closed = false;
  const caret = document.createElement("span");
  caret.className = "stream-caret";
  caret.setAttribute("aria-hidden", "true");

  body.classList.remove("msg-text");
  body.classList.add("prose");
  body.replaceChildren(caret); // before the first token: the caret alone

  function schedule() {
    if (scheduled || timer || closed) return;
    scheduled = requestAnimationFrame(() => {
      scheduled = 0;
      render();
    });
  }

  function renderPlain() {
    if (!plain) {
      plain = document.createTextNode("");
      body.classList.add("msg-text");
      body.replaceChildren(plain, caret);
    }
    plain.data = source;
  }

  function render() {
    if (closed) return;
    if (!markdown) {
      renderPlain();
      loadMarkdown().then((module) => module && schedule());
      if (onRender) onRender();
      return;
    }
    if (plain) {
      plain = null;
      body.classList.remove("msg-text");
      body.replaceChildren();
      done = 0;
      live = [];
    }
    const started = performance.now();
    let tail = source.slice(done);
    const cut = tail.lastIndexOf("\n") + 1;
    if (MARKERS_ONLY.test(tail.slice(cut))) tail = tail.slice(0, cut);
    const tokens = markdown.parse(tail);
    // Top-level blocks: their opening (or only) token at level 0.
    let last = -1;
    for (let i = 0; i < tokens.length; i++) {
      if (tokens[i].level === 0 && tokens[i].nesting >= 0 && tokens[i].map) last = i;
    }
    for (const node of live) node.remove();
    live = [];
    let liveTokens = tokens;
    if (last > 0) {
      // Everything before the last block is final: render it once, keep it.
      const finished = markdown.render(tokens.slice(0, last));
      enhance(finished);
      body.append(finished);
      done += lineOffset(tail, tokens[last].map[0]);
      liveTokens = tokens.slice(last);
    }
    const fragment = markdown.render(liveTokens);
    enhance(fragment);
    live = [...fragment.childNodes];
    body.append(fragment);
    placeCaret();
    if (onRender) onRender();
    // Long last blocks (a big code block) cost more per render: space them out.
    const cost = performance.now() - started;
    if (MEASURE) performance.measure("live-render", { start: started });
    if (cost > SLOW_RENDER_MS) {
      timer = setTimeout(() => {
        timer = 0;
        schedule();
      }, cost * 4);
    }
  }

  // The blinking caret goes at the end of the text, inside the last block
  // (after it, it would take a line of its own and vanish at the swap). Code
  // and tables stream visibly enough without one.
  function placeCaret() {
    let target = body.lastElementChild;
    while (target && CONTAINERS.test(target.tagName) && target.lastElementChild && !textAfter(target.lastElementChild)) {
      target = target.lastElementChild;
    }
    if (!target) target = body;
    if (target !== body && (/^(CODE|PRE|TABLE|TR|HR)$/.test(target.tagName) || target.closest(".code-block"))) {
      caret.remove();
      return;
    }
    target.append(caret);
  }

  return {
    // Text that follows what is shown.
    append(text) {
      source += text;
      schedule();
    },
    // The whole text (a snapshot): start again from it.
    reset(text) {
      source = text;
      done = 0;
      for (const node of live) node.remove();
      live = [];
      plain = null;
      body.replaceChildren(caret);
      schedule();
    },
    text: () => source,
    // Stop rendering (the answer finished; the server's HTML takes over).
    close() {
      closed = true;
      cancelAnimationFrame(scheduled);
      clearTimeout(timer);
      caret.remove();
    },
  };
}
