// The conversation list: newest first, loaded 50 at a time as it scrolls,
// searchable over titles and message text, with rename and delete.
//
// GET  {urls.list}?cursor=&q=  -> {conversations: [{id, title, updated_at, pinned, snippet}], next}
// POST {urls.rename} {title}   -> {conversation: {id, title}}
// POST {urls.delete}           -> {deleted: id}
// (the page's config gives the addresses; "{id}" stands for the conversation)

import { $, iconButton, make, postJSON } from "./dom.js";

const SEARCH_DELAY = 250; // ms of quiet typing before a search goes out
const PAGE_SIZE = 50;

export function createSidebar({ urls, current, onDeletedCurrent, announce }) {
  const at = (name, id) => urls[name].replace("{id}", id);
  const list = $("conversation-list");
  const empty = $("conversation-empty");
  const more = $("conversation-more");
  const sentinel = $("conversation-sentinel");
  const nav = $("conv-nav");
  const search = $("conv-search");
  const searchForm = $("conv-search-form");
  const heading = $("conv-heading");
  const dialog = $("confirm-dialog");
  if (!list) return null;

  const results = make("ul", "conv-list conv-results");
  results.id = "search-results";
  results.hidden = true;
  results.setAttribute("aria-label", "Search results");
  list.after(results);

  const state = {
    current: current(),
    // The first page came with the page; its cursor did not: `undefined`
    // means "ask from the start and skip what is shown".
    next: list.querySelectorAll(".conv-item").length >= PAGE_SIZE ? undefined : null,
    loading: false,
    query: "",
    queryNext: null,
    queryToken: 0,
    searchTimer: null,
  };

  // --- Items -------------------------------------------------------------------------

  function item(c) {
    const li = make("li", "conv-item");
    li.dataset.conversationId = c.id;
    if (c.updated_at) li.dataset.updated = c.updated_at;
    const link = make("a", "conv-link");
    link.href = at("conversation", c.id);
    link.append(make("span", "conv-title", c.title || "New chat"));
    if (c.snippet) link.append(make("span", "conv-snippet", c.snippet));
    li.append(link);
    const actions = make("span", "conv-actions");
    actions.append(iconButton("edit", "", { action: "rename" }), iconButton("trash", "", { action: "delete" }));
    li.append(actions);
    setItemTitle(li, c.title || "New chat", c.updated_at);
    return li;
  }

  function setItemTitle(li, title, updatedAt) {
    const titleEl = li.querySelector(".conv-title");
    if (titleEl) titleEl.textContent = title;
    const link = li.querySelector(".conv-link");
    let tip = title;
    if (updatedAt) {
      const date = new Date(updatedAt);
      if (!Number.isNaN(date.getTime())) tip += ` — ${date.toLocaleString()}`;
    }
    link.title = tip;
    const rename = li.querySelector('[data-action="rename"]');
    const del = li.querySelector('[data-action="delete"]');
    if (rename) {
      rename.setAttribute("aria-label", `Rename “${title}”`);
      rename.title = "Rename";
    }
    if (del) {
      del.setAttribute("aria-label", `Delete “${title}”`);
      del.title = "Delete";
    }
  }

  // --- Date groups, as ChatGPT's sidebar: today, yesterday, the week, the month, older ---------

  function groupOf(updated, now) {
    const date = new Date(updated);
    if (Number.isNaN(date.getTime())) return "Today";
    const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate());
    const day = 24 * 3600 * 1000;
    if (date >= startOfToday) return "Today";
    if (date >= new Date(startOfToday - day)) return "Yesterday";
    if (date >= new Date(startOfToday - 7 * day)) return "Previous 7 days";
    if (date >= new Date(startOfToday - 30 * day)) return "Previous 30 days";
    return "Older";
  }

  // The list is newest first: a heading goes before the first chat of each group.
  function regroup() {
    for (const old of list.querySelectorAll(".conv-group")) old.remove();
    const now = new Date();
    let last = null;
    for (const li of list.querySelectorAll(".conv-item")) {
      const group = groupOf(li.dataset.updated || now.toISOString(), now);
      if (group === last) continue;
      const heading = make("li", "conv-group", group);
      heading.setAttribute("role", "presentation");
      li.before(heading);
      last = group;
    }
  }

  // The chat next to this one (arrow keys, focus after a delete), headings skipped.
  function neighbour(li, forward) {
    let n = forward ? li.nextElementSibling : li.previousElementSibling;
    while (n && !n.classList.contains("conv-item")) n = forward ? n.nextElementSibling : n.previousElementSibling;
    return n;
  }

  function findItem(id, where = list) {
    return where.querySelector(`li[data-conversation-id="${CSS.escape(id)}"]`);
  }

  function allItems(id) {
    return document.querySelectorAll(`.conv-item[data-conversation-id="${CSS.escape(id)}"]`);
  }

  function highlight() {
    for (const li of document.querySelectorAll(".conv-item")) {
      const isCurrent = li.dataset.conversationId === state.current;
      li.classList.toggle("is-current", isCurrent);
      const link = li.querySelector(".conv-link");
      if (isCurrent) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    for (const li of document.querySelectorAll(".project-chat")) {
      const isCurrent = li.dataset.conversationId === state.current;
      li.classList.toggle("is-current", isCurrent);
      const link = li.querySelector("a");
      if (isCurrent) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  function updateEmpty() {
    if (empty) empty.hidden = list.hidden || list.querySelector(".conv-item") !== null;
  }

  // --- Paging ---------------------------------------------------------------------------

  async function fetchPage(params) {
    const query = new URLSearchParams();
    if (params.cursor) query.set("cursor", params.cursor);
    if (params.q) query.set("q", params.q);
    const response = await fetch(`${urls.list}?${query}`, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) throw new Error(`The server answered ${response.status}.`);
    return response.json();
  }

  async function loadMore() {
    if (state.loading) return;
    const searching = Boolean(state.query);
    const cursor = searching ? state.queryNext : state.next;
    if (cursor === null) return;
    if (searching && cursor === undefined) return;
    state.loading = true;
    more.textContent = "Loading…";
    const token = state.queryToken;
    try {
      const data = await fetchPage({ cursor, q: state.query });
      if (token !== state.queryToken) return; // a newer search replaced this one
      const target = searching ? results : list;
      for (const c of data.conversations || []) {
        if (findItem(c.id, target)) continue;
        target.append(item(c));
      }
      if (searching) state.queryNext = data.next || null;
      else state.next = data.next || null;
      more.textContent = "";
      if (!searching) regroup();
      highlight();
      updateEmpty();
    } catch (error) {
      more.textContent = `Could not load more chats: ${error.message}`;
    } finally {
      state.loading = false;
    }
    // Still at the end of the list (a tall screen): keep going.
    if (sentinelVisible()) loadMore();
  }

  function sentinelVisible() {
    const box = nav.getBoundingClientRect();
    const s = sentinel.getBoundingClientRect();
    return s.top <= box.bottom + 200 && box.height > 0;
  }

  const observer = new IntersectionObserver(
    (entries) => {
      if (entries.some((e) => e.isIntersecting)) loadMore();
    },
    { root: nav, rootMargin: "0px 0px 300px 0px" },
  );
  observer.observe(sentinel);

  // --- Search ------------------------------------------------------------------------------

  async function runSearch(q) {
    state.query = q;
    const token = ++state.queryToken;
    if (!q) {
      results.hidden = true;
      results.replaceChildren();
      list.hidden = false;
      heading.textContent = "Your chats";
      heading.classList.add("visually-hidden"); // the date groups head the list
      more.textContent = "";
      updateEmpty();
      return;
    }
    more.textContent = "Searching…";
    try {
      const data = await fetchPage({ q });
      if (token !== state.queryToken) return;
      results.replaceChildren(...(data.conversations || []).map(item));
      state.queryNext = data.next || null;
      list.hidden = true;
      results.hidden = false;
      if (empty) empty.hidden = true;
      const n = results.children.length;
      heading.textContent = "Search results";
      heading.classList.remove("visually-hidden");
      more.textContent = n ? "" : `No chats match “${q}”.`;
      announce(n ? `${n}${state.queryNext ? "+" : ""} ${n === 1 ? "chat" : "chats"} found` : "No chats found");
      highlight();
    } catch (error) {
      if (token === state.queryToken) more.textContent = `Search failed: ${error.message}`;
    }
  }

  search.addEventListener("input", () => {
    clearTimeout(state.searchTimer);
    const q = search.value.trim();
    state.searchTimer = setTimeout(() => runSearch(q), q ? SEARCH_DELAY : 0);
  });
  search.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && search.value) {
      event.preventDefault();
      event.stopPropagation();
      search.value = "";
      runSearch("");
    } else if (event.key === "ArrowDown") {
      const first = (results.hidden ? list : results).querySelector(".conv-link");
      if (first) {
        event.preventDefault();
        first.focus();
      }
    }
  });
  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    clearTimeout(state.searchTimer);
    runSearch(search.value.trim());
  });

  // --- Rename ----------------------------------------------------------------------------

  function startRename(li) {
    if (li.querySelector(".conv-rename")) return;
    const id = li.dataset.conversationId;
    const link = li.querySelector(".conv-link");
    const title = li.querySelector(".conv-title").textContent;
    const form = make("form", "conv-rename");
    const label = make("label", "visually-hidden", "New title");
    const input = make("input");
    input.type = "text";
    input.value = title;
    input.maxLength = 200;
    input.id = `rename-${id}`;
    label.htmlFor = input.id;
    form.append(label, input);
    link.hidden = true;
    li.classList.add("is-renaming");
    link.after(form);
    input.focus();
    input.select();

    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const value = input.value.trim();
      if (save && value && value !== title) {
        input.disabled = true;
        try {
          const data = await postJSON(at("rename", id), { title: value });
          const c = (data && data.conversation) || { id, title: value };
          applyTitle(c.id, c.title);
        } catch (error) {
          announce(`Rename failed: ${error.message}`, true);
        }
      }
      form.remove();
      link.hidden = false;
      li.classList.remove("is-renaming");
      const button = li.querySelector('[data-action="rename"]');
      if (button && (document.activeElement === document.body || !document.activeElement)) button.focus();
      else if (button && !save) button.focus();
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      finish(true);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
  }

  // --- Delete ------------------------------------------------------------------------------

  function confirmDelete(li) {
    const id = li.dataset.conversationId;
    const title = li.querySelector(".conv-title").textContent;
    $("confirm-text").textContent = `“${title}” and all its messages will be deleted. This cannot be undone.`;
    dialog.returnValue = "";
    const opener = li.querySelector('[data-action="delete"]');
    dialog.addEventListener(
      "close",
      async () => {
        if (dialog.returnValue !== "confirm") {
          if (opener && opener.isConnected) opener.focus();
          return;
        }
        try {
          await postJSON(at("delete", id));
          removeConversation(id);
        } catch (error) {
          announce(`Delete failed: ${error.message}`, true);
        }
      },
      { once: true },
    );
    dialog.showModal();
  }

  function removeConversation(id) {
    for (const li of allItems(id)) {
      const next = neighbour(li, true) || neighbour(li, false);
      const hadFocus = li.contains(document.activeElement);
      li.remove();
      if (hadFocus && next) next.querySelector(".conv-link").focus();
    }
    regroup();
    updateEmpty();
    if (id === state.current) onDeletedCurrent(id);
  }

  // --- Events --------------------------------------------------------------------------------

  for (const ul of [list, results]) {
    ul.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const li = button.closest(".conv-item");
      if (button.dataset.action === "rename") startRename(li);
      else if (button.dataset.action === "delete") confirmDelete(li);
    });
    ul.addEventListener("keydown", (event) => {
      // Arrow keys move between chats; F2 renames, Delete asks to delete.
      const link = event.target.closest(".conv-link");
      if (!link) return;
      const li = link.closest(".conv-item");
      if (event.key === "ArrowDown" || event.key === "ArrowUp") {
        const sibling = neighbour(li, event.key === "ArrowDown");
        if (sibling) {
          event.preventDefault();
          sibling.querySelector(".conv-link").focus();
        } else if (event.key === "ArrowUp") {
          event.preventDefault();
          search.focus();
        }
      } else if (event.key === "F2") {
        event.preventDefault();
        startRename(li);
      } else if (event.key === "Delete") {
        event.preventDefault();
        confirmDelete(li);
      }
    });
  }

  // --- What the rest of the page tells the list ------------------------------------------------

  function applyTitle(id, title) {
    if (!title) return;
    for (const li of allItems(id)) setItemTitle(li, title);
    for (const span of document.querySelectorAll(`.project-chat[data-conversation-id="${CSS.escape(id)}"] .conv-title`)) {
      span.textContent = title;
    }
  }

  // A chat in a project is listed under the project, not among the others.
  function count(group, by) {
    const shown = group && group.querySelector(".project-count");
    if (!shown) return;
    const n = Math.max(0, (parseInt(shown.textContent, 10) || 0) + by);
    shown.textContent = String(n);
    shown.setAttribute("aria-label", n === 1 ? "1 chat" : `${n} chats`);
  }

  function place(id, title, project) {
    for (const li of document.querySelectorAll(`.project-chat[data-conversation-id="${CSS.escape(id)}"]`)) {
      count(li.closest(".project-group"), -1);
      li.remove();
    }
    if (!project) {
      upsert(id, title);
      return;
    }
    const mine = findItem(id);
    if (mine) mine.remove();
    updateEmpty();
    const ul = document.querySelector(`.project-chats[data-project-id="${CSS.escape(project)}"]`);
    if (!ul) return; // a project this page does not show yet (made in another tab)
    const li = make("li", "project-chat");
    li.dataset.conversationId = id;
    const link = make("a");
    link.href = at("conversation", id);
    link.append(make("span", "conv-title", title || "New chat"));
    li.append(link);
    ul.prepend(li);
    const group = ul.closest("details");
    count(group, 1);
    if (group) group.open = true;
    highlight();
  }

  // A chat that just had a message: to the top of its list (its project's, or the chats').
  function upsert(id, title) {
    const inProject = document.querySelector(`.project-chat[data-conversation-id="${CSS.escape(id)}"]`);
    if (inProject && !findItem(id)) {
      inProject.parentElement.prepend(inProject);
      if (title) inProject.querySelector(".conv-title").textContent = title;
      highlight();
      return;
    }
    let li = findItem(id);
    if (!li) {
      li = item({ id, title: title || "New chat", updated_at: new Date().toISOString() });
      list.prepend(li);
    } else {
      li.dataset.updated = new Date().toISOString();
      list.prepend(li);
      if (title) setItemTitle(li, title);
    }
    regroup();
    updateEmpty();
    highlight();
  }

  // --- Projects made, renamed or deleted in another tab ------------------------------------

  const projectsSection = $("projects");

  // The server's order (projects.listing): by name whatever its case; a new one after its equals.
  function byName(a, b) {
    const x = a.toLowerCase();
    const y = b.toLowerCase();
    return x < y ? -1 : x > y ? 1 : 0;
  }

  function projectGroup(id) {
    return document.querySelector(`.project-group[data-project-id="${CSS.escape(id)}"]`);
  }

  // The Move menu's projects, like the sidebar's: by name.
  function moveOption(project) {
    const select = $("move-select");
    if (!select) return;
    let option = select.querySelector(`option[value="${CSS.escape(project.id)}"]`);
    if (option) option.remove();
    else option = make("option", null, project.name);
    option.value = project.id;
    option.textContent = project.name;
    const after = [...select.options].find((o) => o.value && byName(o.textContent, project.name) > 0);
    select.insertBefore(option, after || null);
  }

  function putProject(project) {
    if (!projectsSection || !project || !project.id) return;
    let group = projectGroup(project.id);
    if (group) {
      group.querySelector(".project-link").textContent = project.name;
      group.remove(); // placed again below: its name decides where
    } else {
      group = make("details", "project-group");
      group.dataset.projectId = project.id;
      const summary = make("summary");
      const link = make("a", "project-link", project.name);
      link.href = at("project", project.id);
      const shown = make("span", "project-count", "0");
      shown.setAttribute("aria-label", "0 chats");
      summary.append(link, shown);
      const chats = make("ul", "project-chats");
      chats.dataset.projectId = project.id;
      group.append(summary, chats);
    }
    const after = [...projectsSection.querySelectorAll(".project-group")].find(
      (g) => byName(g.querySelector(".project-link").textContent, project.name) > 0,
    );
    const none = projectsSection.querySelector(".projects-empty");
    if (after) after.before(group);
    else if (none) none.before(group);
    else projectsSection.append(group);
    if (none) none.hidden = true;
    moveOption(project);
  }

  function dropProject(id) {
    const group = projectGroup(id);
    if (group) group.remove();
    const option = $("move-select") && $("move-select").querySelector(`option[value="${CSS.escape(id)}"]`);
    if (option) option.remove();
    const none = projectsSection && projectsSection.querySelector(".projects-empty");
    if (none && !projectsSection.querySelector(".project-group")) none.hidden = false;
  }

  function setCurrent(id) {
    state.current = id;
    highlight();
  }

  regroup();

  return {
    upsert,
    place,
    putProject,
    dropProject,
    applyTitle,
    remove: removeConversation,
    setCurrent,
    // Listed here: among the chats, or under its project.
    has: (id) =>
      Boolean(findItem(id) || document.querySelector(`.project-chat[data-conversation-id="${CSS.escape(id)}"]`)),
    focusSearch() {
      search.focus();
      search.select();
    },
  };
}

