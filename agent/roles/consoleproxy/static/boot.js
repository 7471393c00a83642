// Loads the console module. A failed load (e.g. the browser saw the network change while
// fetching noVNC's modules) would leave the page stuck on "Connecting…": reload the page
// instead, at most twice (the one-time token is still unspent: it is spent only by the
// websocket upgrade, which the module opens), then say what happened.
"use strict";
(function () {
  const KEY = "sysvmConsoleBootRetries";
  import("/static/console.js").then(
    () => { sessionStorage.removeItem(KEY); },
    (err) => {
      const n = Number(sessionStorage.getItem(KEY) || "0");
      if (n < 2) {
        sessionStorage.setItem(KEY, String(n + 1));
        setTimeout(() => location.reload(), 300 * (n + 1));
        return;
      }
      sessionStorage.removeItem(KEY);
      const status = document.getElementById("status");
      status.dataset.state = "error";
      status.textContent = "Console unavailable";
      document.body.dataset.state = "error";
      const box = document.getElementById("error");
      box.textContent = "The console page could not be loaded (" + err + "). Reload the page.";
      box.hidden = false;
    },
  );
})();
