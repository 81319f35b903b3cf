/* Keyboard shortcuts of the review app. Every shortcut presses a visible control marked data-key="...",
   so the page works the same with a mouse; the server does the rest. No libraries, nothing fetched. */
(() => {
  "use strict";
  const body = document.body;
  const TYPING_INPUTS = ["radio", "checkbox", "button", "submit", "reset"];
  const isTyping = (el) =>
    !!el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable ||
      (el.tagName === "INPUT" && !TYPING_INPUTS.includes(el.type)));
  const isControl = (el) => !!el && ["A", "BUTTON", "SUMMARY"].includes(el.tagName);

  // One submit per page: a held-down key must not send the same decision twice.
  let submitting = false;
  document.querySelectorAll("form[method=post]").forEach((form) =>
    form.addEventListener("submit", (event) => {
      if (submitting) { event.preventDefault(); return; }
      submitting = true;
      body.classList.add("busy");
    }));
  window.addEventListener("pageshow", () => { submitting = false; body.classList.remove("busy"); });

  // Heatmap overlay: one key toggles it; the choice is remembered from part to part.
  const viewer = document.getElementById("viewer");
  const toggle = document.getElementById("heat-toggle");
  const heatState = document.getElementById("heat-state");
  const setHeat = (on) => {
    if (!viewer || !toggle) return;
    viewer.classList.toggle("show-heat", on);
    toggle.setAttribute("aria-pressed", on ? "true" : "false");
    if (heatState) heatState.textContent = on ? "showing the heatmap" : "showing the photo";
    try { localStorage.setItem("review.heatmap", on ? "1" : "0"); } catch (e) { /* storage may be off */ }
  };
  if (toggle) {
    let remembered = false;
    try { remembered = localStorage.getItem("review.heatmap") === "1"; } catch (e) { /* ignore */ }
    setHeat(remembered);
    toggle.addEventListener("click", () => setHeat(!viewer.classList.contains("show-heat")));
  }

  // Queue: j/k move a highlight over the rows, o or Enter opens the highlighted part.
  const rows = Array.from(document.querySelectorAll("tr[data-href]"));
  let selected = -1;
  const select = (i) => {
    if (!rows.length) return;
    selected = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach((r, k) => r.classList.toggle("selected", k === selected));
    rows[selected].scrollIntoView({ block: "nearest" });
  };
  rows.forEach((row) => row.addEventListener("click", (event) => {
    if (event.target.closest("a")) return;
    window.location.href = row.dataset.href;
  }));
  const queueKey = (key) => {
    if (!["queue", "conflicts"].includes(body.dataset.page) || !rows.length) return false;
    if (key === "j") { select(selected + 1); return true; }
    if (key === "k") { select(selected - 1); return true; }
    if ((key === "o" || key === "Enter") && selected >= 0) { window.location.href = rows[selected].dataset.href; return true; }
    return false;
  };

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (isTyping(target)) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if ((event.key === "Enter" || event.key === " ") && isControl(target)) return; // let the focused control act
    if (queueKey(event.key)) { event.preventDefault(); return; }
    if (event.key === "?") {
      const help = document.querySelector("details.keys");
      if (help) { help.open = !help.open; event.preventDefault(); }
      return;
    }
    const el = document.querySelector(`[data-key="${CSS.escape(event.key)}"]`);
    if (!el || submitting) return;
    event.preventDefault();
    if (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "radio")) el.focus();
    else if (el.type === "radio") el.checked = true;
    else el.click();
  });
})();
