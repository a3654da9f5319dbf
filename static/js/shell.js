// The page around the conversation: its title, the connection line, the
// error area, the screen-reader announcer, the drawer (narrow screens), the
// head's "More" menu and the keyboard shortcuts.

import { $, make } from "./dom.js";

function describeWait(seconds) {
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.ceil(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  const rest = minutes % 60;
  return rest ? `${hours} h ${rest} min` : `${hours} h`;
}

export function createShell({ loginUrl }) {
  const el = {
    title: $("chat-title"),
    conn: $("connection-status"),
    error: $("chat-error"),
    errorText: $("chat-error-text"),
    errorClose: $("chat-error-close"),
    announcer: $("announcer"),
  };
  let retryTimer = null;

  function setTitle(title) {
    el.title.textContent = title;
    document.title = `${title} · Chat`;
  }

  // An error above the composer; with `retryAfter` (seconds), the time when
  // trying again will work, counting down.
  function showError(text, retryAfter) {
    clearInterval(retryTimer);
    el.error.hidden = false;
    if (!retryAfter) {
      el.errorText.textContent = text;
      return;
    }
    const until = new Date(Date.now() + retryAfter * 1000);
    const sameDay = until.toDateString() === new Date().toDateString();
    const time = until.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
    const day = until.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" });
    const at = sameDay ? time : `${day} ${time}`;
    // The precise time replaces a vague "try again shortly / in N s".
    const base = text
      .replace(/\s*\(?Retry after [^)]*\)?\.?$/i, "")
      .replace(/[;,.]?\s*(try again|resets) (shortly|later|soon|in [^.;]*)\.?$/i, ".")
      .replace(/\.\.$/, ".");
    const tick = () => {
      const left = Math.ceil((until.getTime() - Date.now()) / 1000);
      if (left <= 0) {
        clearInterval(retryTimer);
        el.errorText.textContent = `${base} You can try again now.`;
        el.error.classList.remove("is-waiting");
        return;
      }
      el.errorText.textContent = `${base} Try again at ${at} (in ${describeWait(left)}).`;
    };
    el.error.classList.add("is-waiting");
    tick();
    retryTimer = setInterval(tick, 1000);
  }

  function clearError() {
    clearInterval(retryTimer);
    el.error.hidden = true;
    el.error.classList.remove("is-waiting");
    el.errorText.textContent = "";
  }
  el.errorClose.addEventListener("click", clearError);

  // Said to screen readers (a polite live region); errors also show on screen.
  function announce(text, isError = false) {
    if (isError) showError(text);
    if (!el.announcer) return;
    el.announcer.textContent = "";
    setTimeout(() => {
      el.announcer.textContent = text;
    }, 50);
  }

  function setConnection(text) {
    el.conn.replaceChildren();
    el.conn.hidden = !text;
    el.conn.classList.remove("is-ended");
    el.conn.classList.toggle("is-reconnecting", Boolean(text));
    if (text) el.conn.textContent = text;
  }

  function showEnded() {
    el.conn.replaceChildren();
    el.conn.classList.add("is-ended");
    el.conn.append("Your session has ended — ");
    const link = make("a", "", "log in again");
    link.href = `${loginUrl}?next=${encodeURIComponent(location.pathname)}`;
    el.conn.append(link);
    el.conn.hidden = false;
  }

  return { setTitle, showError, clearError, announce, setConnection, showEnded };
}

// Narrow screens: export and shortcuts fold into a "More" menu in the chat's head.
export function setupHeadMenu() {
  const more = $("head-more");
  const tools = $("chat-head-tools");
  if (!more || !tools) return;
  const setOpen = (open) => {
    tools.classList.toggle("is-open", open);
    more.setAttribute("aria-expanded", String(open));
  };
  more.addEventListener("click", (event) => {
    event.stopPropagation();
    setOpen(!tools.classList.contains("is-open"));
  });
  document.addEventListener("click", (event) => {
    if (!tools.contains(event.target)) setOpen(false);
  });
  tools.addEventListener("click", (event) => {
    if (event.target.closest("a, button")) setOpen(false);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && tools.classList.contains("is-open")) {
      setOpen(false);
      more.focus();
    }
  });
}

// Narrow screens: the conversation list slides in over the chat.
export function setupDrawer() {
  const sidebar = $("sidebar");
  const toggle = $("sidebar-toggle");
  const scrim = $("sidebar-scrim");
  const close = $("sidebar-close");
  if (!toggle || !sidebar) return null;
  const narrow = window.matchMedia("(max-width: 760px)");
  const isOpen = () => sidebar.classList.contains("is-open");
  const setOpen = (open) => {
    sidebar.classList.toggle("is-open", open);
    scrim.hidden = !open;
    toggle.setAttribute("aria-expanded", String(open));
    toggle.setAttribute("aria-label", open ? "Hide conversations" : "Show conversations");
    if (narrow.matches) sidebar.inert = !open;
    if (open) (sidebar.querySelector(".conv-item.is-current .conv-link") || $("new-chat")).focus();
  };
  const closeAndReturn = () => {
    setOpen(false);
    toggle.focus();
  };
  const apply = () => {
    sidebar.inert = narrow.matches && !isOpen();
  };
  apply();
  narrow.addEventListener("change", apply);
  toggle.addEventListener("click", () => setOpen(!isOpen()));
  scrim.addEventListener("click", () => setOpen(false));
  if (close) close.addEventListener("click", closeAndReturn);
  sidebar.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && narrow.matches && isOpen()) {
      event.preventDefault();
      event.stopPropagation();
      closeAndReturn();
    }
  });
  return {
    open: () => setOpen(true),
    close: closeAndReturn,
    isOpen: () => narrow.matches && isOpen(),
    isNarrow: () => narrow.matches,
  };
}

function typingIn(target) {
  return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

// Keyboard shortcuts (also listed in the page: the "?" dialog).
export function setupShortcuts({ drawer, sidebar, newChat, focusInput, isStreaming, stop }) {
  const dialog = $("shortcuts-dialog");
  document.addEventListener("keydown", (event) => {
    const mod = event.ctrlKey || event.metaKey;
    if (mod && event.shiftKey && (event.key === "O" || event.key === "o")) {
      event.preventDefault();
      newChat();
    } else if (mod && !event.shiftKey && (event.key === "k" || event.key === "K")) {
      event.preventDefault();
      if (drawer && drawer.isNarrow()) drawer.open();
      if (sidebar) sidebar.focusSearch();
    } else if (event.key === "Escape" && event.shiftKey) {
      event.preventDefault();
      focusInput();
    } else if (event.key === "Escape" && drawer && drawer.isOpen()) {
      event.preventDefault();
      drawer.close();
    } else if (event.key === "Escape" && isStreaming() && !document.querySelector("dialog[open]")) {
      event.preventDefault();
      stop();
    } else if (event.key === "?" && !mod && !typingIn(event.target)) {
      event.preventDefault();
      dialog.showModal();
    }
  });
  $("shortcuts-button").addEventListener("click", () => dialog.showModal());
}
