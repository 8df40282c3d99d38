// Refreshes the live parts of the page (elements with data-live and an id) every two seconds,
// unless the user is selecting or typing. The server's HTML is parsed inertly (DOMParser runs
// no script) and moved in: what the server escaped stays text.
(function () {
  "use strict";
  if (!document.querySelector("[data-live][id]")) return;
  async function refresh() {
    const busy = document.querySelector("input[type=checkbox]:checked, details[open]") ||
      (document.activeElement && ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName));
    if (busy) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      document.querySelectorAll("[data-live][id]").forEach(function (el) {
        const fresh = doc.getElementById(el.id);
        if (fresh) el.replaceChildren(...Array.from(fresh.childNodes).map(function (n) { return document.importNode(n, true); }));
      });
      document.documentElement.dataset.refreshed = String(Date.now());
    } catch (e) { /* the next refresh tries again */ }
  }
  window.setInterval(refresh, 2000);
})();
