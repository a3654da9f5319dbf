// Light / dark / follow the system. A classic script loaded in <head> so that
// the chosen theme applies before the first paint (no flash, no inline script).
(function () {
  "use strict";
  var KEY = "chat.theme";
  var ICON = { system: "#i-auto", light: "#i-sun", dark: "#i-moon" };
  var root = document.documentElement;

  function stored() {
    try {
      var value = localStorage.getItem(KEY);
      return value === "light" || value === "dark" ? value : "system";
    } catch (e) {
      return "system";
    }
  }

  var systemDark = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;

  // Always a resolved `data-theme`, so that the stylesheet holds each palette once.
  function apply(choice) {
    var dark = choice === "dark" || (choice === "system" && systemDark !== null && systemDark.matches);
    root.setAttribute("data-theme", dark ? "dark" : "light");
  }

  if (systemDark !== null && systemDark.addEventListener) {
    systemDark.addEventListener("change", function () {
      if (stored() === "system") apply("system");
    });
  }

  function show(select, choice) {
    select.value = choice;
    var use = select.parentNode.querySelector("use");
    if (use) use.setAttribute("href", ICON[choice]);
  }

  apply(stored());

  // The account menu (a <details>): closed by a click elsewhere or Escape.
  document.addEventListener("click", function (event) {
    var menu = document.getElementById("user-menu");
    if (menu && menu.open && !menu.contains(event.target)) menu.open = false;
  });
  document.addEventListener("keydown", function (event) {
    var menu = document.getElementById("user-menu");
    if (event.key === "Escape" && menu && menu.open) {
      menu.open = false;
      menu.querySelector("summary").focus();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var select = document.getElementById("theme-select");
    if (!select) return;
    show(select, stored());
    select.addEventListener("change", function () {
      var choice = select.value;
      try {
        if (choice === "system") localStorage.removeItem(KEY);
        else localStorage.setItem(KEY, choice);
      } catch (e) {
        /* private mode: the choice lasts for this page only */
      }
      apply(choice);
      show(select, choice);
    });
  });
})();
