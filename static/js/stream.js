// The answer streaming in the conversation shown, if any: its deltas in `seq`
// order (a gap asks the server for a snapshot), formatted as they arrive
// (live.js), and the swap to the server's HTML when it finishes.

import { MEASURE, createLiveAnswer, loadMarkdown } from "./live.js";
import { make } from "./dom.js";

const REJOIN_AFTER = 4000; // ms before asking again for a snapshot after a gap

export function createStream({ messages, scroller, askSnapshot, onChange }) {
  // {id, el, live, lastSeq, rejoinAt}
  let current = null;

  // Make `id` the streaming answer (its article is made if the page has none).
  function begin(id, article) {
    article = article || messages.find(id) || messages.addAssistant(id);
    article.dataset.status = "streaming";
    article.setAttribute("aria-busy", "true");
    const meta = article.querySelector(".msg-meta");
    if (meta) meta.replaceChildren();
    if (current && current.id === id && current.el === article) {
      onChange();
      return current; // already following it
    }
    if (current) current.live.close();
    let body = article.querySelector(".msg-body");
    if (!body) {
      body = make("div", "msg-body");
      article.prepend(body);
    }
    const shown = body.textContent; // a page loaded mid-answer: its text so far
    body.className = "msg-body";
    const live = createLiveAnswer(body, { enhance: messages.enhanceProse, onRender: () => scroller.toBottom() });
    if (shown) live.reset(shown);
    current = { id, el: article, live, lastSeq: 0, rejoinAt: 0 };
    onChange();
    return current;
  }

  const forId = (id) => (current && current.id === id ? current : begin(id));

  function end() {
    if (current) {
      current.live.close();
      current.el.removeAttribute("aria-busy");
    }
    current = null;
    onChange();
    scroller.update();
  }

  function snapshot(frame) {
    const s = forId(frame.message);
    if (frame.seq < s.lastSeq) return; // older than what we show
    s.live.reset(frame.content);
    s.lastSeq = frame.seq;
    s.rejoinAt = 0;
  }

  function delta(frame) {
    const s = forId(frame.message);
    if (frame.seq <= s.lastSeq) return; // already shown
    if (frame.seq === s.lastSeq + 1) {
      s.live.append(frame.text);
      s.lastSeq = frame.seq;
      s.rejoinAt = 0;
      return;
    }
    // A gap: ask for a snapshot once (again after a while if none came).
    const now = Date.now();
    if (!s.rejoinAt || now - s.rejoinAt > REJOIN_AFTER) {
      s.rejoinAt = now;
      askSnapshot(s.lastSeq);
    }
  }

  // `generation.finished`: the server's HTML replaces what streamed. True
  // when no other answer streams here now (the caller then calls `end`).
  function finish(frame) {
    const mine = Boolean(current) && current.id === frame.message;
    const article = mine ? current.el : messages.find(frame.message) || messages.addAssistant(frame.message);
    if (mine) current.live.close();
    const started = performance.now();
    messages.showFinal(article, frame);
    if (MEASURE) performance.measure("live-swap", { start: started });
    return mine || !current;
  }

  // The parser loads while the page is idle, before the first answer needs it.
  (window.requestIdleCallback || setTimeout)(() => loadMarkdown());

  return {
    begin,
    end,
    snapshot,
    delta,
    finish,
    current: () => current,
    isStreaming: () => Boolean(current),
    lastSeq: () => (current ? current.lastSeq : 0),
  };
}
