// aion-train admin: the pages' behaviour (no inline script; the CSP allows only this file).
"use strict";
(function () {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const MAX_POLICY_BYTES = 1 << 20;

  async function call(method, url, body) {
    const opts = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(url, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { status: r.status, data };
  }

  function text(el, s) { el.textContent = s; }
  function li(s, cls) { const e = document.createElement("li"); e.textContent = s; if (cls) e.className = cls; return e; }

  function login() {
    $("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const r = await fetch("/admin/login", {
        method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
        body: JSON.stringify({ token: $("token").value }),
      });
      if (r.status === 200) { window.location = "/admin/"; return; }
      let msg = "login failed (" + r.status + ")";
      try { msg = (await r.json()).error.message; } catch (e) { /* keep */ }
      text($("login-error"), msg);
    });
  }

  function commonButtons() {
    const lo = $("logout");
    if (lo) lo.addEventListener("click", async () => { await call("POST", "/admin/logout"); window.location = "/admin/login"; });
    const rl = $("reload");
    if (rl) rl.addEventListener("click", async () => {
      const r = await call("POST", "/admin/api/reload");
      text($("reload-result"), r.status === 200 ? (r.data.reloaded ? "serving " + r.data.bundle_sha256 : r.data.reason) : r.data.error.message);
    });
  }

  function policyPage() {
    const j = $("jurisdiction").dataset.j;
    const editor = $("editor");
    const out = $("validation");
    let timer = null, seq = 0;

    function draft() {
      try { return JSON.parse(editor.value); } catch (e) { return null; }
    }

    async function validate() {
      const mine = ++seq;
      const t = editor.value;
      if (new Blob([t]).size > MAX_POLICY_BYTES) {
        out.replaceChildren(li("$: the policy is over the " + MAX_POLICY_BYTES + "-byte limit", "error"));
        out.dataset.state = "invalid";
        return;
      }
      out.dataset.state = "checking";
      const r = await call("POST", "/admin/api/validate", { text: t, jurisdiction: j });
      if (mine !== seq) return;
      const ul = document.createElement("ul");
      if (r.status !== 200) {
        ul.append(li((r.data && r.data.error) ? r.data.error.message : "validation failed (" + r.status + ")", "error"));
        out.dataset.state = "invalid";
      } else if (r.data.ok) {
        ul.append(li("valid", "ok"));
        out.dataset.state = "valid";
      } else {
        for (const e of r.data.errors) ul.append(li(e.path + ": " + e.message, "error"));
        out.dataset.state = "invalid";
      }
      out.replaceChildren(ul);
    }
    editor.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(validate, 250); });
    validate();

    $("publish").addEventListener("click", async () => {
      const d = draft();
      if (d === null) { text($("publish-result"), "the editor does not hold valid JSON"); return; }
      const r = await call("POST", "/admin/api/policies/" + encodeURIComponent(j), { policy: d });
      if (r.status === 200) {
        text($("publish-result"), "published " + r.data.published.version + " (policy " + r.data.published.policy_sha256 + ")");
        $("publish-result").dataset.state = "published";
        setTimeout(() => window.location.reload(), 600);
      } else {
        const e = r.data.error;
        text($("publish-result"), e.message + (e.errors ? ": " + e.errors.map((x) => x.path + " " + x.message).join("; ") : ""));
        $("publish-result").dataset.state = "refused";
      }
    });

    function showTry(d) {
      const raw = $("try-raw");
      raw.replaceChildren();
      let pos = 0;
      for (const s of d.spans) {
        if (s.start < pos) continue;
        raw.append(document.createTextNode(d.raw.slice(pos, s.start)));
        const m = document.createElement("mark");
        m.className = s.action;
        m.title = s.action + " by " + s.rule;
        m.textContent = d.raw.slice(s.start, s.end);
        raw.append(m);
        pos = s.end;
      }
      raw.append(document.createTextNode(d.raw.slice(pos)));
      text($("try-enforced"), d.enforced);
      const fired = $("try-fired");
      fired.replaceChildren();
      const rules = {};
      for (const s of d.spans) rules[s.rule] = (rules[s.rule] || 0) + 1;
      for (const [rule, n] of Object.entries(rules)) fired.append(li(rule + ": " + n + " match(es)"));
      if (d.blocked) fired.append(li("blocked by " + d.blocked_by, "error"));
      fired.append(li("policy " + d.policy + " v" + d.version + " " + d.policy_sha256));
    }
    async function tryIt(kind) {
      const body = { jurisdiction: j };
      body[kind] = $("try-text").value;
      if ($("try-draft").checked) { const d = draft(); if (d) body.policy = d; }
      const r = await call("POST", "/admin/api/try", body);
      if (r.status === 200) showTry(r.data);
      else { $("try-fired").replaceChildren(li(r.data.error.message, "error")); }
    }
    $("try-button").addEventListener("click", () => tryIt("text"));
    $("try-prompt").addEventListener("click", () => tryIt("prompt"));

    for (const b of document.querySelectorAll("button.rollback")) {
      b.addEventListener("click", async () => {
        const r = await call("POST", "/admin/api/policies/" + encodeURIComponent(j) + "/rollback", { version: b.dataset.version });
        if (r.status === 200) { text($("publish-result"), "rolled back: published " + r.data.published.version); $("publish-result").dataset.state = "published"; setTimeout(() => window.location.reload(), 600); }
        else text($("publish-result"), r.data.error.message);
      });
    }
    $("diff-button").addEventListener("click", async () => {
      const a = document.querySelector('input[name="diff-a"]:checked');
      const b = document.querySelector('input[name="diff-b"]:checked');
      if (!a || !b) { text($("diff"), "pick two versions (a and b)"); return; }
      const r = await call("GET", "/admin/api/policies/" + encodeURIComponent(j) + "/diff?a=" + encodeURIComponent(a.value) + "&b=" + encodeURIComponent(b.value));
      text($("diff"), r.status === 200 ? (r.data.diff || "(no difference)") : r.data.error.message);
    });
  }

  function auditPage() {
    async function load() {
      const q = new URLSearchParams();
      for (const [id, k] of [["f-j", "jurisdiction"], ["f-rule", "rule"], ["f-since", "since"], ["f-until", "until"]]) {
        if ($(id).value) q.set(k, $(id).value);
      }
      const r = await call("GET", "/admin/api/audit?" + q.toString());
      const body = document.querySelector("#audit tbody");
      body.replaceChildren();
      if (r.status !== 200) { text($("chain"), r.data.error.message); return; }
      const d = r.data;
      if (!d.configured) { text($("chain"), "no audit log configured (--audit-log)"); return; }
      text($("chain"), d.verify.ok ? "chain verified: " + d.verify.records + " records, head " + d.verify.head
        : "CHAIN BROKEN at line " + d.verify.bad_line + ": " + d.verify.reason);
      $("chain").className = d.verify.ok ? "ok" : "error";
      for (const rec of d.records) {
        const tr = document.createElement("tr");
        const cells = [rec.time, rec.admin_action || rec.endpoint, rec.who || rec.request_id || "", rec.jurisdiction || "",
          String(rec.status), Object.keys(rec.actions || {}).join(", "), (rec.policy_version || "") + " " + (rec.policy_sha256 || "").slice(0, 12)];
        for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.append(td); }
        body.append(tr);
      }
    }
    $("audit-filter").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
    load();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    commonButtons();
    if (page === "login") login();
    else if (page === "policy") policyPage();
    else if (page === "audit") auditPage();
  });
})();
