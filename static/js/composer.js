// The composer: typing (drafts kept per conversation across reloads, the
// character count), sending, stopping, regenerate / continue, and editing the
// last question. It keeps what was sent until the server confirms it: a
// message sent while offline goes when the socket is back, with the same
// client_id, so it never makes a second message; one refused comes back into
// the box, so nothing typed is lost.

import { $, make } from "./dom.js";

const DRAFT_PREFIX = "chat.draft.";
const DRAFT_SAVE_DELAY = 300;

export function createComposer({ config, socket, messages, tray, shell, scroller, isStreaming, conversation, onChange }) {
  const el = {
    form: $("composer"),
    input: $("composer-input"),
    send: $("send-button"),
    stop: $("stop-button"),
    charCount: $("char-count"),
    promptSelect: $("prompt-select"),
    modelSelect: $("model-select"),
  };
  // client_id -> {kind: "send" | "edit", frame, el}: sent, not yet confirmed.
  const pending = new Map();
  let awaitingStart = null; // an action (regenerate, continue) sent and not yet started
  let stopRequested = false;
  let refocus = false;
  let ended = false; // the session is gone
  let ready = false;
  let draftTimer = null;

  const waiting = () => pending.size > 0;
  const busy = () => isStreaming() || waiting() || Boolean(awaitingStart) || ended;

  function update() {
    const streaming = isStreaming();
    const isBusy = busy();
    const hadFocus = document.activeElement === el.input || document.activeElement === el.stop;
    el.input.disabled = isBusy;
    el.send.disabled = isBusy || tray.uploading();
    tray.setDisabled(isBusy);
    el.send.hidden = streaming;
    el.stop.hidden = !streaming || ended;
    if (streaming) el.stop.disabled = stopRequested;
    el.form.classList.toggle("is-busy", isBusy);
    if (!isBusy && (hadFocus || document.activeElement === document.body || refocus)) {
      refocus = false;
      el.input.focus({ preventScroll: true });
    } else if (streaming && hadFocus && !el.stop.hidden) {
      el.stop.focus({ preventScroll: true });
    }
    if (!ready && socket.isOpen()) {
      ready = true;
      el.form.dataset.ready = "true";
      performance.mark("chat-interactive");
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
    el.charCount.classList.toggle("is-full", len >= max);
    if (near) el.charCount.textContent = `${len.toLocaleString()} / ${max.toLocaleString()} characters`;
  }

  // --- Drafts --------------------------------------------------------------------------

  const draftKey = (id = conversation()) => DRAFT_PREFIX + (id || "new");

  function saveDraft() {
    clearTimeout(draftTimer);
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

  function clearDraft(id = conversation()) {
    try {
      localStorage.removeItem(draftKey(id));
    } catch {
      /* ignore */
    }
  }

  // --- Sending ------------------------------------------------------------------------

  function submit() {
    if (busy()) return;
    const content = el.input.value;
    if (tray.uploading()) {
      shell.showError("A file is still uploading: send once it is done.");
      return;
    }
    if (!content.trim() && !tray.hasReady()) return;
    if (content.length > config.maxChars) {
      shell.showError(`The message is too long (${content.length} > ${config.maxChars} characters).`);
      return;
    }
    shell.clearError();
    const clientId = crypto.randomUUID();
    const frame = { type: "message.send", conversation: conversation(), content, client_id: clientId };
    if (!conversation() && el.promptSelect && el.promptSelect.value) frame.prompt = el.promptSelect.value;
    if (!conversation() && el.modelSelect && el.modelSelect.value) frame.model = el.modelSelect.value;
    if (!conversation() && config.project) frame.project = config.project; // a project's page: the chat goes in it
    const files = tray.take();
    if (files.ids.length) frame.attachments = files.ids;
    const article = messages.addUser({ clientId, status: "sending", content, attachments: files.records });
    pending.set(clientId, { kind: "send", frame, el: article, records: files.records });
    el.input.value = "";
    clearDraft();
    autoGrow();
    onChange();
    scroller.toBottom(true);
    if (!socket.send(frame)) messages.setPendingLabel(article, "Waiting for connection…");
  }

  function stop() {
    if (!isStreaming() || !conversation()) return;
    stopRequested = true;
    socket.send({ type: "generation.stop", conversation: conversation() });
    update();
  }

  // Regenerate or continue the last answer.
  function action(type) {
    if (!conversation() || isStreaming() || waiting()) return;
    shell.clearError();
    if (!socket.send({ type, conversation: conversation() })) {
      shell.showError("Not connected. Try again once the connection is back.");
      return;
    }
    awaitingStart = type;
    onChange();
  }

  // --- Editing the last question ---------------------------------------------------------

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
      article.querySelector('[data-action="edit"]')?.focus();
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
      if (!content.trim() || isStreaming() || waiting()) return;
      shell.clearError();
      const clientId = crypto.randomUUID();
      const frame = {
        type: "message.edit",
        conversation: conversation(),
        message: article.dataset.messageId,
        content,
        client_id: clientId,
      };
      pending.set(clientId, { kind: "edit", frame, el: article });
      close();
      messages.setPendingLabel(article, "Sending edit…");
      refocus = true;
      onChange();
      if (!socket.send(frame)) messages.setPendingLabel(article, "Waiting for connection…");
    });
  }

  // --- What the server says about what was sent ------------------------------------------

  // The socket is (again) open: anything not yet confirmed goes again.
  function resend() {
    for (const p of pending.values()) if (socket.send(p.frame)) messages.setPendingLabel(p.el, null);
  }

  // The server confirmed `clientId` (message.created): no longer pending.
  function confirm(clientId) {
    const p = clientId ? pending.get(clientId) : null;
    if (p) pending.delete(clientId);
    return p;
  }

  // Some tab of this user is waiting for a new conversation.
  const waitingForNew = () => [...pending.values()].some((p) => p.frame.conversation === null);

  // The server refused what `clientId` sent: it comes back, nothing typed is lost.
  function refuse(clientId) {
    const p = confirm(clientId);
    if (!p) return false;
    if (p.kind === "edit") {
      messages.setPendingLabel(p.el, null);
      startEdit(p.el, p.frame.content);
    } else {
      p.el.dataset.status = "failed";
      messages.setPendingLabel(p.el, "Not sent");
      const current = el.input.value;
      el.input.value = current && p.frame.content ? `${p.frame.content}\n${current}` : p.frame.content || current;
      tray.restore(p.records);
      refocus = true;
    }
    return true;
  }

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
    clearTimeout(draftTimer);
    draftTimer = setTimeout(saveDraft, DRAFT_SAVE_DELAY);
  });
  window.addEventListener("pagehide", saveDraft);
  el.stop.addEventListener("click", stop);

  return {
    update,
    autoGrow,
    busy,
    stop,
    action,
    startEdit,
    saveDraft,
    loadDraft,
    clearDraft,
    resend,
    confirm,
    refuse,
    waitingForNew,
    focus: () => el.input.focus({ preventScroll: true }),
    hasText: () => Boolean(el.input.value),
    // An action frame's answer started; an answer ended; the session ended.
    started() {
      awaitingStart = null;
      stopRequested = false;
    },
    answered() {
      stopRequested = false;
      refocus = true;
    },
    refused() {
      awaitingStart = null;
    },
    end() {
      ended = true;
    },
  };
}
