// Search box of the offline docs: every word typed must occur in a section's page title, heading or text;
// matches in page titles come first, then matches in headings.
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("search-box"), list = document.getElementById("search-results");
  const entries = (window.SEARCH_INDEX || []).map(e => ({...e, haystack: `${e.title} ${e.section} ${e.text}`.toLowerCase()}));
  const link = (e) => {
    const a = document.createElement("a");
    a.className = "dropdown-item"; a.href = e.href;
    a.innerHTML = "<strong></strong><small class='d-block text-muted text-truncate'></small>";
    a.firstChild.textContent = e.section ? `${e.title}: ${e.section}` : e.title;
    a.lastChild.textContent = e.text;
    return a;
  };
  box.addEventListener("input", () => {
    const words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    const has = (text) => words.every(w => text.toLowerCase().includes(w));
    const score = (e) => 4 * has(e.title) + 2 * has(e.section) + (e.section === "");  // page titles first, then headings
    const hits = words.length ? entries.filter(e => words.every(w => e.haystack.includes(w))) : [];
    hits.sort((a, b) => score(b) - score(a));
    list.replaceChildren(...hits.slice(0, 12).map(link));
    list.classList.toggle("show", list.children.length > 0);
  });
  box.addEventListener("keydown", (event) => { if (event.key === "Enter" && list.firstChild) location.href = list.firstChild.href; });
});
