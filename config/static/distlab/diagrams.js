// Chapter page: draw ```mermaid diagrams (Mermaid, from our own static files) in the
// current theme and redraw them when the theme changes; highlight the current section in
// the table of contents.
(function () {
  "use strict";
  function theme() {
    return document.documentElement.getAttribute("data-theme") === "dark" ? "dark" : "default";
  }
  function draw() {
    if (!window.mermaid) return;
    var blocks = document.querySelectorAll("pre.mermaid");
    blocks.forEach(function (pre) {
      if (!pre.dataset.source) pre.dataset.source = pre.textContent;
      pre.removeAttribute("data-processed");
      pre.textContent = pre.dataset.source;
    });
    window.mermaid.initialize({ startOnLoad: false, theme: theme(), securityLevel: "strict" });
    window.mermaid.run({ nodes: blocks, suppressErrors: true });
  }
  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("distlab:theme", draw);

  document.addEventListener("DOMContentLoaded", function () {
    // The table of contents starts open beside the text on wide screens, folded on phones.
    if (window.matchMedia("(min-width: 1000px)").matches) {
      document.querySelectorAll("details[data-open-wide]").forEach(function (d) { d.open = true; });
    }
    var links = {};
    document.querySelectorAll(".toc a[href^='#']").forEach(function (a) {
      links[decodeURIComponent(a.getAttribute("href").slice(1))] = a;
    });
    if (!("IntersectionObserver" in window)) return;
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (!entry.isIntersecting) return;
        var link = links[entry.target.id];
        if (!link) return;
        document.querySelectorAll(".toc a.is-current").forEach(function (a) { a.classList.remove("is-current"); });
        link.classList.add("is-current");
      });
    }, { rootMargin: "-10% 0px -75% 0px" });
    Object.keys(links).forEach(function (id) {
      var target = document.getElementById(id);
      if (target) observer.observe(target);
    });
  });
})();
