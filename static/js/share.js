// Sharing the conversation shown: the head's Share button makes (or
// updates) its link and shows the address to copy; Revoke ends it. The
// server keeps the snapshot (conversations/sharing.py); nothing of the
// conversation's text passes through here.

import { urlFor } from "./config.js";
import { $, copyText, csrfToken, flashCopied, postJSON } from "./dom.js";

export function setupShare({ current, shell }) {
  const button = $("share-button");
  const dialog = $("share-dialog");
  if (!button || !dialog) return;
  const address = $("share-url");
  const status = $("share-status");

  async function share() {
    const id = current();
    if (!id) return;
    status.textContent = "";
    try {
      const link = await postJSON(urlFor("share", id), {});
      address.value = link.url;
      status.textContent = `The link shows this conversation as of ${new Date(link.updated_at).toLocaleString()}. Share again to include later answers; the address stays.`;
      if (!dialog.open) dialog.showModal();
      address.select();
    } catch (error) {
      shell.showError(error.message);
    }
  }

  async function revoke() {
    const response = await fetch(urlFor("share", current()), {
      method: "DELETE",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
    });
    if (response.ok) {
      address.value = "";
      status.textContent = "The link is revoked: its address no longer opens.";
      shell.announce("Link revoked");
    } else {
      status.textContent = "The link could not be revoked. Try again.";
    }
  }

  button.addEventListener("click", share);
  $("share-copy").addEventListener("click", (event) => {
    copyText(address.value).then((ok) => flashCopied(event.currentTarget, ok));
  });
  $("share-update").addEventListener("click", share);
  $("share-revoke").addEventListener("click", revoke);
}
