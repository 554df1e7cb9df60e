// Let long code spans in table cells wrap after "." and "_" (sct.tl.rank_features_groups,
// uns["circuit_<cell>_enrichment"]) rather than push the table wider than the page.
document.addEventListener("DOMContentLoaded", () => {
  for (const span of document.querySelectorAll(".bd-article table td code.literal span.pre")) {
    if (span.textContent.length < 16) continue;
    const parts = span.textContent.split(/(?<=[._])/);
    span.textContent = "";
    parts.forEach((part, i) => {
      if (i > 0) span.appendChild(document.createElement("wbr"));
      span.appendChild(document.createTextNode(part));
    });
  }
});
