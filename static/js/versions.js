// Versions of a message: a regenerated answer or an edited question joins its
// predecessor's version group; "‹ 2/3 ›" under a message walks through them.
// An edited question takes the answers that followed it along.
//
// The page order is the truth: every version is an <article class="msg"> in
// the list, those not shown are `hidden` (and `data-inactive` when the
// server no longer counts them as part of the conversation).

import { iconButton, make } from "./dom.js";

export function createVersions(inner) {
  function versionOf(article) {
    return {
      group: article.dataset.versionGroup || "",
      index: Number(article.dataset.versionIndex) || 1,
    };
  }

  function groupMembers(group) {
    if (!group) return [];
    return [...inner.querySelectorAll(`.msg[data-version-group="${CSS.escape(group)}"]`)].sort(
      (a, b) => versionOf(a).index - versionOf(b).index,
    );
  }

  const isInactive = (article) => article.hasAttribute("data-inactive");

  function setInactive(article) {
    article.setAttribute("data-inactive", "");
    article.hidden = true;
  }

  function questionOf(article) {
    let n = article.previousElementSibling;
    while (n && n.dataset.role !== "user") n = n.previousElementSibling;
    return n;
  }

  // The versions a switcher walks through: a question's versions; an answer's
  // versions given to the same question (an edit starts a new line of answers).
  function siblings(article) {
    const members = groupMembers(article.dataset.versionGroup);
    if (article.dataset.role === "user" || members.length <= 1) return members.length ? members : [article];
    const parent = questionOf(article);
    return members.filter((m) => questionOf(m) === parent);
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

  // The switcher in a message's tools (none when it has one version).
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

  // Show version `target` of its group in place of the one shown now. For a
  // question, the answers that followed that version come with it.
  function show(target) {
    for (const member of siblings(target)) {
      member.hidden = member !== target;
      if (member.dataset.role === "user") for (const a of branchOf(member)) a.hidden = true;
    }
    if (target.dataset.role === "user") showBranch(target);
    for (const member of groupMembers(target.dataset.versionGroup)) renderSwitcher(member);
    if (target.dataset.role === "user") for (const a of branchOf(target)) renderSwitcher(a);
  }

  // "‹" or "›" under `article`: show the neighbouring version, keep the focus
  // on the same button where it still leads somewhere.
  function step(article, action) {
    const list = siblings(article);
    const target = list[list.indexOf(article) + (action === "version-next" ? 1 : -1)];
    if (!target) return;
    show(target);
    const same = target.querySelector(`[data-action="${action}"]`);
    const focusTo = same && !same.disabled ? same : target.querySelector(".versions button:not(:disabled)");
    if (focusTo) focusTo.focus();
  }

  // A new version joined `group` (or `replaced`'s): renumber every member.
  function join(article, group, replaced) {
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

  // `old` is replaced by a new version: it leaves the conversation (with its
  // answers, for a question).
  function retire(old) {
    if (!old) return null;
    setInactive(old);
    if (old.dataset.role === "user") {
      for (const a of branchOf(old)) if (!isInactive(a)) setInactive(a);
    }
    return old;
  }

  return { renderSwitcher, step, join, retire };
}
