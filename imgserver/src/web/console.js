// imgserver console: the one script. Pages work without it; it adds local times,
// confirmation questions, the browser's time zone on the new-job form, and live progress
// on a job's page (polling the job's live.json every two seconds while devices are busy).
// The time zone the new-job form sends is the browser's IANA zone name.
"use strict";
(function () {
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) {
        t.textContent = d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
        t.title = t.getAttribute("datetime");
      }
    });
  }
  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function badge(state, title) {
    return '<span class="badge s-' + state.replace(/[^a-z0-9_]/gi, "") + '">' + esc(title) + "</span>";
  }
  function live(table) {
    var src = table.getAttribute("data-src");
    var timer = null;
    function tick() {
      fetch(src, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) { location.reload(); throw new Error("signed out"); }
          return r.json();
        })
        .then(function (j) {
          var tally = {};
          j.tasks.forEach(function (t) {
            tally[t.state] = (tally[t.state] || 0) + 1;
            var row = table.querySelector('tr[data-task="' + t.task + '"]');
            if (!row) { location.reload(); return; }
            row.querySelector(".state").innerHTML = badge(t.state, t.state);
            row.querySelector("progress").value = t.percent;
            row.querySelector(".ptext").textContent = t.progress;
            row.querySelector(".message").innerHTML = t.message ? esc(t.message) : '<span class="muted">—</span>';
            var u = row.querySelector(".updated");
            u.innerHTML = '<time datetime="' + esc(t.updated) + '"></time>';
            localTimes(u);
          });
          var s = document.getElementById("tally");
          if (s) {
            s.innerHTML = Object.keys(tally).sort().map(function (k) { return badge(k, tally[k] + " " + k); }).join(" ");
          }
          var js = document.getElementById("job-state");
          if (js) { js.innerHTML = badge(j.state_class, j.state); }
          if (!j.live) {
            clearInterval(timer);
            // Nothing left to abort; retry and rollback depend on the final states: the
            // server renders the page afresh.
            var abort = document.querySelector('#job-actions form[action$="/abort"]');
            if (abort) { abort.remove(); }
            location.reload();
          }
        })
        .catch(function () {});
    }
    timer = setInterval(tick, 2000);
    tick();
  }
  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    document.querySelectorAll("form[data-confirm]").forEach(function (f) {
      f.addEventListener("submit", function (e) {
        if (!confirm(f.getAttribute("data-confirm"))) { e.preventDefault(); }
      });
    });
    var tz = document.getElementById("tz");
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (tz && zone) {
      tz.value = zone;
      var hint = document.getElementById("tz_hint");
      if (hint) { hint.textContent = "Empty: at once, no end. Times are in your time zone (" + zone + ")."; }
    }
    // Upload an image: the chosen file is the body of a PUT (no multipart), the CSRF token
    // a header; the server's answer, good or bad, is shown beside the button.
    var up = document.getElementById("upload-image");
    if (up) {
      up.addEventListener("submit", function (e) {
        e.preventDefault();
        var f = document.getElementById("upload-file").files[0];
        var status = document.getElementById("upload-status");
        if (!f) { status.textContent = "Choose a file first."; return; }
        var ram = document.getElementById("upload-ram").value || "0";
        var button = document.getElementById("upload-submit");
        button.disabled = true;
        status.className = "muted";
        status.textContent = "Uploading " + f.name + " (" + f.size + " bytes)…";
        fetch("/images/upload?min_ram_mib=" + encodeURIComponent(ram), {
          method: "PUT",
          credentials: "same-origin",
          headers: { "x-console-csrf": up.querySelector("input[name=csrf]").value },
          body: f
        })
          .then(function (r) { return r.text().then(function (t) { return [r.ok, t]; }); })
          .then(function (a) {
            button.disabled = false;
            status.className = a[0] ? "notice ok" : "notice error";
            status.id = "upload-status";
            status.textContent = a[0] ? a[1] : f.name + ": " + a[1];
            if (a[0]) { location.assign("/images?uploaded=1"); }
          })
          .catch(function (err) {
            button.disabled = false;
            status.className = "notice error";
            status.textContent = "The upload failed: " + err;
          });
      });
    }
    var t = document.getElementById("tasks");
    if (t && t.getAttribute("data-live") === "1") { live(t); }
  });
})();
