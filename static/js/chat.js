// The chat page: the client side of the websocket contract in DESIGN.md.
//
// Plain ES module, no build step. Model and user text are only ever inserted
// as text nodes; the one place that sets innerHTML is `generation.finished`,
// whose `html` the server has already sanitised. While an answer streams its
// text goes into ONE text node (appendData): no markdown re-render and no
// re-render of the list per delta.

import { $, copyText, flashCopied, iconButton, make } from "./dom.js";
import { createSidebar } from "./sidebar.js";

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
const DRAFT_PREFIX = "chat.draft.";
const DRAFT_SAVE_DELAY = 300;

const el = {
  messages: $("messages"),
  inner: $("messages-inner"),
  form: $("composer"),
  input: $("composer-input"),
  send: $("send-button"),
  stop: $("stop-button"),
  promptPick: $("prompt-pick"),
  promptSelect: $("prompt-select"),
  promptChip: $("prompt-chip"),
  promptChipName: $("prompt-chip-name"),
  modelPick: $("model-pick"),
  modelSelect: $("model-select"),
  modelChip: $("model-chip"),
  modelChipName: $("model-chip-name"),
  error: $("chat-error"),
  errorText: $("chat-error-text"),
  errorClose: $("chat-error-close"),
  conn: $("connection-status"),
  title: $("chat-title"),
  charCount: $("char-count"),
  jump: $("jump-latest"),
  exportLinks: $("export-links"),
  exportMd: $("export-md"),
  exportJson: $("export-json"),
  shortcutsButton: $("shortcuts-button"),
  shortcutsDialog: $("shortcuts-dialog"),
  sidebar: $("sidebar"),
  sidebarToggle: $("sidebar-toggle"),
  sidebarScrim: $("sidebar-scrim"),
  sidebarClose: $("sidebar-close"),
  headMore: $("head-more"),
  headTools: $("chat-head-tools"),
};

const state = {
  conversation: config ? config.conversation : null,
  socket: null,
  backoff: BACKOFF_MIN,
  reconnectTimer: null,
  ended: false, // 4401: the session is gone, never reconnect
  everOpened: false,
  ready: false,
  // client_id -> {kind: "send" | "edit", frame, el, confirmed, failed}
  pending: new Map(),
  // The answer streaming in the current conversation, if any:
  // {id, el, body, text (Text node), lastSeq, rejoinAt}
  streaming: null,
  // An action frame (regenerate, continue) sent and not yet started.
  awaitingStart: null,
  stopRequested: false,
  refocus: false,
  stickToBottom: true,
  retryTimer: null,
  draftTimer: null,
  lastUser: null,
  lastAssistant: null,
};

// The raw markdown of answers seen finishing on this page (copy gives it back).
const rawContent = new WeakMap();

let sidebar = null;

// --- Helpers ----------------------------------------------------------------------

function findMessage(id) {
  if (!id) return null;
  return el.inner.querySelector(`.msg[data-message-id="${CSS.escape(id)}"]`);
}

function removeEmptyState() {
  const empty = $("empty-state");
  if (empty) empty.remove();
}

// Money as the server shows it (conversations/money.py): the site's currency
// sign, at least two decimals, at most six.
function formatMoney(cost) {
  const n = Number(cost);
  const amount = Number.isFinite(n) ? Math.abs(n) : 0;
  let text = amount.toFixed(6).replace(/0+$/, "");
  const [whole, fraction = ""] = text.split(".");
  text = `${whole}.${fraction.padEnd(2, "0")}`;
  return `${n < 0 ? "-" : ""}${(config && config.currency) || "$"}${text}`;
}

// Said to screen readers (a polite live region); errors also show on screen.
function announce(text, isError = false) {
  if (isError) showError(text);
  const region = $("announcer");
  if (!region) return;
  region.textContent = "";
  setTimeout(() => {
    region.textContent = text;
  }, 50);
}

function setMeta(article, status, usage, model, error) {
  let meta = article.querySelector(".msg-meta");
  if (!meta) {
    meta = make("div", "msg-meta");
    article.querySelector(".msg-body").after(meta);
  }
  meta.replaceChildren();
  if (STATUS_LABELS[status]) meta.append(make("span", "msg-status", STATUS_LABELS[status]));
  if (error) meta.append(make("span", "msg-error", error));
  // A request the model refused (401, 429 ...) costs nothing and shows no usage.
  if (usage && (usage.prompt_tokens || usage.completion_tokens)) {
    const parts = [];
    if (model) parts.push(model);
    parts.push(`${usage.prompt_tokens} in`, `${usage.completion_tokens} out`, formatMoney(usage.cost));
    meta.append(make("span", "msg-usage", parts.join(" · ")));
  }
}

// --- Scrolling ----------------------------------------------------------------------

function atBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < STICK_THRESHOLD;
}

let scrollQueued = false;
function scrollToBottom(force = false) {
  if (force) state.stickToBottom = true;
  if (!state.stickToBottom) {
    updateJump();
    return;
  }
  // Once per frame at most, however many deltas arrive in it.
  if (scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (state.stickToBottom) el.messages.scrollTop = el.messages.scrollHeight;
    updateJump();
  });
}

function updateJump() {
  const show = !state.stickToBottom && el.messages.scrollHeight > el.messages.clientHeight;
  if (el.jump.hidden === show) el.jump.hidden = !show;
  el.jump.classList.toggle("has-new", show && Boolean(state.streaming));
}

// --- Messages ------------------------------------------------------------------------

function versionOf(article) {
  return {
    group: article.dataset.versionGroup || "",
    index: Number(article.dataset.versionIndex) || 1,
    count: Number(article.dataset.versionCount) || 1,
  };
}

function groupMembers(group) {
  if (!group) return [];
  return [...el.inner.querySelectorAll(`.msg[data-version-group="${CSS.escape(group)}"]`)].sort(
    (a, b) => versionOf(a).index - versionOf(b).index,
  );
}

function isInactive(article) {
  return article.hasAttribute("data-inactive");
}

function setInactive(article) {
  article.setAttribute("data-inactive", "");
  article.hidden = true;
}

function buildArticle({ role, id = "", clientId = "", status, content = "", group = "", index = 1, count = 1 }) {
  removeEmptyState();
  const article = make("article", `msg msg-${role}`);
  article.dataset.messageId = id;
  if (clientId) article.dataset.clientId = clientId;
  article.dataset.status = status;
  article.dataset.role = role;
  if (group) article.dataset.versionGroup = group;
  article.dataset.versionIndex = String(index);
  article.dataset.versionCount = String(count);
  article.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  article.append(make("div", "msg-body msg-text", content));
  article.append(make("div", "msg-meta"));
  decorate(article);
  return article;
}

function addUserMessage(props) {
  const article = buildArticle({ role: "user", ...props });
  el.inner.append(article);
  return article;
}

// "used current_time (Asia/Tokyo)": a tool the model called for this answer,
// opened to show its arguments and result.
function addToolChip(article, { summary, ok, arguments: args, result }) {
  let used = article.querySelector(".tools-used");
  if (!used) {
    used = make("div", "tools-used");
    article.querySelector(".msg-body").before(used);
  }
  const chip = make("details", ok ? "tool-chip" : "tool-chip is-error");
  const detail = make("div", "tool-detail");
  detail.append(make("span", "", "Arguments"), make("pre", "", args), make("span", "", "Result"), make("pre", "", result));
  chip.append(make("summary", "", `used ${summary}`), detail);
  used.append(chip);
  scrollToBottom();
}

// Where the part of a long chat that the model now sees only as a summary ends.
function showSummaryMarker(through, summary) {
  const after = findMessage(through);
  document.getElementById("summary-marker")?.remove();
  if (!after) return;
  const marker = make("details", "summary-marker");
  marker.id = "summary-marker";
  marker.setAttribute("role", "note");
  marker.append(
    make("summary", "", "Older messages above are summarised for the model"),
    make("p", "summary-text", summary || ""),
  );
  after.after(marker);
}

function addAssistantMessage(id, version = {}) {
  const article = buildArticle({ role: "assistant", id, status: "streaming", ...version });
  el.inner.append(article);
  return article;
}

function setUserPendingLabel(article, text) {
  const meta = article.querySelector(".msg-meta");
  if (!meta) return;
  meta.replaceChildren();
  if (text) meta.append(make("span", "msg-status", text));
}

// An answer with no text (it failed before its first token) has nothing to copy.
function showCopy(article, shown) {
  const copy = article.querySelector('.msg-tools [data-action="copy"]');
  if (copy) copy.hidden = !shown;
}

// Tools under a message: version switcher, copy, and (on the last ones) edit,
// regenerate, continue, retry.
function decorate(article) {
  let tools = article.querySelector(".msg-tools");
  if (!tools) {
    tools = make("div", "msg-tools");
    const copy = iconButton("copy", article.dataset.role === "user" ? "Copy message" : "Copy answer", {
      action: "copy",
    });
    tools.append(copy);
    article.append(tools);
  }
  renderSwitcher(article);
  showCopy(article, article.querySelector(".msg-body").textContent.trim() !== "" || article.dataset.status === "streaming");
  const body = article.querySelector(".msg-body.prose");
  if (body) enhanceProse(body);
}

// The versions a switcher walks through: a question's versions; an answer's
// versions given to the same question (an edit starts a new line of answers).
function siblings(article) {
  const members = groupMembers(article.dataset.versionGroup);
  if (article.dataset.role === "user" || members.length <= 1) return members.length ? members : [article];
  const parent = questionOf(article);
  return members.filter((m) => questionOf(m) === parent);
}

function questionOf(article) {
  let n = article.previousElementSibling;
  while (n && n.dataset.role !== "user") n = n.previousElementSibling;
  return n;
}

function renderSwitcher(article) {
  const tools = article.querySelector(".msg-tools");
  let nav = tools.querySelector(".versions");
  const declared = Number(article.dataset.versionCount) || 1;
  const list = declared > 1 ? siblings(article) : [article];
  const count = list.length;
  const index = list.indexOf(article) + 1;
  if (count <= 1) {
    if (nav) nav.remove();
    return;
  }
  if (!nav) {
    nav = make("span", "versions");
    nav.setAttribute("role", "group");
    const prev = iconButton("left", "Previous version", { action: "version-prev" });
    const next = iconButton("right", "Next version", { action: "version-next" });
    nav.append(prev, make("span", "versions-label"), next);
    tools.prepend(nav);
  }
  nav.setAttribute("aria-label", `Version ${index} of ${count}`);
  nav.querySelector(".versions-label").textContent = `${index}/${count}`;
  nav.querySelector('[data-action="version-prev"]').disabled = index <= 1;
  nav.querySelector('[data-action="version-next"]').disabled = index >= count;
}

function enhanceProse(body) {
  for (const pre of body.querySelectorAll("pre")) {
    if (pre.parentElement.classList.contains("code-block")) continue;
    const wrap = make("div", "code-block");
    const head = make("div", "code-head");
    const code = pre.querySelector("code");
    const lang = code && [...code.classList].find((c) => c.startsWith("language-"));
    head.append(make("span", "code-lang", lang ? lang.slice(9) : "code"));
    head.append(iconButton("copy", "Copy code", { className: "code-copy", text: "Copy", action: "copy-code" }));
    pre.replaceWith(wrap);
    wrap.append(head, pre);
  }
}

// Which messages get edit / regenerate / continue / retry: only the last active ones.
function refreshLastActions() {
  const active = el.inner.querySelectorAll(".msg:not([data-inactive])");
  let lastUser = null;
  let lastAssistant = null;
  for (let i = active.length - 1; i >= 0; i--) {
    const a = active[i];
    if (a.dataset.role === "user") {
      lastUser = a;
      break;
    }
    if (!lastAssistant) lastAssistant = a;
  }
  for (const a of el.inner.querySelectorAll(".msg.is-last")) {
    a.classList.remove("is-last");
    for (const b of a.querySelectorAll(".act-contextual")) b.remove();
  }
  const busy = Boolean(state.streaming) || waitingForAnswer() || Boolean(state.awaitingStart);
  if (lastUser && lastUser.dataset.messageId) {
    lastUser.classList.add("is-last");
    if (!busy) addAction(lastUser, "edit", "Edit message", "edit");
  }
  if (lastAssistant && lastAssistant.dataset.messageId) {
    lastAssistant.classList.add("is-last");
    const status = lastAssistant.dataset.status;
    if (!busy && status !== "streaming") {
      if (status === "truncated") addAction(lastAssistant, "right", "Continue", "continue", true);
      if (status === "failed") addAction(lastAssistant, "regen", "Retry", "retry", true);
      else addAction(lastAssistant, "regen", "Regenerate answer", "regenerate");
    }
  }
  state.lastUser = lastUser;
  state.lastAssistant = lastAssistant;
}

function addAction(article, iconName, label, action, withText = false) {
  const tools = article.querySelector(".msg-tools");
  const button = iconButton(iconName, label, {
    className: withText ? "btn btn-ghost btn-small act-contextual" : "icon-btn icon-btn-small act-contextual",
    text: withText ? label : undefined,
    action,
  });
  tools.append(button);
}

// --- Versions (regenerate, edit) ----------------------------------------------------------------

// Show version `target` of its group in place of the one shown now. For a
// question, the answers that followed that version come with it.
function showVersion(target) {
  const list = siblings(target);
  for (const member of list) {
    member.hidden = member !== target;
    if (member.dataset.role === "user") for (const a of branchOf(member)) a.hidden = true;
  }
  if (target.dataset.role === "user") showBranch(target);
  for (const member of groupMembers(target.dataset.versionGroup)) renderSwitcher(member);
  if (target.dataset.role === "user") for (const a of branchOf(target)) renderSwitcher(a);
}

// The answers after a question, up to the next question (in page order).
function branchOf(userArticle) {
  const out = [];
  for (let n = userArticle.nextElementSibling; n && n.dataset.role !== "user"; n = n.nextElementSibling) {
    if (n.classList.contains("msg")) out.push(n);
  }
  return out;
}

function showBranch(userArticle) {
  const byGroup = new Map();
  for (const a of branchOf(userArticle)) {
    const g = a.dataset.versionGroup || a.dataset.messageId;
    if (!byGroup.has(g)) byGroup.set(g, []);
    byGroup.get(g).push(a);
  }
  for (const members of byGroup.values()) {
    const pick = members.find((m) => !isInactive(m)) || members[members.length - 1];
    for (const m of members) m.hidden = m !== pick;
  }
}

// A new version joined `group`: renumber every member and redraw switchers.
function joinGroup(article, group, replaced) {
  if (!group && replaced) group = replaced.dataset.versionGroup;
  if (!group) return;
  article.dataset.versionGroup = group;
  const members = groupMembers(group).filter((m) => m !== article);
  const count = members.length + 1;
  article.dataset.versionIndex = String(count);
  for (const m of [...members, article]) {
    m.dataset.versionCount = String(count);
    renderSwitcher(m);
  }
}

function retire(id) {
  const old = findMessage(id);
  if (!old) return null;
  setInactive(old);
  if (old.dataset.role === "user") {
    // An edited question takes its answers with it.
    for (const a of branchOf(old)) if (!isInactive(a)) setInactive(a);
  }
  return old;
}

// --- Streaming ----------------------------------------------------------------------------------

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
  const meta = article.querySelector(".msg-meta");
  if (meta) meta.replaceChildren();
  const previous = state.streaming && state.streaming.id === id ? state.streaming : null;
  state.streaming = { id, el: article, body, text, lastSeq: previous ? previous.lastSeq : 0, rejoinAt: 0 };
  article.setAttribute("aria-busy", "true");
  updateComposer();
  refreshLastActions();
  return state.streaming;
}

function streamFor(id) {
  if (state.streaming && state.streaming.id === id) return state.streaming;
  return beginStreaming(id);
}

function endStreaming() {
  if (state.streaming) state.streaming.el.removeAttribute("aria-busy");
  state.streaming = null;
  updateComposer();
  refreshLastActions();
  updateJump();
}

// --- Composer -----------------------------------------------------------------------------------

function waitingForAnswer() {
  for (const p of state.pending.values()) if (!p.failed && !p.confirmed) return true;
  return false;
}

function updateComposer() {
  const streaming = Boolean(state.streaming);
  const busy = streaming || waitingForAnswer() || Boolean(state.awaitingStart) || state.ended;
  const hadFocus = document.activeElement === el.input || document.activeElement === el.stop;
  el.input.disabled = busy;
  el.send.disabled = busy;
  el.send.hidden = streaming;
  el.stop.hidden = !streaming || state.ended;
  if (streaming) el.stop.disabled = Boolean(state.stopRequested);
  el.form.classList.toggle("is-busy", busy);
  if (!busy && (hadFocus || document.activeElement === document.body || state.refocus)) {
    state.refocus = false;
    el.input.focus({ preventScroll: true });
  } else if (streaming && hadFocus && !el.stop.hidden) {
    el.stop.focus({ preventScroll: true });
  }
  markReady();
}

function markReady() {
  if (state.ready || !state.socket || state.socket.readyState !== WebSocket.OPEN) return;
  state.ready = true;
  el.form.dataset.ready = "true";
  performance.mark("chat-interactive");
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
  el.charCount.classList.toggle("is-full", len >= max);
  if (near) el.charCount.textContent = `${len.toLocaleString()} / ${max.toLocaleString()} characters`;
}

// --- Drafts (per conversation, across reloads) ----------------------------------------------------

function draftKey(conversation = state.conversation) {
  return DRAFT_PREFIX + (conversation || "new");
}

function saveDraft() {
  clearTimeout(state.draftTimer);
  try {
    const value = el.input.value;
    if (value.trim()) localStorage.setItem(draftKey(), value);
    else localStorage.removeItem(draftKey());
  } catch {
    /* storage full or disabled: drafts are a nicety */
  }
}

function loadDraft() {
  try {
    const value = localStorage.getItem(draftKey());
    if (value && !el.input.value) el.input.value = value;
  } catch {
    /* ignore */
  }
}

function clearDraft(conversation = state.conversation) {
  try {
    localStorage.removeItem(draftKey(conversation));
  } catch {
    /* ignore */
  }
}

// --- Errors ---------------------------------------------------------------------------------------

function describeWait(seconds) {
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.ceil(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest ? `${hours} h ${rest} min` : `${hours} h`;
}

function showError(text, retryAfter) {
  clearInterval(state.retryTimer);
  el.error.hidden = false;
  if (!retryAfter) {
    el.errorText.textContent = text;
    return;
  }
  const until = new Date(Date.now() + retryAfter * 1000);
  const sameDay = until.toDateString() === new Date().toDateString();
  const time = until.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  const at = sameDay ? time : `${until.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" })} ${time}`;
  // The precise time replaces a vague "try again shortly / in N s".
  const base = text
    .replace(/\s*\(?Retry after [^)]*\)?\.?$/i, "")
    .replace(/[;,.]?\s*(try again|resets) (shortly|later|soon|in [^.;]*)\.?$/i, ".")
    .replace(/\.\.$/, ".");
  const tick = () => {
    const left = Math.ceil((until.getTime() - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(state.retryTimer);
      el.errorText.textContent = `${base} You can try again now.`;
      el.error.classList.remove("is-waiting");
      return;
    }
    el.errorText.textContent = `${base} Try again at ${at} (in ${describeWait(left)}).`;
  };
  el.error.classList.add("is-waiting");
  tick();
  state.retryTimer = setInterval(tick, 1000);
}

function clearError() {
  clearInterval(state.retryTimer);
  el.error.hidden = true;
  el.error.classList.remove("is-waiting");
  el.errorText.textContent = "";
}

// --- Conversation identity --------------------------------------------------------------------------

function setTitle(title) {
  el.title.textContent = title;
  document.title = `${title} · Chat`;
}

function showModel(name) {
  if (!el.modelChip || !name) return;
  el.modelChipName.textContent = name;
  el.modelChip.hidden = false;
}

function adoptConversation(id, title) {
  if (state.conversation === id) return;
  const wasNew = !state.conversation;
  state.conversation = id;
  history.replaceState(null, "", `/c/${id}/`);
  if (wasNew) clearDraft(null);
  if (el.promptPick) {
    const option = el.promptSelect && el.promptSelect.selectedOptions[0];
    if (option && option.value) {
      el.promptChipName.textContent = option.textContent;
      el.promptChip.hidden = false;
    }
    el.promptPick.hidden = true;
  }
  if (el.modelPick) el.modelPick.hidden = true;
  el.exportMd.href = `/c/${id}/export.md`;
  el.exportJson.href = `/c/${id}/export.json`;
  el.exportLinks.hidden = false;
  if (title) setTitle(title);
  if (sidebar) sidebar.setCurrent(id);
}

// --- Socket ---------------------------------------------------------------------------------------

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
    updateComposer();
  });

  let parts = []; // a long frame arrives as consecutive `frame.part` messages
  socket.addEventListener("message", (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
      if (frame.type === "frame.part") {
        if (frame.part === 0) parts = [];
        parts.push(frame.data);
        if (frame.part < frame.parts - 1) return;
        frame = JSON.parse(parts.join(""));
        parts = [];
      }
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
    // 4012 (or 1012): the worker is restarting (a deploy); another one takes us at once.
    const restart = event.code === 4012 || event.code === 1012;
    const delay = restart ? 100 + Math.random() * 400 : state.backoff;
    if (!restart) state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX);
    state.reconnectTimer = setTimeout(connect, delay);
  });
}

function setConnectionStatus(text) {
  el.conn.replaceChildren();
  el.conn.hidden = !text;
  el.conn.classList.remove("is-ended");
  el.conn.classList.toggle("is-reconnecting", Boolean(text));
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

// --- Frames from the server -------------------------------------------------------------------------

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
    if (!state.conversation && waitingForNew) {
      adoptConversation(c.id, c.title);
      const option = el.modelSelect && el.modelSelect.selectedOptions[0];
      showModel(option && option.value ? option.textContent : c.model);
    }
    if (sidebar) sidebar.upsert(c.id, c.title);
  },

  "conversation.updated"(frame) {
    const c = frame.conversation;
    if (!c || !c.id) return;
    if (sidebar) {
      if (sidebar.has(c.id)) sidebar.applyTitle(c.id, c.title);
      else sidebar.upsert(c.id, c.title, { top: false });
    }
    if (c.id === state.conversation && c.title) setTitle(c.title);
  },

  "conversation.deleted"(frame) {
    const id = typeof frame.conversation === "string" ? frame.conversation : frame.conversation && frame.conversation.id;
    if (!id) return;
    if (sidebar) sidebar.remove(id);
    else if (id === state.conversation) leaveDeleted();
  },

  "message.created"(frame) {
    const m = frame.message;
    if (!m) return;
    const pending = frame.client_id ? state.pending.get(frame.client_id) : null;
    const replaces = frame.replaces || m.replaces;
    const group = frame.version_group || m.version_group || "";
    if (pending) {
      if (m.conversation !== state.conversation) adoptConversation(m.conversation);
      pending.confirmed = true;
      state.pending.delete(frame.client_id);
      if (pending.kind === "edit") {
        const old = retire(replaces || pending.frame.message);
        const article = buildArticle({ role: "user", id: m.id, status: m.status, content: m.content });
        el.inner.append(article);
        joinGroup(article, group, old);
        if (old) setUserPendingLabel(old, null);
      } else {
        pending.el.dataset.messageId = m.id;
        pending.el.dataset.status = m.status;
        if (group) pending.el.dataset.versionGroup = group;
        delete pending.el.dataset.clientId;
        setUserPendingLabel(pending.el, null);
      }
      if (sidebar) sidebar.upsert(m.conversation, null);
      updateComposer();
      refreshLastActions();
      scrollToBottom(true);
      return;
    }
    if (m.conversation !== state.conversation || findMessage(m.id)) return;
    // Sent from another tab into the conversation shown here.
    const old = replaces ? retire(replaces) : null;
    const article = addUserMessage({ id: m.id, status: m.status, content: m.content, group });
    if (old) joinGroup(article, group, old);
    if (sidebar) sidebar.upsert(m.conversation, null);
    refreshLastActions();
    scrollToBottom();
  },

  "generation.started"(frame) {
    if (!isCurrent(frame)) return;
    state.stopRequested = false;
    state.awaitingStart = null;
    if (state.streaming && state.streaming.id !== frame.message) endStreaming();
    let article = findMessage(frame.message);
    if (!article) {
      const old = frame.replaces ? retire(frame.replaces) : null;
      article = addAssistantMessage(frame.message, { group: frame.version_group || "" });
      if (old || frame.version_group) joinGroup(article, frame.version_group, old);
    }
    beginStreaming(frame.message, article);
    scrollToBottom();
  },

  "generation.tool"(frame) {
    if (!isCurrent(frame)) return;
    const article = findMessage(frame.message);
    if (article) addToolChip(article, frame);
  },

  "conversation.summary"(frame) {
    if (!isCurrent(frame)) return;
    showSummaryMarker(frame.through, frame.summary);
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
    const body = article.querySelector(".msg-body");
    body.className = "msg-body prose";
    body.innerHTML = frame.html; // sanitised by the server (rendering.render_markdown)
    enhanceProse(body);
    if (typeof frame.content === "string") rawContent.set(article, frame.content);
    article.dataset.status = frame.status;
    article.removeAttribute("aria-busy");
    setMeta(article, frame.status, frame.usage, frame.model, frame.error);
    showCopy(article, Boolean(frame.content));
    if (!state.streaming || state.streaming.id === frame.message) {
      state.stopRequested = false;
      state.refocus = true;
      endStreaming();
    } else {
      refreshLastActions();
    }
    scrollToBottom();
  },

  error(frame) {
    let text = frame.message || "Something went wrong.";
    const pending = frame.client_id ? state.pending.get(frame.client_id) : null;
    if (pending) {
      pending.failed = true;
      state.pending.delete(frame.client_id);
      if (pending.kind === "edit") {
        setUserPendingLabel(pending.el, null);
        startEdit(pending.el, pending.frame.content); // nothing typed is lost
      } else {
        pending.el.dataset.status = "failed";
        setUserPendingLabel(pending.el, "Not sent");
        // Give the text back so that nothing is lost.
        const current = el.input.value;
        el.input.value = current ? `${pending.frame.content}\n${current}` : pending.frame.content;
        state.refocus = true;
      }
    } else if (frame.conversation && state.conversation && frame.conversation !== state.conversation) {
      return; // about some other conversation this socket once followed
    }
    state.awaitingStart = null;
    if (frame.code === "quota_exceeded" && !frame.retry_after) text = text || "You have used your quota.";
    showError(text, frame.retry_after);
    updateComposer();
    refreshLastActions();
    autoGrow();
    scrollToBottom(); // the error area takes room from the list: keep the last message in view
  },
};

function leaveDeleted() {
  clearDraft();
  location.assign("/");
}

// --- Sending ------------------------------------------------------------------------------------

function submit() {
  if (state.ended || state.streaming || waitingForAnswer() || state.awaitingStart) return;
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
  if (!state.conversation && el.modelSelect && el.modelSelect.value) {
    frame.model = el.modelSelect.value;
  }
  const article = addUserMessage({ clientId, status: "sending", content });
  const pending = { kind: "send", frame, el: article, confirmed: false, failed: false };
  state.pending.set(clientId, pending);
  el.input.value = "";
  clearDraft();
  autoGrow();
  updateComposer();
  refreshLastActions();
  scrollToBottom(true);
  if (!send(frame)) setUserPendingLabel(article, "Waiting for connection…");
}

function stop() {
  if (!state.streaming || !state.conversation) return;
  state.stopRequested = true;
  send({ type: "generation.stop", conversation: state.conversation });
  updateComposer();
}

function action(type) {
  if (!state.conversation || state.streaming || waitingForAnswer()) return;
  clearError();
  if (!send({ type, conversation: state.conversation })) {
    showError("Not connected. Try again once the connection is back.");
    return;
  }
  state.awaitingStart = type;
  updateComposer();
  refreshLastActions();
}

// --- Editing the last question ---------------------------------------------------------------------

function startEdit(article, initial) {
  if (article.querySelector(".msg-edit")) return;
  const body = article.querySelector(".msg-body");
  const form = make("form", "msg-edit");
  const label = make("label", "visually-hidden", "Edit your message");
  const area = make("textarea");
  area.id = `edit-${article.dataset.messageId}`;
  label.htmlFor = area.id;
  area.value = initial !== undefined ? initial : body.textContent;
  area.maxLength = config.maxChars;
  area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
  const buttons = make("div", "msg-edit-buttons");
  const cancel = make("button", "btn btn-ghost btn-small", "Cancel");
  cancel.type = "button";
  const save = make("button", "btn btn-primary btn-small", "Send");
  save.type = "submit";
  buttons.append(cancel, save);
  form.append(label, area, buttons);
  body.hidden = true;
  article.classList.add("is-editing");
  body.after(form);
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);

  const close = () => {
    form.remove();
    body.hidden = false;
    article.classList.remove("is-editing");
  };
  cancel.addEventListener("click", () => {
    close();
    const edit = article.querySelector('[data-action="edit"]');
    if (edit) edit.focus();
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      cancel.click();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = area.value;
    if (!content.trim() || state.streaming || waitingForAnswer()) return;
    clearError();
    const clientId = crypto.randomUUID();
    const frame = {
      type: "message.edit",
      conversation: state.conversation,
      message: article.dataset.messageId,
      content,
      client_id: clientId,
    };
    state.pending.set(clientId, { kind: "edit", frame, el: article, confirmed: false, failed: false });
    close();
    setUserPendingLabel(article, "Sending edit…");
    state.refocus = true;
    updateComposer();
    refreshLastActions();
    if (!send(frame)) setUserPendingLabel(article, "Waiting for connection…");
  });
}

// --- Clicks inside the message list -------------------------------------------------------------

function onMessageClick(event) {
  const button = event.target.closest("button[data-action]");
  if (!button || !el.inner.contains(button)) return;
  const article = button.closest(".msg");
  switch (button.dataset.action) {
    case "copy": {
      const body = article.querySelector(".msg-body");
      const text = rawContent.get(article) ?? body.innerText;
      copyText(text).then((ok) => flashCopied(button, ok));
      break;
    }
    case "copy-code": {
      const pre = button.closest(".code-block").querySelector("pre");
      copyText(pre.innerText.replace(/\n$/, "")).then((ok) => flashCopied(button, ok));
      break;
    }
    case "edit":
      startEdit(article);
      break;
    case "regenerate":
    case "retry":
      action("message.regenerate");
      break;
    case "continue":
      action("message.continue");
      break;
    case "version-prev":
    case "version-next": {
      const list = siblings(article);
      const target = list[list.indexOf(article) + (button.dataset.action === "version-next" ? 1 : -1)];
      if (target) {
        showVersion(target);
        const same = target.querySelector(`[data-action="${button.dataset.action}"]`);
        const focusTo = same && !same.disabled ? same : target.querySelector(".versions button:not(:disabled)");
        if (focusTo) focusTo.focus();
      }
      break;
    }
    default:
      break;
  }
}

// --- Narrow screens: the conversation list slides in over the chat --------------------------------

// Narrow screens: export and shortcuts fold into a "more" menu in the chat's head.
function setupHeadMenu() {
  if (!el.headMore || !el.headTools) return;
  const setOpen = (open) => {
    el.headTools.classList.toggle("is-open", open);
    el.headMore.setAttribute("aria-expanded", String(open));
  };
  el.headMore.addEventListener("click", (event) => {
    event.stopPropagation();
    setOpen(!el.headTools.classList.contains("is-open"));
  });
  document.addEventListener("click", (event) => {
    if (!el.headTools.contains(event.target)) setOpen(false);
  });
  el.headTools.addEventListener("click", (event) => {
    if (event.target.closest("a, button")) setOpen(false);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && el.headTools.classList.contains("is-open")) {
      setOpen(false);
      el.headMore.focus();
    }
  });
}

function setupDrawer() {
  if (!el.sidebarToggle || !el.sidebar) return;
  const narrow = window.matchMedia("(max-width: 760px)");
  const setOpen = (open) => {
    el.sidebar.classList.toggle("is-open", open);
    el.sidebarScrim.hidden = !open;
    el.sidebarToggle.setAttribute("aria-expanded", String(open));
    el.sidebarToggle.setAttribute("aria-label", open ? "Hide conversations" : "Show conversations");
    if (narrow.matches) el.sidebar.inert = !open;
    if (open) {
      const first = el.sidebar.querySelector(".conv-item.is-current .conv-link") || $("new-chat");
      first.focus();
    }
  };
  const apply = () => {
    el.sidebar.inert = narrow.matches && !el.sidebar.classList.contains("is-open");
  };
  apply();
  narrow.addEventListener("change", apply);
  el.sidebarToggle.addEventListener("click", () => setOpen(!el.sidebar.classList.contains("is-open")));
  el.sidebarScrim.addEventListener("click", () => setOpen(false));
  if (el.sidebarClose) {
    el.sidebarClose.addEventListener("click", () => {
      setOpen(false);
      el.sidebarToggle.focus();
    });
  }
  el.sidebar.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && narrow.matches && el.sidebar.classList.contains("is-open")) {
      event.preventDefault();
      event.stopPropagation();
      setOpen(false);
      el.sidebarToggle.focus();
    }
  });
  return {
    open: () => setOpen(true),
    close: () => {
      setOpen(false);
      el.sidebarToggle.focus();
    },
    isOpen: () => narrow.matches && el.sidebar.classList.contains("is-open"),
    isNarrow: () => narrow.matches,
  };
}

// --- Keyboard shortcuts (also listed in the page: the "?" dialog) ------------------------------------

function typingIn(target) {
  return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

function setupShortcuts(drawer) {
  document.addEventListener("keydown", (event) => {
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.shiftKey && (event.key === "O" || event.key === "o")) {
      event.preventDefault();
      saveDraft();
      location.assign("/");
    } else if (mod && !event.shiftKey && (event.key === "k" || event.key === "K")) {
      event.preventDefault();
      if (drawer && drawer.isNarrow()) drawer.open();
      if (sidebar) sidebar.focusSearch();
    } else if (event.key === "Escape" && event.shiftKey) {
      event.preventDefault();
      el.input.focus();
    } else if (event.key === "Escape" && drawer && drawer.isOpen()) {
      event.preventDefault();
      drawer.close();
    } else if (event.key === "Escape" && state.streaming && !document.querySelector("dialog[open]")) {
      event.preventDefault();
      stop();
    } else if (event.key === "?" && !mod && !typingIn(event.target)) {
      event.preventDefault();
      el.shortcutsDialog.showModal();
    }
  });
  el.shortcutsButton.addEventListener("click", () => el.shortcutsDialog.showModal());
}

// --- Start ------------------------------------------------------------------------------------------

function start() {
  if (!config || !el.form) return;

  sidebar = createSidebar({
    url: config.conversationsUrl || "/conversations/",
    current: () => state.conversation,
    onDeletedCurrent: leaveDeleted,
    announce,
  });
  const drawer = setupDrawer();
  setupHeadMenu();
  setupShortcuts(drawer);

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
  el.input.addEventListener("input", () => {
    autoGrow();
    clearTimeout(state.draftTimer);
    state.draftTimer = setTimeout(saveDraft, DRAFT_SAVE_DELAY);
  });
  window.addEventListener("pagehide", saveDraft);
  el.stop.addEventListener("click", stop);
  el.errorClose.addEventListener("click", clearError);
  el.jump.addEventListener("click", () => {
    scrollToBottom(true);
    el.input.focus({ preventScroll: true });
  });
  el.inner.addEventListener("click", onMessageClick);
  // Only the user unsticks the view from the bottom (wheel, touch, keys,
  // scrollbar), decided at once: layout shifts (a delta, messages measured
  // for the first time) never do. Coming back to the bottom sticks again.
  let lastTop = el.messages.scrollTop;
  el.messages.addEventListener(
    "scroll",
    () => {
      const top = el.messages.scrollTop;
      // Not while moving up (a smooth wheel scroll starts near the bottom).
      if (top >= lastTop && atBottom()) state.stickToBottom = true;
      lastTop = top;
      updateJump();
    },
    { passive: true },
  );
  const unstick = () => {
    state.stickToBottom = false;
  };
  el.messages.addEventListener("wheel", (event) => event.deltaY < 0 && unstick(), { passive: true });
  let touchY = null;
  el.messages.addEventListener("touchstart", (event) => (touchY = event.touches[0].clientY), { passive: true });
  el.messages.addEventListener(
    "touchmove",
    (event) => {
      if (touchY !== null && event.touches[0].clientY > touchY + 4) unstick();
    },
    { passive: true },
  );
  el.messages.addEventListener("keydown", (event) => {
    if (["PageUp", "ArrowUp", "Home"].includes(event.key)) unstick();
  });
  el.messages.addEventListener("pointerdown", (event) => {
    if (event.target === el.messages) unstick(); // the scrollbar
  });
  // Whatever grows the list (a delta, a finished answer's HTML, off-screen
  // messages measured for the first time) keeps the bottom in view if it was.
  new ResizeObserver(() => {
    if (state.stickToBottom) scrollToBottom();
    else updateJump();
  }).observe(el.inner);
  el.messages.addEventListener(
    "wheel",
    (event) => {
      if (event.deltaY < 0) state.stickToBottom = false;
    },
    { passive: true },
  );
  el.messages.addEventListener("keydown", (event) => {
    if (["PageUp", "ArrowUp", "Home"].includes(event.key)) state.stickToBottom = false;
  });

  // Server-rendered messages: tools, code-copy buttons, version switchers.
  for (const article of el.inner.querySelectorAll(".msg")) decorate(article);
  refreshLastActions();

  // A rendered answer still streaming (page loaded mid-answer) is the
  // streaming bubble; the join below brings its snapshot.
  const last = state.lastAssistant;
  if (last && last.dataset.status === "streaming" && state.conversation) {
    beginStreaming(last.dataset.messageId, last);
  }

  loadDraft();
  autoGrow();
  updateComposer();
  scrollToBottom(true);
  if (!state.conversation || el.input.value) el.input.focus({ preventScroll: true });
  connect();
}

start();
