// Small progressive enhancements; every page works without them.
document.addEventListener("click", (event) => {
  const copy = event.target.closest("[data-copy]");
  if (copy) {
    navigator.clipboard.writeText(copy.dataset.copy).then(() => {
      copy.textContent = "Copied";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
  }
});
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) {
    event.preventDefault();
  }
});
// The code form's item picker shows the items of the organization chosen, and only those.
const organization = document.getElementById("organization");
if (organization) {
  const pick = () => {
    document.querySelectorAll("#item-picker .pick").forEach((label) => {
      const mine = label.dataset.org === organization.value;
      label.hidden = !mine;
      const box = label.querySelector("input");
      box.disabled = !mine;
      if (!mine) box.checked = false;
    });
    document.querySelectorAll("#item-picker .pick-limits").forEach((limits) => {
      const mine = limits.dataset.org === organization.value;
      limits.hidden = !mine;
      limits.querySelectorAll("input").forEach((box) => { box.disabled = !mine; });
    });
    const shown = document.getElementById("picker-org");
    if (shown) shown.textContent = organization.value;
  };
  organization.addEventListener("change", pick);
}
// A chart wider than the screen opens at its latest data (the right end), not at the empty start.
document.querySelectorAll(".chart-scroll").forEach((box) => {
  box.scrollLeft = box.scrollWidth;
});
