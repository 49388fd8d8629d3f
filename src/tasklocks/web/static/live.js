// tasklocks dashboard: makes the server-rendered pages live. Without it they still work (they
// reload themselves every few seconds). Served by the package; talks only to this server.
(function () {
  "use strict";
  var POLL_MS = 400;
  var LOG_MS = 500;
  document.documentElement.classList.add("js");

  var connection = document.getElementById("connection");
  function offline(text) {
    if (!connection) return;
    connection.hidden = !text;
    connection.textContent = text || "";
  }

  // --- the live part of the page: fetch it again and swap it in when it changed ---------------
  var live = document.getElementById("live");
  var pollUrl = live && live.getAttribute("data-poll");
  var reloadWhenBack = live && live.getAttribute("data-reload") === "1";
  var last = null; // the last fragment received (innerHTML is normalised: not comparable)

  function schedule(fn, ms) {
    window.setTimeout(fn, document.hidden ? ms * 4 : ms);
  }

  // A swap replaces every element of the live part. While someone is using one, the new fragment
  // waits for the next poll: a button pressed when it is replaced never gets its click, a focused
  // one loses focus, a selection is dropped, and rows could move under a pointer aiming at Stop
  // (that wait is at most HOVER_HOLD_MS, so a pointer left there does not freeze the page).
  var HOVER_HOLD_MS = 3000;
  var pressed = false;
  var hoverSince = null;
  function released() { pressed = false; }
  if (live) {
    live.addEventListener("pointerdown", function (event) {
      if (event.button === 0) pressed = true; // a right click opens a menu, not a click
    });
    window.addEventListener("pointerup", released, true);
    window.addEventListener("pointercancel", released, true);
    window.addEventListener("contextmenu", released, true);
    window.addEventListener("blur", released);
  }

  function inUse() {
    if (pressed) return true;
    var focused = document.activeElement;
    if (focused && live.contains(focused) && focused.closest("form")) return true;
    var selection = window.getSelection();
    if (selection && !selection.isCollapsed && selection.rangeCount &&
        live.contains(selection.getRangeAt(0).commonAncestorContainer)) return true;
    if (!live.querySelector("form:hover, button:hover")) {
      hoverSince = null;
      return false;
    }
    if (hoverSince === null) hoverSince = Date.now();
    return Date.now() - hoverSince < HOVER_HOLD_MS;
  }

  function poll() {
    fetch(pollUrl, { cache: "no-cache", credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) {
          offline("Not authorised any more: reload the page with ?token=...");
          return null;
        }
        offline("");
        if (reloadWhenBack) {
          if (response.ok) window.location.reload();
          return response.text().then(function () { schedule(poll, POLL_MS * 2); });
        }
        return response.text().then(function (html) {
          if (html !== last && !inUse()) {
            live.innerHTML = html;
            last = html;
            document.dispatchEvent(new CustomEvent("tasklocks:updated"));
          }
          schedule(poll, POLL_MS);
        });
      })
      .catch(function () {
        offline("The dashboard server does not answer; retrying…");
        schedule(poll, POLL_MS * 2);
      });
  }
  if (pollUrl) schedule(poll, POLL_MS);

  // --- a task's log: append what was written since -----------------------------------------
  var log = document.getElementById("log");
  if (log) {
    var src = log.getAttribute("data-src");
    var offset = parseInt(log.getAttribute("data-offset") || "0", 10);
    var follow = function () {
      fetch(src + "?offset=" + offset, { cache: "no-store", credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (chunk) {
          if (!chunk) { schedule(follow, LOG_MS * 4); return; }
          if (chunk.text) {
            var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
            log.appendChild(document.createTextNode(chunk.text));
            if (atBottom) log.scrollTop = log.scrollHeight;
          }
          offset = chunk.offset;
          if (!chunk.final) schedule(follow, chunk.text ? 50 : LOG_MS);
          else log.setAttribute("data-final", "1");
        })
        .catch(function () { schedule(follow, LOG_MS * 4); });
    };
    log.scrollTop = log.scrollHeight;
    follow();
  }
})();
