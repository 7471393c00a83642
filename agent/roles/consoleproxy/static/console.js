// The sysvm console page: noVNC's RFB library (npm @novnc/novnc) and our controls.
// The page URL carries ?vm=<id>&token=<one-time token>; the token is spent by the
// websocket upgrade, then removed from the address bar. The browser never sees the VM's
// VNC password: the proxy authenticates to the hypervisor and offers us security "None".
import RFB from "/novnc/core/rfb.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const vm = params.get("vm") || "";
const token = params.get("token") || "";
let rfb = null;
let everConnected = false;
let attempts = 0;
const MAX_RETRIES = 2;

if (params.has("token")) {
  history.replaceState(null, "", location.pathname + "?vm=" + encodeURIComponent(vm));
}

function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
  document.body.dataset.state = state;
}

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = !text;
}

function wsUrl(withToken) {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  let q = "vm=" + encodeURIComponent(vm);
  if (withToken) q += "&token=" + encodeURIComponent(withToken);
  return scheme + location.host + "/websockify?" + q;
}

function connect(withToken) {
  showError("");
  setStatus("connecting", "Connecting…");
  $("reconnect").hidden = true;
  let securityFailed = false;
  rfb = new RFB($("screen"), wsUrl(withToken), { shared: true });
  rfb.scaleViewport = $("scale").checked;
  rfb.resizeSession = false;
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    everConnected = true;
    setStatus("connected", "Connected");
    $("cad").disabled = false;
    $("clipsend").disabled = false;
    rfb.focus();
  });
  rfb.addEventListener("securityfailure", (e) => {
    securityFailed = true;
    setStatus("error", "Console unavailable");
    showError(e.detail.reason || "The VM's console refused the connection.");
  });
  rfb.addEventListener("disconnect", (e) => {
    $("cad").disabled = true;
    $("clipsend").disabled = true;
    if (securityFailed) { $("reconnect").hidden = false; return; }
    if (!everConnected && !e.detail.clean && attempts < MAX_RETRIES) {
      // The connection failed before the console opened: a refused link fails again (the
      // same answer), but a network hiccup (the token never reached the proxy) recovers.
      attempts++;
      setStatus("connecting", "Retrying…");
      setTimeout(() => connect(withToken), 500 * attempts);
      return;
    }
    $("reconnect").hidden = false;
    if (e.detail.clean) {
      setStatus("disconnected", "Disconnected");
    } else if (!everConnected) {
      setStatus("error", "Connection refused");
      showError("The console proxy refused this link: it is invalid, already used or expired. "
        + "Request a new console link.");
    } else {
      setStatus("disconnected", "Connection lost");
    }
  });
  rfb.addEventListener("clipboard", (e) => { $("cliptext").value = e.detail.text; });
  window.sysvmRfb = rfb; // for tests and debugging
}

$("cad").addEventListener("click", () => { if (rfb) rfb.sendCtrlAltDel(); });
$("scale").addEventListener("change", () => { if (rfb) rfb.scaleViewport = $("scale").checked; });
$("clipsend").addEventListener("click", () => { if (rfb) rfb.clipboardPasteFrom($("cliptext").value); });
// Reconnect: no token in the URL any more; the proxy uses the resume cookie it set
// (HttpOnly, for /websockify only) on the first connection, if still valid.
$("reconnect").addEventListener("click", () => { attempts = 0; connect(""); });

if (!vm || !token) {
  setStatus("error", "Bad link");
  showError("This console link is incomplete (vm and token are required).");
} else {
  connect(token);
}
