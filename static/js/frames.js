// What the server says (the websocket contract: docs/architecture.md), frame by frame.

export function createFrames({ conversation, adopt, leaveDeleted, messages, versions, stream, composer, shell, scroller, sidebar, showModel, changed }) {
  const isCurrent = (frame) => Boolean(conversation()) && frame.conversation === conversation();
  // The banner of the project this page shows (its page, or a chat of it), if it is that one.
  const shownProject = (id) => document.querySelector(`#project-banner[data-project-id="${CSS.escape(id)}"]`);

  const handlers = {
    "conversation.created"(frame) {
      const c = frame.conversation;
      if (!c || !c.id) return;
      // Every tab of the user hears this; only the tab that is waiting for a
      // new conversation switches to it (message.created confirms by client_id).
      if (!conversation() && composer.waitingForNew()) {
        adopt(c.id, c.title);
        showModel(c.model);
      }
      if (sidebar) sidebar.place(c.id, c.title, c.project || null);
    },

    "conversation.updated"(frame) {
      const c = frame.conversation;
      if (!c || !c.id) return;
      if (sidebar) {
        if ("project" in c) sidebar.place(c.id, c.title, c.project); // moved into a project, or out
        else if (sidebar.has(c.id)) sidebar.applyTitle(c.id, c.title);
        // A title of a chat not listed here (older than the chats loaded, or
        // than a project's newest): it shows when the list loads that chat.
      }
      if (c.id === conversation() && c.title) shell.setTitle(c.title);
    },

    // A project made, renamed or deleted (in any tab): the sidebar and the Move menu follow.
    "project.created"(frame) {
      if (sidebar) sidebar.putProject(frame.project);
    },

    "project.updated"(frame) {
      const p = frame.project;
      if (!p || !p.id) return;
      if (sidebar) sidebar.putProject(p);
      const name = shownProject(p.id) && shownProject(p.id).querySelector(".project-banner-name a");
      if (name) name.textContent = p.name;
    },

    "project.deleted"(frame) {
      const p = frame.project;
      if (!p || !p.id) return;
      if (sidebar) sidebar.dropProject(p.id);
      const banner = shownProject(p.id);
      if (!banner) return;
      // Its own page is gone (a chat started there would be refused): home.
      // A chat of it stays open, out of any project now.
      if (!conversation()) leaveDeleted();
      else banner.remove();
    },

    "conversation.deleted"(frame) {
      const c = frame.conversation;
      const id = typeof c === "string" ? c : c && c.id;
      if (!id) return;
      if (sidebar) sidebar.remove(id);
      else if (id === conversation()) leaveDeleted();
    },

    "message.created"(frame) {
      const m = frame.message;
      if (!m) return;
      const replaces = frame.replaces || m.replaces;
      const group = frame.version_group || m.version_group || "";
      const mine = composer.confirm(frame.client_id);
      if (mine) {
        if (m.conversation !== conversation()) adopt(m.conversation);
        if (mine.kind === "edit") {
          const old = versions.retire(messages.find(replaces || mine.frame.message));
          const article = messages.addUser({ id: m.id, status: m.status, content: m.content, attachments: m.attachments });
          versions.join(article, group, old);
          if (old) messages.setPendingLabel(old, null);
        } else {
          mine.el.dataset.messageId = m.id;
          mine.el.dataset.status = m.status;
          messages.showFiles(mine.el, m.attachments); // with what the model read of each
          if (group) mine.el.dataset.versionGroup = group;
          delete mine.el.dataset.clientId;
          messages.setPendingLabel(mine.el, null);
        }
        if (sidebar) sidebar.upsert(m.conversation, null);
        changed();
        scroller.toBottom(true);
        return;
      }
      if (m.conversation !== conversation() || messages.find(m.id)) return;
      // Sent from another tab into the conversation shown here.
      const old = replaces ? versions.retire(messages.find(replaces)) : null;
      const article = messages.addUser({ id: m.id, status: m.status, content: m.content, group, attachments: m.attachments });
      if (old) versions.join(article, group, old);
      if (sidebar) sidebar.upsert(m.conversation, null);
      changed();
      scroller.toBottom();
    },

    "generation.started"(frame) {
      if (!isCurrent(frame)) return;
      composer.started();
      const current = stream.current();
      if (current && current.id !== frame.message) stream.end();
      let article = messages.find(frame.message);
      if (!article) {
        const old = frame.replaces ? versions.retire(messages.find(frame.replaces)) : null;
        article = messages.addAssistant(frame.message, { group: frame.version_group || "" });
        if (old || frame.version_group) versions.join(article, frame.version_group, old);
      }
      stream.begin(frame.message, article);
      scroller.toBottom();
    },

    "generation.tool"(frame) {
      if (!isCurrent(frame)) return;
      const article = messages.find(frame.message);
      if (article) messages.addToolChip(article, frame);
    },

    "conversation.summary"(frame) {
      if (isCurrent(frame)) messages.showSummaryMarker(frame.through, frame.summary);
    },

    "generation.snapshot"(frame) {
      if (isCurrent(frame)) stream.snapshot(frame);
    },

    "generation.delta"(frame) {
      if (isCurrent(frame)) stream.delta(frame);
    },

    "generation.finished"(frame) {
      if (!isCurrent(frame)) return;
      if (stream.finish(frame)) {
        composer.answered();
        stream.end();
      } else {
        changed();
      }
      scroller.toBottom();
    },

    error(frame) {
      let text = frame.message || "Something went wrong.";
      if (!composer.refuse(frame.client_id) && frame.conversation && conversation() && frame.conversation !== conversation()) {
        return; // about some other conversation this socket once followed
      }
      composer.refused();
      if (frame.code === "quota_exceeded" && !frame.retry_after) text = text || "You have used your quota.";
      shell.showError(text, frame.retry_after);
      changed();
      composer.autoGrow();
      scroller.toBottom(); // the error area takes room from the list: keep the last message in view
    },
  };

  return function dispatch(frame) {
    const handler = handlers[frame.type];
    if (handler) handler(frame);
  };
}
