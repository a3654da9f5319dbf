// The chat page: the client side of the websocket contract in DESIGN.md.
//
// Plain ES module, no build step. Model text is only ever inserted as text
// nodes; the one place that sets innerHTML is `generation.finished`, whose
// `html` the server has already sanitised.

const $ = (id) => document.getElementById(id);

const configEl = $("chat-config");
const config = configEl ? JSON.parse(configEl.textContent) : null;

const STATUS_LABELS = {
  stopped: "Stopped",
  truncated: "Truncated: length limit reached",
  failed: "Failed",
  interrupted: "Interrupted",
};
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 10000;
const REJOIN_AFTER = 4000; // ms before asking again for a snapshot after a gap
const STICK_THRESHOLD = 48; // px from the bottom that still counts as "at the bottom"

const el = {
  messages: $("messages"),
  inner: $("messages-inner"),
  form: $("composer"),
  input: $("composer-input"),
  send: $("send-button"),
  stop: $("stop-button"),
  promptPick: $("prompt-pick"),
  promptSelect: $("prompt-select"),
  error: $("chat-error"),
  errorText: $("chat-error-text"),
  errorClose: $("chat-error-close"),
  conn: $("connection-status"),
  convList: $("conversation-list"),
  convEmpty: $("conversation-empty"),
  convMenu: $("conv-menu"),
  title: $("chat-title"),
  charCount: $("char-count"),
};

const state = {
  conversation: config ? config.conversation : null,
  socket: null,
  backoff: BACKOFF_MIN,
  reconnectTimer: null,
  ended: false, // 4401: the session is gone, never reconnect
  everOpened: false,
  // client_id -> {frame, el, confirmed}
  pending: new Map(),
  // The answer streaming in the current conversation, if any:
  // {id, el, body, text (Text node), lastSeq, rejoinAt}
  streaming: null,
  stopRequested: false,
  refocus: false,
  stickToBottom: true,
};

// --- DOM helpers ------------------------------------------------------------------

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function findMessage(id) {
  if (!id) return null;
  return el.inner.querySelector(`.msg[data-message-id="${CSS.escape(id)}"]`);
}

function removeEmptyState() {
  const empty = $("empty-state");
  if (empty) empty.remove();
}

function formatCost(cost) {
  const n = Number(cost);
  if (!Number.isFinite(n) || n === 0) return "0";
  return n.toFixed(6);
}

function setMeta(article, status, usage, model) {
  let meta = article.querySelector(".msg-meta");
  if (!meta) {
    meta = make("div", "msg-meta");
    article.append(meta);
  }
  meta.replaceChildren();
  if (STATUS_LABELS[status]) meta.append(make("span", "msg-status", STATUS_LABELS[status]));
  // A request the model refused (401, 429 ...) costs nothing and shows no usage.
  if (usage && (usage.prompt_tokens || usage.completion_tokens)) {
    const parts = [];
    if (model) parts.push(model);
    parts.push(`${usage.prompt_tokens} in`, `${usage.completion_tokens} out`, `$${formatCost(usage.cost)}`);
    meta.append(make("span", "msg-usage", parts.join(" · ")));
  }
}

// --- Scrolling -----------------------------------------------------------------------

function atBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < STICK_THRESHOLD;
}

function scrollToBottom(force = false) {
  if (force) state.stickToBottom = true;
  if (state.stickToBottom) el.messages.scrollTop = el.messages.scrollHeight;
}

// --- Messages ------------------------------------------------------------------------

function addUserMessage({ id = "", clientId = "", status, content }) {
  removeEmptyState();
  const article = make("article", "msg msg-user");
  article.dataset.messageId = id;
  if (clientId) article.dataset.clientId = clientId;
  article.dataset.status = status;
  article.dataset.role = "user";
  article.setAttribute("aria-label", "You");
  article.append(make("div", "msg-body msg-text", content));
  el.inner.append(article);
  return article;
}

function setUserPendingLabel(article, text) {
  let meta = article.querySelector(".msg-meta");
  if (!text) {
    if (meta) meta.remove();
    return;
  }
  if (!meta) {
    meta = make("div", "msg-meta");
    article.append(meta);
  }
  meta.replaceChildren(make("span", "msg-status", text));
}

function addAssistantMessage(id) {
  removeEmptyState();
  const article = make("article", "msg msg-assistant");
  article.dataset.messageId = id;
  article.dataset.status = "streaming";
  article.dataset.role = "assistant";
  article.setAttribute("aria-label", "Assistant");
  article.append(make("div", "msg-body msg-text"));
  article.append(make("div", "msg-meta"));
  el.inner.append(article);
  return article;
}

// Make `id` the streaming answer; its body becomes one text node we append to.
function beginStreaming(id, article) {
  article = article || findMessage(id) || addAssistantMessage(id);
  article.dataset.status = "streaming";
  let body = article.querySelector(".msg-body");
  if (!body) {
    body = make("div", "msg-body");
    article.prepend(body);
  }
  body.className = "msg-body msg-text";
  const text = document.createTextNode(body.textContent);
  body.replaceChildren(text);
  const previous = state.streaming && state.streaming.id === id ? state.streaming : null;
  state.streaming = { id, el: article, body, text, lastSeq: previous ? previous.lastSeq : 0, rejoinAt: 0 };
  el.messages.setAttribute("aria-busy", "true");
  updateComposer();
  return state.streaming;
}

function streamFor(id) {
  if (state.streaming && state.streaming.id === id) return state.streaming;
  return beginStreaming(id);
}

function endStreaming() {
  state.streaming = null;
  el.messages.removeAttribute("aria-busy");
  updateComposer();
}

// --- Composer ------------------------------------------------------------------------

function waitingForAnswer() {
  for (const p of state.pending.values()) if (!p.failed && !p.confirmed) return true;
  return false;
}

function updateComposer() {
  const streaming = Boolean(state.streaming);
  const busy = streaming || waitingForAnswer() || state.ended;
  const hadFocus = document.activeElement === el.input;
  el.input.disabled = busy;
  el.send.disabled = busy;
  el.send.hidden = streaming;
  el.stop.hidden = !streaming || state.ended;
  if (streaming) el.stop.disabled = Boolean(state.stopRequested);
  el.form.classList.toggle("is-busy", busy);
  if (!busy && (hadFocus || document.activeElement === document.body || state.refocus)) {
    state.refocus = false;
    el.input.focus({ preventScroll: true });
  }
}

function autoGrow() {
  // CSSOM writes are allowed by the CSP (only style attributes in markup are not).
  el.input.style.height = "auto";
  const borders = el.input.offsetHeight - el.input.clientHeight;
  el.input.style.height = `${el.input.scrollHeight + borders}px`;
  const len = el.input.value.length;
  const max = config.maxChars;
  const near = len > max * 0.8;
  el.charCount.hidden = !near;
  if (near) el.charCount.textContent = `${len} / ${max}`;
}

function showError(text) {
  el.errorText.textContent = text;
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

// --- Sidebar ----------------------------------------------------------------------------

function sidebarLink(id) {
  return el.convList.querySelector(`a[data-conversation-id="${CSS.escape(id)}"]`);
}

function upsertSidebar(id, title, { top = true, fallback = "New chat" } = {}) {
  let link = sidebarLink(id);
  if (!link) {
    link = make("a", "conv-link", fallback);
    link.href = `/c/${id}/`;
    link.dataset.conversationId = id;
    const li = make("li");
    li.append(link);
    el.convList.prepend(li);
  } else if (top) {
    el.convList.prepend(link.parentElement);
  }
  if (title) {
    link.textContent = title;
    link.title = title;
  }
  if (el.convEmpty) el.convEmpty.hidden = true;
  highlightCurrent();
}

function highlightCurrent() {
  for (const link of el.convList.querySelectorAll("a.conv-link")) {
    const current = link.dataset.conversationId === state.conversation;
    link.classList.toggle("is-current", current);
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function setTitle(title) {
  el.title.textContent = title;
  document.title = `${title} · Chat`;
}

function adoptConversation(id, title) {
  if (state.conversation === id) return;
  state.conversation = id;
  history.replaceState(null, "", `/c/${id}/`);
  if (el.promptPick) el.promptPick.hidden = true;
  if (title) setTitle(title);
  highlightCurrent();
}

// --- Socket -----------------------------------------------------------------------------

function send(frame) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function join(withAfter) {
  if (!state.conversation) return;
  const frame = { type: "conversation.join", conversation: state.conversation };
  // `after` says "I was following an answer": if it has ended meanwhile, the
  // server replays its `generation.finished`.
  if (withAfter || state.streaming) frame.after = state.streaming ? state.streaming.lastSeq : 0;
  send(frame);
}

function connect() {
  clearTimeout(state.reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}${config.wsPath}`);
  state.socket = socket;

  socket.addEventListener("open", () => {
    const rejoin = state.everOpened;
    state.everOpened = true;
    state.backoff = BACKOFF_MIN;
    setConnectionStatus(null);
    // On load: follow the conversation; after a reconnect: say how far we got.
    join(rejoin);
    // Anything sent but never acknowledged goes again: the same client_id
    // never makes a second message or answer.
    for (const pending of state.pending.values()) {
      if (!pending.failed && !pending.confirmed && send(pending.frame)) setUserPendingLabel(pending.el, null);
    }
  });

  socket.addEventListener("message", (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    const handler = handlers[frame.type];
    if (handler) handler(frame);
  });

  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 4401) {
      sessionEnded();
      return;
    }
    setConnectionStatus("Reconnecting…");
    const delay = state.backoff;
    state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX);
    state.reconnectTimer = setTimeout(connect, delay);
  });
}

function setConnectionStatus(text) {
  el.conn.replaceChildren();
  el.conn.hidden = !text;
  el.conn.classList.remove("is-ended");
  if (text) el.conn.textContent = text;
}

function sessionEnded() {
  state.ended = true;
  el.conn.replaceChildren();
  el.conn.classList.add("is-ended");
  el.conn.append("Your session has ended — ");
  const link = make("a", "", "log in again");
  const next = encodeURIComponent(location.pathname);
  link.href = `${el.conn.dataset.loginUrl || "/accounts/login/"}?next=${next}`;
  el.conn.append(link);
  el.conn.hidden = false;
  updateComposer();
}

// --- Frames from the server -----------------------------------------------------------------

function isCurrent(frame) {
  return Boolean(state.conversation) && frame.conversation === state.conversation;
}

const handlers = {
  "conversation.created"(frame) {
    const c = frame.conversation;
    if (!c || !c.id) return;
    // Every tab of the user hears this; only the tab that is waiting for a new
    // conversation switches to it (message.created confirms by client_id).
    const waitingForNew = [...state.pending.values()].some(
      (p) => !p.failed && !p.confirmed && p.frame.conversation === null,
    );
    if (!state.conversation && waitingForNew) adoptConversation(c.id, c.title);
    upsertSidebar(c.id, c.title);
  },

  "conversation.updated"(frame) {
    const c = frame.conversation;
    if (!c || !c.id) return;
    const link = sidebarLink(c.id);
    if (link && c.title) {
      link.textContent = c.title;
      link.title = c.title;
    } else if (!link) {
      upsertSidebar(c.id, c.title, { top: false });
    }
    if (c.id === state.conversation && c.title) setTitle(c.title);
  },

  "message.created"(frame) {
    const m = frame.message;
    if (!m) return;
    const pending = frame.client_id ? state.pending.get(frame.client_id) : null;
    if (pending) {
      if (m.conversation !== state.conversation) adoptConversation(m.conversation);
      pending.confirmed = true;
      state.pending.delete(frame.client_id);
      pending.el.dataset.messageId = m.id;
      pending.el.dataset.status = m.status;
      delete pending.el.dataset.clientId;
      setUserPendingLabel(pending.el, null);
      upsertSidebar(m.conversation, null, { fallback: titleFrom(pending.frame.content) });
      updateComposer();
      return;
    }
    if (m.conversation !== state.conversation || findMessage(m.id)) return;
    // Sent from another tab into the conversation shown here.
    addUserMessage({ id: m.id, status: m.status, content: m.content });
    upsertSidebar(m.conversation);
    scrollToBottom();
  },

  "generation.started"(frame) {
    if (!isCurrent(frame)) return;
    state.stopRequested = false;
    beginStreaming(frame.message);
    scrollToBottom();
  },

  "generation.snapshot"(frame) {
    if (!isCurrent(frame)) return;
    const s = streamFor(frame.message);
    if (frame.seq < s.lastSeq) return; // older than what we show
    s.text.data = frame.content;
    s.lastSeq = frame.seq;
    s.rejoinAt = 0;
    scrollToBottom();
  },

  "generation.delta"(frame) {
    if (!isCurrent(frame)) return;
    const s = streamFor(frame.message);
    if (frame.seq <= s.lastSeq) return; // already shown
    if (frame.seq === s.lastSeq + 1) {
      s.text.appendData(frame.text);
      s.lastSeq = frame.seq;
      s.rejoinAt = 0;
      scrollToBottom();
      return;
    }
    // A gap: ask for a snapshot once (again after a while if none came).
    const now = Date.now();
    if (!s.rejoinAt || now - s.rejoinAt > REJOIN_AFTER) {
      s.rejoinAt = now;
      send({ type: "conversation.join", conversation: state.conversation, after: s.lastSeq });
    }
  },

  "generation.finished"(frame) {
    if (!isCurrent(frame)) return;
    const article =
      state.streaming && state.streaming.id === frame.message
        ? state.streaming.el
        : findMessage(frame.message) || addAssistantMessage(frame.message);
    const body = article.querySelector(".msg-body") || make("div");
    body.className = "msg-body prose";
    body.innerHTML = frame.html; // sanitised by the server (rendering.render_markdown)
    if (!body.parentElement) article.prepend(body);
    article.dataset.status = frame.status;
    setMeta(article, frame.status, frame.usage, frame.model);
    if (!state.streaming || state.streaming.id === frame.message) {
      state.stopRequested = false;
      state.refocus = true;
      endStreaming();
    }
    scrollToBottom();
  },

  error(frame) {
    let text = frame.message || "Something went wrong.";
    if (frame.retry_after) {
      const wait = `${Math.ceil(frame.retry_after)} s`;
      if (!text.includes(wait)) text += ` (Retry after ${wait}.)`;
    }
    const pending = frame.client_id ? state.pending.get(frame.client_id) : null;
    if (pending) {
      pending.failed = true;
      state.pending.delete(frame.client_id);
      pending.el.dataset.status = "failed";
      setUserPendingLabel(pending.el, "Not sent");
      // Give the text back so that nothing is lost.
      const current = el.input.value;
      el.input.value = current ? `${pending.frame.content}\n${current}` : pending.frame.content;
      state.refocus = true;
    } else if (frame.conversation && state.conversation && frame.conversation !== state.conversation) {
      return; // about some other conversation this socket once followed
    }
    showError(text);
    updateComposer();
    autoGrow();
    scrollToBottom(); // the error area takes room from the list: keep the last message in view
  },
};

// --- Sending -------------------------------------------------------------------------------

// The server's own rule for a new conversation's title (generation._title_from).
function titleFrom(content) {
  const line = content.split(/\s+/).filter(Boolean).join(" ");
  return line.length <= 60 ? line : `${line.slice(0, 59).trimEnd()}…`;
}

function submit() {
  if (state.ended || state.streaming || waitingForAnswer()) return;
  const content = el.input.value;
  if (!content.trim()) return;
  if (content.length > config.maxChars) {
    showError(`The message is too long (${content.length} > ${config.maxChars} characters).`);
    return;
  }
  clearError();
  const clientId = crypto.randomUUID();
  const frame = {
    type: "message.send",
    conversation: state.conversation,
    content,
    client_id: clientId,
  };
  if (!state.conversation && el.promptSelect && el.promptSelect.value) {
    frame.prompt = el.promptSelect.value;
  }
  const article = addUserMessage({ clientId, status: "sending", content });
  const pending = { frame, el: article, confirmed: false, failed: false };
  state.pending.set(clientId, pending);
  el.input.value = "";
  autoGrow();
  updateComposer();
  scrollToBottom(true);
  if (!send(frame)) setUserPendingLabel(article, "Waiting for connection…");
}

function stop() {
  if (!state.streaming || !state.conversation) return;
  state.stopRequested = true;
  send({ type: "generation.stop", conversation: state.conversation });
  updateComposer();
}

// --- Narrow screens: the conversation list folds away above the chat -------------------------

function setupSidebar() {
  if (!el.convMenu) return;
  const narrow = window.matchMedia("(max-width: 760px)");
  const apply = () => {
    el.convMenu.open = !narrow.matches;
  };
  apply();
  narrow.addEventListener("change", apply);
}

// --- Start ---------------------------------------------------------------------------------------

function start() {
  if (!config || !el.form) return;
  setupSidebar();

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  el.input.addEventListener("input", autoGrow);
  el.stop.addEventListener("click", stop);
  el.errorClose.addEventListener("click", clearError);
  el.messages.addEventListener("scroll", () => {
    state.stickToBottom = atBottom();
  }, { passive: true });

  // A rendered answer still streaming (page loaded mid-answer) is the
  // streaming bubble; the join below brings its snapshot.
  const assistants = el.inner.querySelectorAll('.msg-assistant[data-role="assistant"]');
  const last = assistants[assistants.length - 1];
  if (last && last.dataset.status === "streaming" && state.conversation) {
    beginStreaming(last.dataset.messageId, last);
  }

  autoGrow();
  updateComposer();
  scrollToBottom(true);
  if (!state.conversation) el.input.focus({ preventScroll: true });
  connect();
}

start();
