// The chat page: the client side of the websocket contract (docs/architecture.md).
// Plain ES modules, no build step; this one wires them together:
//
//   socket.js    the websocket, reconnects, long frames
//   frames.js    what each server frame does to the page
//   messages.js  the messages in the list and the tools under them
//   versions.js  "‹ 2/3 ›": versions of a question or an answer
//   stream.js    the answer streaming now; live.js formats it as it grows
//   composer.js  typing, drafts, sending, stop, edit
//   attachments.js  files: the composer's tray, the files on a question
//   scroll.js    following the bottom, "jump to latest"
//   shell.js     title, errors, connection line, drawer, menus, shortcuts
//   sidebar.js   the conversation list
//
// Model and user text are only ever inserted as text, or as HTML that went
// through a sanitiser (the server's for a finished answer, DOMPurify with the
// same rules while it streams).

import { config, urlFor } from "./config.js";
import { $ } from "./dom.js";
import { createTray } from "./attachments.js";
import { createComposer } from "./composer.js";
import { createFrames } from "./frames.js";
import { createMessages } from "./messages.js";
import { createScroller } from "./scroll.js";
import { setupShare } from "./share.js";
import { createShell, setupDrawer, setupHeadMenu, setupShortcuts } from "./shell.js";
import { createSidebar } from "./sidebar.js";
import { createSocket } from "./socket.js";
import { createStream } from "./stream.js";
import { createVersions } from "./versions.js";

function start() {
  const inner = $("messages-inner");
  if (!config || !$("composer") || !inner) return;
  let conversation = config.conversation;
  const current = () => conversation;

  const shell = createShell({ loginUrl: config.urls.login });
  const versions = createVersions(inner);
  // Late-bound: the modules below call each other through these.
  let composer = null;
  let stream = null;
  const changed = () => {
    composer.update();
    messages.refreshLastActions(composer.busy());
  };
  const socket = createSocket({
    path: config.wsPath,
    onOpen(again) {
      join(again);
      composer.resend();
      composer.update();
    },
    onFrame: (frame) => dispatch(frame),
    onStatus: shell.setConnection,
    onEnded() {
      composer.end();
      shell.showEnded();
      composer.update();
    },
  });
  const messages = createMessages({
    inner,
    versions,
    fileUrl: (id) => urlFor("file", id),
    onAction: (type) => composer.action(type),
    onEdit: (article) => composer.startEdit(article),
  });
  const scroller = createScroller({
    messages: $("messages"),
    inner,
    jump: $("jump-latest"),
    isStreaming: () => stream.isStreaming(),
    onJump: () => composer.focus(),
  });
  stream = createStream({
    messages,
    scroller,
    askSnapshot: (after) => socket.send({ type: "conversation.join", conversation, after }),
    onChange: changed,
  });
  const tray = createTray({ config, shell, onChange: () => composer && composer.update() });
  composer = createComposer({
    config,
    socket,
    messages,
    tray,
    shell,
    scroller,
    isStreaming: stream.isStreaming,
    conversation: current,
    onChange: changed,
  });
  const sidebar = createSidebar({
    urls: config.urls,
    current,
    onDeletedCurrent: leaveDeleted,
    announce: shell.announce,
  });

  // Follow the conversation. `after` says "I was following an answer": if it
  // has ended meanwhile, the server replays its `generation.finished`.
  function join(again) {
    if (!conversation) return;
    const frame = { type: "conversation.join", conversation };
    if (again || stream.isStreaming()) frame.after = stream.lastSeq();
    socket.send(frame);
  }

  // The first message of a new chat made `id`: the page becomes its page.
  function adopt(id, title) {
    if (conversation === id) return;
    const wasNew = !conversation;
    conversation = id;
    history.replaceState(null, "", urlFor("conversation", id));
    if (wasNew) composer.clearDraft(null);
    const promptPick = $("prompt-pick");
    if (promptPick) {
      const option = $("prompt-select")?.selectedOptions[0];
      if (option && option.value) {
        $("prompt-chip-name").textContent = option.textContent;
        $("prompt-chip").hidden = false;
      }
      promptPick.hidden = true;
    }
    const modelPick = $("model-pick");
    if (modelPick) modelPick.hidden = true;
    $("export-md").href = urlFor("exportMd", id);
    $("export-json").href = urlFor("exportJson", id);
    $("export-links").hidden = false;
    const share = $("share-button");
    if (share && config.sharing) share.hidden = false;
    if (title) shell.setTitle(title);
    if (sidebar) sidebar.setCurrent(id);
  }

  // The model chip of a new conversation: the model picked, or the server's.
  function showModel(name) {
    const chip = $("model-chip");
    const option = $("model-select")?.selectedOptions[0];
    const label = option && option.value ? option.textContent : name;
    if (!chip || !label) return;
    $("model-chip-name").textContent = label;
    chip.hidden = false;
  }

  function leaveDeleted() {
    composer.clearDraft();
    location.assign(config.urls.home);
  }

  const dispatch = createFrames({
    conversation: current,
    adopt,
    leaveDeleted,
    messages,
    versions,
    stream,
    composer,
    shell,
    scroller,
    sidebar,
    showModel,
    changed,
  });

  setupShare({ current, shell });
  const drawer = setupDrawer();
  setupHeadMenu();
  setupShortcuts({
    drawer,
    sidebar,
    newChat() {
      composer.saveDraft();
      location.assign(config.urls.home);
    },
    focusInput: composer.focus,
    isStreaming: stream.isStreaming,
    stop: composer.stop,
  });

  changed();
  // A rendered answer still streaming (page loaded mid-answer) is the
  // streaming bubble; the join brings its snapshot.
  const last = messages.lastAssistant();
  if (last && last.dataset.status === "streaming" && conversation) stream.begin(last.dataset.messageId, last);

  composer.loadDraft();
  composer.autoGrow();
  composer.update();
  scroller.toBottom(true);
  if (!conversation || composer.hasText()) composer.focus();
  socket.connect();
}

start();
