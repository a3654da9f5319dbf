// Small DOM helpers shared by the chat page's modules. Text is only ever set
// as text: nothing here parses HTML.

export const $ = (id) => document.getElementById(id);

export function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  const use = document.createElementNS(SVG, "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
}

// A button with an icon and an accessible name; `text` is shown beside the
// icon, otherwise the label is only for assistive technology and the tooltip.
export function iconButton(name, label, { className = "icon-btn icon-btn-small", text, action } = {}) {
  const button = make("button", className);
  button.type = "button";
  button.append(icon(name));
  if (text) button.append(make("span", "btn-text", text));
  button.setAttribute("aria-label", label);
  button.title = label;
  if (action) button.dataset.action = action;
  return button;
}

export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  if (match) return decodeURIComponent(match[1]);
  const input = document.querySelector('input[name="csrfmiddlewaretoken"]');
  return input ? input.value : "";
}

export async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), Accept: "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error) || `The server answered ${response.status}.`;
    throw new Error(message);
  }
  return data;
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Older browsers or a denied permission: the selection route.
    const area = make("textarea", "visually-hidden");
    area.value = text;
    area.setAttribute("readonly", "");
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }
}

// Brief "Copied" feedback on a copy button.
export function flashCopied(button, ok) {
  const use = button.querySelector("use");
  const label = button.getAttribute("aria-label");
  button.classList.add(ok ? "is-done" : "is-failed");
  if (use) use.setAttribute("href", ok ? "#i-check" : "#i-copy");
  button.setAttribute("aria-label", ok ? "Copied" : "Copy failed");
  const text = button.querySelector(".btn-text");
  const oldText = text ? text.textContent : null;
  if (text) text.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.classList.remove("is-done", "is-failed");
    if (use) use.setAttribute("href", "#i-copy");
    button.setAttribute("aria-label", label);
    if (text) text.textContent = oldText;
  }, 1500);
}
