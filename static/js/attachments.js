// Files in the chat: the composer's tray (the attach button, drag and drop
// onto the composer, a pasted screenshot; a chip per file with its name, its
// size and its upload's progress, removable until it is sent) and the files
// shown on a question once it is sent (also after a reload: the server
// renders the same chips).
//
// A file is uploaded as soon as it is chosen (POST /files/, the session and
// CSRF); the send names the uploaded files by id. Names and errors are only
// ever set as text.

import { $, csrfToken, iconButton, make } from "./dom.js";

export function describeBytes(n) {
  for (const [unit, size] of [["GB", 2 ** 30], ["MB", 2 ** 20], ["KB", 2 ** 10]]) {
    if (n >= size) return `${(n / size).toFixed(1).replace(/\.0$/, "")} ${unit}`;
  }
  return `${n} bytes`;
}

const isImage = (type) => /^image\/(png|jpeg|webp|gif)$/.test(type || "");

// What the model read of a file, when not all of it.
export function cutNote(record) {
  if (record.read_tokens === undefined || record.read_tokens >= record.tokens) return "";
  if (!record.read_tokens) return "Not read: the message's files had used up their room.";
  return `Only the first ${record.read_tokens.toLocaleString("en")} of ${record.tokens.toLocaleString("en")} tokens were read.`;
}

// One sent file, as a question shows it: a download link (a thumbnail for a
// picture), its size, and what the model read of it.
function heldChip(record, fileUrl) {
  const chip = make("li", "file-chip is-sent");
  chip.dataset.fileId = record.id;
  const link = make("a", "file-chip-link");
  link.href = fileUrl(record.id);
  link.download = record.filename;
  link.title = `Download ${record.filename}`;
  if (isImage(record.content_type)) {
    const thumb = make("img", "file-thumb");
    thumb.src = fileUrl(record.id);
    thumb.alt = "";
    thumb.loading = "lazy";
    link.append(thumb);
  }
  link.append(make("span", "file-name", record.filename));
  chip.append(link, make("span", "file-size", describeBytes(record.bytes)));
  const note = cutNote(record);
  if (note) chip.append(make("span", "file-note", note));
  return chip;
}

export function showHeld(article, records, fileUrl) {
  article.querySelector(".msg-files")?.remove();
  if (!records || !records.length) return;
  const list = make("ul", "msg-files");
  list.setAttribute("aria-label", "Files sent with this message");
  for (const record of records) list.append(heldChip(record, fileUrl));
  article.querySelector(".msg-body").before(list);
}

export function createTray({ config, shell, onChange }) {
  const el = {
    composer: $("composer"),
    list: $("attach-list"),
    button: $("attach-button"),
    input: $("file-input"),
    textarea: $("composer-input"),
  };
  const most = config.files.maxPerMessage;
  // Each chip: {id (once uploaded), file, record, request, error, node}.
  let items = [];

  function changed() {
    el.list.hidden = items.length === 0;
    el.composer.classList.toggle("has-files", items.length > 0);
    onChange();
  }

  function remove(item) {
    if (item.request) item.request.abort();
    if (item.preview) URL.revokeObjectURL(item.preview);
    item.node.remove();
    items = items.filter((i) => i !== item);
    changed();
    el.textarea.focus({ preventScroll: true });
  }

  function chipFor(item, name, size, type) {
    const chip = make("li", "file-chip is-uploading");
    if (isImage(type) && item.file) {
      item.preview = URL.createObjectURL(item.file);
      const thumb = make("img", "file-thumb");
      thumb.src = item.preview;
      thumb.alt = "";
      chip.append(thumb);
    }
    const label = make("span", "file-label");
    label.append(make("span", "file-name", name), make("span", "file-size", describeBytes(size)));
    const bar = make("progress", "file-progress");
    bar.max = 100;
    bar.value = 0;
    bar.setAttribute("aria-label", `Uploading ${name}`);
    const status = make("span", "file-status");
    status.setAttribute("role", "status");
    const removeButton = iconButton("close", `Remove ${name}`, { className: "icon-btn icon-btn-small file-remove" });
    removeButton.addEventListener("click", () => remove(item));
    chip.append(label, bar, status, removeButton);
    return chip;
  }

  function fail(item, message) {
    item.error = message;
    item.node.classList.remove("is-uploading");
    item.node.classList.add("is-error");
    item.node.querySelector(".file-progress").hidden = true;
    item.node.querySelector(".file-status").textContent = message;
    changed();
  }

  function upload(item) {
    const form = new FormData();
    form.append("file", item.file, item.file.name || "pasted.png");
    const request = new XMLHttpRequest();
    item.request = request;
    request.open("POST", config.urls.files);
    request.setRequestHeader("X-CSRFToken", csrfToken());
    request.setRequestHeader("Accept", "application/json");
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) item.node.querySelector(".file-progress").value = (100 * event.loaded) / event.total;
    });
    request.addEventListener("load", () => {
      item.request = null;
      const body = request.response;
      if (request.status === 201 && body && body.id) {
        item.id = body.id;
        item.record = body;
        item.node.classList.remove("is-uploading");
        item.node.classList.add("is-ready");
        item.node.dataset.fileId = body.id;
        item.node.querySelector(".file-progress").value = 100;
        item.node.querySelector(".file-progress").hidden = true;
        changed();
      } else {
        const message = (body && body.error && (body.error.message || body.error)) || `Upload failed (${request.status}).`;
        fail(item, String(message));
      }
    });
    request.addEventListener("error", () => {
      item.request = null;
      fail(item, "Upload failed: no connection.");
    });
    request.send(form);
  }

  function add(files) {
    for (const file of files) {
      if (items.length >= most) {
        shell.showError(`At most ${most} files can go with one message.`);
        break;
      }
      if (file.size > config.files.maxBytes) {
        shell.showError(`${file.name} is ${describeBytes(file.size)}; files may be at most ${describeBytes(config.files.maxBytes)}.`);
        continue;
      }
      const item = { file, id: null, record: null, request: null, error: null, node: null };
      item.node = chipFor(item, file.name || "pasted image", file.size, file.type);
      el.list.append(item.node);
      items.push(item);
      upload(item);
    }
    changed();
  }

  // Files that were sent and refused come back to the tray, already uploaded.
  function restore(records) {
    for (const record of records || []) {
      if (items.some((i) => i.id === record.id)) continue;
      const item = { file: null, id: record.id, record, request: null, error: null, node: null };
      item.node = chipFor(item, record.filename, record.bytes, record.content_type);
      item.node.classList.remove("is-uploading");
      item.node.classList.add("is-ready");
      item.node.querySelector(".file-progress").hidden = true;
      el.list.append(item.node);
      items.push(item);
    }
    changed();
  }

  // What a send carries, and empties the tray (the chips' files are the question's now).
  function take() {
    const ready = items.filter((i) => i.id);
    const records = ready.map((i) => ({ ...i.record, read_tokens: undefined }));
    for (const item of items) {
      if (item.preview) URL.revokeObjectURL(item.preview);
      item.node.remove();
    }
    items = [];
    changed();
    return { ids: ready.map((i) => i.id), records };
  }

  el.button.addEventListener("click", () => el.input.click());
  el.input.addEventListener("change", () => {
    add([...el.input.files]);
    el.input.value = "";
  });
  // Drag and drop onto the composer.
  let depth = 0;
  el.composer.addEventListener("dragenter", (event) => {
    if (![...(event.dataTransfer?.types || [])].includes("Files")) return;
    event.preventDefault();
    depth += 1;
    el.composer.classList.add("is-dropping");
  });
  el.composer.addEventListener("dragover", (event) => {
    if ([...(event.dataTransfer?.types || [])].includes("Files")) event.preventDefault();
  });
  el.composer.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) el.composer.classList.remove("is-dropping");
  });
  el.composer.addEventListener("drop", (event) => {
    depth = 0;
    el.composer.classList.remove("is-dropping");
    const files = [...(event.dataTransfer?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    add(files);
  });
  // A pasted screenshot (text pastes as usual).
  el.textarea.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    add(files);
  });

  return {
    add,
    take,
    restore,
    uploading: () => items.some((i) => i.request),
    hasReady: () => items.some((i) => i.id),
    hasFailed: () => items.some((i) => i.error),
    setDisabled(disabled) {
      el.button.disabled = disabled;
    },
  };
}
