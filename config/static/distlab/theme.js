// Light or dark: the learner's choice (stored), else the system's. Runs before paint.
(function () {
  "use strict";
  var KEY = "distlab-theme";
  var root = document.documentElement;
  function systemDark() {
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  }
  function current() {
    var stored = null;
    try { stored = localStorage.getItem(KEY); } catch (e) { /* private mode */ }
    return stored === "dark" || stored === "light" ? stored : (systemDark() ? "dark" : "light");
  }
  root.setAttribute("data-theme", current());
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-theme-toggle]");
    if (!button) return;
    var next = root.getAttribute("data-theme") === "dark" ? "light" : "dark";
    root.setAttribute("data-theme", next);
    try { localStorage.setItem(KEY, next); } catch (e) { /* private mode */ }
    document.dispatchEvent(new CustomEvent("distlab:theme", { detail: next }));
  });
})();
