// The messages in the list: building them, their meta line (status, usage,
// why one failed), the tools under them (copy, versions, and edit /
// regenerate / continue / retry on the last ones), code block heads, the
// tool chips of an answer and the summary marker.
//
// Text from users and the model is only ever set as text; the HTML of a
// finished answer is the server's, already sanitised.

import { formatMoney } from "./config.js";
import { showHeld } from "./attachments.js";
import { $, copyText, flashCopied, iconButton, make } from "./dom.js";

const STATUS_LABELS = {
  stopped: "Stopped",
  truncated: "Truncated: length limit reached",
  failed: "Failed",
  interrupted: "Interrupted",
};

export function createMessages({ inner, versions, fileUrl, onAction, onEdit }) {
  // The raw markdown of answers seen finishing on this page (copy gives it back).
  const rawContent = new WeakMap();
  let lastUser = null;
  let lastAssistant = null;

  function find(id) {
    if (!id) return null;
    return inner.querySelector(`.msg[data-message-id="${CSS.escape(id)}"]`);
  }

  function build({ role, id = "", clientId = "", status, content = "", group = "", index = 1, count = 1, attachments }) {
    $("empty-state")?.remove();
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
    showHeld(article, attachments, fileUrl);
    decorate(article);
    return article;
  }

  function add(props) {
    const article = build(props);
    inner.append(article);
    return article;
  }

  const addUser = (props) => add({ role: "user", ...props });
  const addAssistant = (id, version = {}) => add({ role: "assistant", id, status: "streaming", ...version });

  function setMeta(article, { status, usage, model, error }) {
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

  // "Sending edit…", "Not sent", "Waiting for connection…" under a question.
  function setPendingLabel(article, text) {
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

  // Tools under a message: version switcher and copy.
  function decorate(article) {
    let tools = article.querySelector(".msg-tools");
    if (!tools) {
      tools = make("div", "msg-tools");
      const label = article.dataset.role === "user" ? "Copy message" : "Copy answer";
      tools.append(iconButton("copy", label, { action: "copy" }));
      article.append(tools);
    }
    versions.renderSwitcher(article);
    const text = article.querySelector(".msg-body").textContent.trim();
    showCopy(article, text !== "" || article.dataset.status === "streaming");
    const body = article.querySelector(".msg-body.prose");
    if (body) enhanceProse(body);
  }

  // A head over each code block: its language and a copy button. `root` is
  // an answer's body or a fragment about to go into one.
  function enhanceProse(root) {
    for (const pre of root.querySelectorAll("pre")) {
      if (pre.parentNode.classList && pre.parentNode.classList.contains("code-block")) continue;
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

  // The finished answer: the server's sanitised HTML, in place of what streamed.
  function showFinal(article, { html, content, status, usage, model, error }) {
    const body = article.querySelector(".msg-body");
    const template = document.createElement("template");
    template.innerHTML = html; // sanitised by the server (rendering.render_markdown)
    enhanceProse(template.content);
    body.className = "msg-body prose";
    body.replaceChildren(template.content);
    if (typeof content === "string") rawContent.set(article, content);
    article.dataset.status = status;
    article.removeAttribute("aria-busy");
    setMeta(article, { status, usage, model, error });
    showCopy(article, Boolean(content));
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
  }

  // Where the part of a long chat that the model now sees only as a summary ends.
  function showSummaryMarker(through, summary) {
    const after = find(through);
    $("summary-marker")?.remove();
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

  function addAction(article, iconName, label, action, withText = false) {
    const button = iconButton(iconName, label, {
      className: withText ? "btn btn-ghost btn-small act-contextual" : "icon-btn icon-btn-small act-contextual",
      text: withText ? label : undefined,
      action,
    });
    article.querySelector(".msg-tools").append(button);
  }

  // Edit / regenerate / continue / retry: only on the last active question
  // and answer, and not while the conversation is `busy`.
  function refreshLastActions(busy) {
    const active = inner.querySelectorAll(".msg:not([data-inactive])");
    lastUser = null;
    lastAssistant = null;
    for (let i = active.length - 1; i >= 0; i--) {
      const a = active[i];
      if (a.dataset.role === "user") {
        lastUser = a;
        break;
      }
      if (!lastAssistant) lastAssistant = a;
    }
    for (const a of inner.querySelectorAll(".msg.is-last")) {
      a.classList.remove("is-last");
      for (const b of a.querySelectorAll(".act-contextual")) b.remove();
    }
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
  }

  // Clicks on the tools under messages.
  inner.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button || !inner.contains(button)) return;
    const article = button.closest(".msg");
    const act = button.dataset.action;
    if (act === "copy") {
      const text = rawContent.get(article) ?? article.querySelector(".msg-body").innerText;
      copyText(text).then((ok) => flashCopied(button, ok));
    } else if (act === "copy-code") {
      const pre = button.closest(".code-block").querySelector("pre");
      copyText(pre.innerText.replace(/\n$/, "")).then((ok) => flashCopied(button, ok));
    } else if (act === "version-prev" || act === "version-next") {
      versions.step(article, act);
    } else if (act === "edit") {
      onEdit(article);
    } else if (act === "regenerate" || act === "retry") {
      onAction("message.regenerate");
    } else if (act === "continue") {
      onAction("message.continue");
    }
  });

  for (const article of inner.querySelectorAll(".msg")) decorate(article);

  return {
    find,
    build,
    addUser,
    addAssistant,
    setPendingLabel,
    enhanceProse,
    showFinal,
    showFiles: (article, records) => showHeld(article, records, fileUrl),
    addToolChip,
    showSummaryMarker,
    refreshLastActions,
    lastAssistant: () => lastAssistant,
  };
}
