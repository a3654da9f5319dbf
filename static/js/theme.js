// Light / dark / follow the system. A classic script loaded in <head> so that
// the chosen theme applies before the first paint (no flash, no inline script).
(function () {
  "use strict";
  var KEY = "chat.theme";
  var ORDER = ["system", "light", "dark"];
  var LABEL = { system: "follows the system", light: "light", dark: "dark" };
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

  function label(button, choice) {
    var next = ORDER[(ORDER.indexOf(choice) + 1) % ORDER.length];
    button.setAttribute("aria-label", "Theme: " + LABEL[choice]);
    button.title = "Theme: " + LABEL[choice] + " (click for " + LABEL[next] + ")";
    var use = button.querySelector("use");
    if (use) use.setAttribute("href", ICON[choice]);
  }

  apply(stored());

  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("theme-toggle");
    if (!button) return;
    label(button, stored());
    button.addEventListener("click", function () {
      var choice = ORDER[(ORDER.indexOf(stored()) + 1) % ORDER.length];
      try {
        if (choice === "system") localStorage.removeItem(KEY);
        else localStorage.setItem(KEY, choice);
      } catch (e) {
        /* private mode: the choice lasts for this page only */
      }
      apply(choice);
      label(button, choice);
    });
  });
})();
