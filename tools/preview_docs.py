"""Offline preview of the documentation site, for machines without Quarto.

Runs `nbdev-proc-nbs` (the processing step of `nbdev-docs`: auto-inserted `show_doc` cells are executed, as are
exported and import cells), then checks every processed page and renders it to HTML with nbconvert, with a
sidebar in the order of `nbs/_quarto.yml`. Fails (exit 1) on an error output, a page listed in the sidebar that
does not exist, a notebook missing from the sidebar, an exported module without a documented symbol, or a link
to a page that does not exist. Usage: `python tools/preview_docs.py [--out _docs_preview] [--skip-proc]`.
"""
import argparse, html, json, re, subprocess, sys
from pathlib import Path

import nbformat
import yaml
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC = ROOT/"nbs", ROOT/"_proc"


def sidebar_pages(quarto_yml:Path) -> list[tuple[str, str]]:
    "(section, notebook file) pairs in the order of the sidebar of `_quarto.yml`."
    config = yaml.safe_load(quarto_yml.read_text())
    pages = []
    def walk(entries, section):
        for entry in entries:
            if isinstance(entry, str): pages.append((section, entry))
            elif "contents" in entry: walk(entry["contents"], entry.get("section", section))
            elif "href" in entry: pages.append((section, entry["href"]))
    walk(config["website"]["sidebar"]["contents"], "")
    return pages


def page_problems(nb, name:str) -> list[str]:
    "Error outputs and tracebacks in the processed notebook `name`."
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"{name} cell {i}: {out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and "Traceback (most recent call last)" in out.get("text", ""):
                problems.append(f"{name} cell {i}: a traceback printed in the output")
    return problems


def title_of(nb, default:str) -> str:
    "The page title: the front matter's title or the first level-1 heading."
    for cell in nb.cells:
        if cell.cell_type == "raw" and "title:" in cell.source:
            found = re.search(r"^title:\s*(.+)$", cell.source, re.M)
            if found: return found.group(1).strip().strip('"')
        if cell.cell_type == "markdown":
            found = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if found: return found.group(1).strip()
    return default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT/"_docs_preview", help="folder for the HTML pages")
    parser.add_argument("--skip-proc", action="store_true", help="reuse _proc/ from an earlier run")
    args = parser.parse_args(argv)
    if not args.skip_proc:
        result = subprocess.run([str(Path(sys.executable).parent/"nbdev-proc-nbs")], cwd=ROOT)
        if result.returncode != 0:
            print("nbdev-proc-nbs failed: a documentation cell raised (see above).", file=sys.stderr)
            return 1
    pages = sidebar_pages(NBS/"_quarto.yml")
    problems = [f"_quarto.yml lists {p}, which is not in nbs/" for _, p in pages if not (NBS/p).exists()]
    listed = {p for _, p in pages}
    problems += [f"nbs/{nb.name} is not in the sidebar of _quarto.yml" for nb in sorted(NBS.glob("*.ipynb"))
                 if nb.name not in listed and not nb.name.startswith("_")]
    documented = set()
    notebooks = {}
    for _, page in pages:
        if not (PROC/page).exists(): problems.append(f"_proc/{page} was not produced"); continue
        nb = nbformat.read(PROC/page, as_version=4)
        for cell in nb.cells: cell.metadata.pop("execution", None)  # nbdev's timings are not valid nbformat metadata
        notebooks[page] = nb
        problems += page_problems(nb, page)
        if any(c.cell_type == "markdown" and re.search(r"^#{2,4} \S+", c.source) and "[source]" in c.source for c in nb.cells) \
           or any("show_doc" in c.get("source", "") for c in nb.cells if c.cell_type == "code"):
            documented.add(page)
    exporting = {p for p in listed if (NBS/p).exists() and "#| default_exp" in (NBS/p).read_text()}
    problems += [f"{p} exports a module but shows no documentation of its symbols" for p in sorted(exporting - documented)]
    html_names = {p: Path(p).with_suffix(".html").name for _, p in pages}
    args.out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    titles = {p: title_of(nb, p) for p, nb in notebooks.items()}
    nav, current = [], None
    for section, page in pages:
        if section != current:
            nav.append(f"<h4>{html.escape(section)}</h4>" if section else "")
            current = section
        nav.append(f'<a href="{html_names[page]}">{html.escape(titles.get(page, page))}</a><br>')
    sidebar = '<nav style="position:fixed;left:0;top:0;width:230px;height:100%;overflow:auto;padding:1em;' \
              'background:#f6f6f6;font-family:sans-serif;font-size:14px">' + "\n".join(nav) + "</nav>"
    for page, nb in notebooks.items():
        body, _ = exporter.from_notebook_node(nb)
        for link in re.findall(r'href="([^"#:]+\.(?:ipynb|html))(?:#[^"]*)?"', body):
            target = Path(link).with_suffix(".ipynb").name
            if "/" not in link and target not in listed and not (args.out/link).exists():
                problems.append(f"{page} links to {link}, which is not a page of the site")
        body = re.sub(r'href="([^"#:/]+)\.ipynb', r'href="\1.html', body)
        body = body.replace("<body", "<body style=\"margin-left:260px\"", 1).replace("</body>", sidebar + "</body>", 1)
        (args.out/html_names[page]).write_text(body)
    if problems:
        print("Documentation problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"Docs preview: {len(notebooks)} pages in {args.out}/ (open {args.out/'index.html'}).")
    return 0


if __name__ == "__main__": sys.exit(main())
