"""Offline build of the documentation site with pandoc, for machines without Quarto.

Reads what `nbdev-docs` reads: the notebooks processed as `nbdev-proc-nbs` does (`_proc/`), the sidebar of
`nbs/_quarto.yml` and the site settings of `nbs/nbdev.yml`. Each page is turned into pandoc Markdown the way
Quarto treats a notebook (front matter as title and description; the cell options `echo`, `output` (`asis`),
`include` and `code-fold`/`code-summary`), then rendered by pandoc with KaTeX from a local copy.
Two additions of this build, not Quarto's: `show_doc` signatures get a parameter table, and cells are folded by
`fold_summary` (long test cells and import cells). Fails on an error output, a page of the sidebar that does not
exist, a notebook missing from the sidebar, or a chapter page that does not show its saved full-mode run.
Usage: `python tools/build_docs.py --out _docs_offline --deps _docs_deps [--skip-proc]`.
"""
import argparse, ast, base64, html, io, json, os, re, shutil, subprocess, sys, tokenize
from pathlib import Path

import yaml
from nbdev.serve import proc_nbs

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, SITE = ROOT/"nbs", ROOT/"_proc", ROOT/"tools"/"docs_site"
FULL_RUN_RECORD = "Outputs from one run in full mode"  # what `execution_record` prints at the end of a chapter run in full
FOLD_LINES = 8  # test cells longer than this many lines are folded
_TEST_CALL = re.compile(r"\btest_\w*\(|^\s*assert\b", re.M)  # a fastcore.test call or an assert
_ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")


def sidebar_pages(quarto_yml:Path) -> list[tuple[str, str]]:
    "(section, notebook file) pairs in the order of the sidebar of `_quarto.yml`."
    pages = []
    def walk(entries, section):
        for entry in entries:
            if isinstance(entry, str): pages.append((section, entry))
            elif "contents" in entry: walk(entry["contents"], entry.get("section", section))
            elif "href" in entry: pages.append((section, entry["href"]))
    walk(yaml.safe_load(quarto_yml.read_text())["website"]["sidebar"]["contents"], "")
    return pages


def cell_options(source:str) -> tuple[dict, str]:
    "Quarto's `#| key: value` options at the top of a code cell, and the code without them."
    lines, options = source.splitlines(), {}
    while lines and lines[0].startswith("#|"):
        option = lines.pop(0)[2:].strip()
        if ":" in option: options.update(yaml.safe_load(option) or {})
        elif option: options[option] = True
    return options, "\n".join(lines).strip("\n")


def fold_summary(code:str, options:dict) -> tuple[str, bool] | None:
    "(summary, open) when the cell's code is folded: Quarto's `code-fold`, else test cells over `FOLD_LINES` lines and import cells."
    fold = options.get("code-fold")
    if fold in (True, "true", "show"): return str(options.get("code-summary", "Code")), fold == "show"
    if fold in (False, "false"): return None
    n = len(code.splitlines())
    if n > FOLD_LINES and _TEST_CALL.search(code): return f"Tests ({n} lines)", False
    try: tree = ast.parse(code)
    except SyntaxError: return None
    if tree.body and all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body):
        return f"Imports ({n} lines)", False
    return None


def fence(text:str, info:str="") -> str:
    "`text` as a fenced block whose fence is longer than any run of backticks inside it."
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{ticks}{info}\n{text.rstrip()}\n{ticks}"


def raw_html(text:str) -> str: return fence(text, "{=html}")


def parameter_table(signature:str) -> str | None:
    "A compact signature and an HTML table of the parameters of a `show_doc` signature (`def f(a:int=1, # doc`), or None."
    try: tree = ast.parse(signature.rstrip().rstrip(":") + ":\n    pass")
    except SyntaxError: return None
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)): return None
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(signature).readline) if tok.type == tokenize.COMMENT}
    args = fn.args
    defaults = dict(zip([a.arg for a in (args.posonlyargs + args.args)][::-1], args.defaults[::-1]))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    params = [("", a) for a in args.posonlyargs + args.args] + ([("*", args.vararg)] if args.vararg else []) \
             + [("", a) for a in args.kwonlyargs] + ([("**", args.kwarg)] if args.kwarg else [])
    rows, shown = [], []
    for star, arg in params:
        ann = ast.get_source_segment(signature, arg.annotation) if arg.annotation else ""
        default = ast.get_source_segment(signature, defaults[arg.arg]) if arg.arg in defaults else ""
        shown.append(f"{star}{arg.arg}" + (f":{ann}" if ann else "") + (f"={default}" if default else ""))
        rows.append((star + arg.arg, ann, default, comments.get(arg.lineno, "")))
    returns = ast.get_source_segment(signature, fn.returns) if fn.returns else ""
    one_line = f"{fn.name}({', '.join(shown)})" + (f" -> {returns}" if returns else "")
    sig = one_line if len(one_line) <= 88 else f"{fn.name}(\n" + "".join(f"    {s},\n" for s in shown) + ")" \
          + (f" -> {returns}" if returns else "")
    out = fence(sig, "python")
    if rows:
        cell = lambda text, code=False: f"<td><code>{html.escape(text)}</code></td>" if code and text else f"<td>{html.escape(text)}</td>"
        body = "".join(f"<tr>{cell(n, True)}{cell(t, True)}{cell(d, True)}{cell(c)}</tr>" for n, t, d, c in rows)
        out += "\n\n" + raw_html('<table class="table table-sm params"><thead><tr><th>Parameter</th><th>Type</th>'
                                 f"<th>Default</th><th>Details</th></tr></thead><tbody>{body}</tbody></table>")
    return out


def show_doc_markdown(md:str) -> str:
    "nbdev's `show_doc` Markdown with its signature block replaced by a signature and a parameter table."
    def replace(match):
        return parameter_table(match.group(1)) or match.group(0)
    return re.sub(r"```python\n((?:async )?def .*?)\n```", replace, md, count=1, flags=re.S)


class Page:
    "One notebook of `_proc/` as pandoc Markdown; images go to `figures`."
    def __init__(self, path:Path, figures:Path):
        self.nb, self.name, self.figures = json.loads(path.read_text()), path.name, figures
        self.meta, self.problems, self.n_figures = {}, [], 0
        cells = self.nb["cells"]
        if cells and cells[0]["cell_type"] == "raw":
            front = re.match(r"\s*---\n(.*?)\n---\s*$", "".join(cells[0]["source"]), re.S)
            if front:
                self.meta = yaml.safe_load(front.group(1)) or {}
                cells = cells[1:]
        self.cells = cells
        self.title = str(self.meta.get("title", path.stem))
        self.html_name = self.meta.get("output-file", path.with_suffix(".html").name)

    def execution_record(self) -> str:
        "What the page shows for its last `execution_record()` cell ('' when it has none)."
        records = [c for c in self.cells if c["cell_type"] == "code" and "execution_record()" in "".join(c.get("source", ""))]
        data = [o.get("data", {}) for o in records[-1].get("outputs", [])] if records else []
        return "".join("".join(d.get("text/markdown", "")) for d in data)

    def markdown(self) -> str:
        "The page's body as pandoc Markdown."
        parts = []
        for i, cell in enumerate(self.cells):
            source = "".join(cell.get("source", ""))
            if cell["cell_type"] == "markdown": parts.append(source)
            elif cell["cell_type"] == "raw": parts.append(source)
            elif cell["cell_type"] == "code": parts.append(self.code_cell(i, source, cell.get("outputs", [])))
        return "\n\n".join(p for p in parts if p.strip())

    def code_cell(self, i:int, source:str, outputs:list) -> str:
        options, code = cell_options(source)
        if str(options.get("include", True)).lower() == "false": return ""
        parts = []
        if code and str(options.get("echo", True)).lower() != "false":
            block = fence(code, "python")
            folded = fold_summary(code, options)
            if folded:
                summary, is_open = folded
                block = "\n\n".join([raw_html(f'<details class="code-fold"{" open" if is_open else ""}>'
                                              f"<summary>{html.escape(summary)}</summary>"), block, raw_html("</details>")])
            parts.append(block)
        if str(options.get("output", True)).lower() != "false":
            asis = str(options.get("output")).lower() == "asis"
            is_doc = bool(re.search(r"^show_doc\(", code, re.M))
            parts += [self.output(i, out, asis, is_doc) for out in outputs]
        parts = [p for p in parts if p]
        return "::: {.cell}\n" + "\n\n".join(parts) + "\n:::" if parts else ""

    def output(self, i:int, out:dict, asis:bool, is_doc:bool) -> str:
        kind = out["output_type"]
        if kind == "error":
            self.problems.append(f"{self.name} cell {i}: {out.get('ename')}: {out.get('evalue')}")
            return ""
        if kind == "stream":
            text = _ANSI.sub("", "".join(out["text"]))
            if "Traceback (most recent call last)" in text: self.problems.append(f"{self.name} cell {i}: a traceback in the output")
            return f"::: {{.cell-output .cell-output-{out['name']}}}\n{fence(text)}\n:::" if text.strip() else ""
        data = {k: "".join(v) if isinstance(v, list) else v for k, v in out.get("data", {}).items()}
        if asis and "text/markdown" in data:
            md = data["text/markdown"]
            return show_doc_markdown(md) if is_doc else md
        for mime, ext in (("image/png", "png"), ("image/jpeg", "jpg")):
            if mime in data:
                self.n_figures += 1
                name = f"{Path(self.html_name).stem}_{self.n_figures}.{ext}"
                (self.figures/name).write_bytes(base64.b64decode(data[mime]))
                return f"::: {{.cell-output .cell-output-display}}\n![]({self.figures.name}/{name})\n:::"
        if "text/html" in data: return f"::: {{.cell-output .cell-output-display}}\n{raw_html(data['text/html'])}\n:::"
        if "text/markdown" in data: return f"::: {{.cell-output .cell-output-display}}\n{data['text/markdown']}\n:::"
        if "text/plain" in data: return f"::: {{.cell-output}}\n{fence(_ANSI.sub('', data['text/plain']))}\n:::"
        return ""


def link_pages(md:str, site_url:str, html_names:dict) -> str:
    "Links to the published site and to notebooks made relative links to the pages of this build."
    if site_url: md = md.replace(site_url.rstrip("/") + "/", "")
    def to_page(match):
        return f"]({html_names.get(match.group(1) + '.ipynb', match.group(1) + '.html')}{match.group(2) or ''})"
    return re.sub(r"\]\(([\w.-]+)\.ipynb(#[^)]*)?\)", to_page, md)


def sidebar_html(pages:list, titles:dict, html_names:dict, current:str) -> str:
    "The sidebar of `_quarto.yml` as HTML, with the current page marked."
    out, section = [], None
    for sec, nb in pages:
        if sec != section:
            if section is not None: out.append("</ul>")
            out.append(f'<div class="sidebar-section">{html.escape(sec)}</div>' if sec else "")
            out.append('<ul class="sidebar-list">')
            section = sec
        active = ' class="active" aria-current="page"' if nb == current else ""
        out.append(f'<li><a href="{html_names[nb]}"{active}>{html.escape(titles[nb])}</a></li>')
    return "\n".join(out + ["</ul>"])


def search_entries(page_html:str, html_name:str, title:str) -> list[dict]:
    "One search entry per section (heading and the text up to the next heading) of a rendered page."
    main = page_html.split('<main id="content">', 1)[-1].split("</main>", 1)[0]
    main = re.sub(r"<(script|style)\b.*?</\1>", " ", main, flags=re.S)
    entries, pieces = [], re.split(r'<h[1-4][^>]*\bid="([^"]+)"[^>]*>(.*?)</h[1-4]>', main, flags=re.S)
    text_of = lambda fragment: re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment))).strip()
    entries.append({"href": html_name, "title": title, "section": "", "text": text_of(pieces[0])[:400]})
    for anchor, heading, fragment in zip(pieces[1::3], pieces[2::3], pieces[3::3]):
        entries.append({"href": f"{html_name}#{anchor}", "title": title, "section": text_of(heading),
                        "text": text_of(fragment)[:400]})
    return entries


def copy_assets(deps:Path, out:Path):
    "KaTeX, the Bootstrap theme of `_quarto.yml` (cosmo) and its font, the site's CSS and script into `out/assets`."
    modules, assets = deps/"node_modules", out/"assets"
    theme = yaml.safe_load((NBS/"_quarto.yml").read_text())["format"]["html"].get("theme", "cosmo")
    katex, bootstrap = modules/"katex"/"dist", modules/"bootswatch"/"dist"/theme/"bootstrap.min.css"
    font = modules/"@fontsource"/"source-sans-pro"
    if not ((katex/"katex.min.js").exists() and bootstrap.exists() and font.exists()):
        raise SystemExit(f"KaTeX, Bootswatch or Source Sans Pro is not in {modules}: run `make docs-deps`.")
    shutil.rmtree(assets, ignore_errors=True)
    (assets/"katex").mkdir(parents=True)
    for name in ("katex.min.js", "katex.min.css"): shutil.copy(katex/name, assets/"katex"/name)
    shutil.copytree(katex/"fonts", assets/"katex"/"fonts")
    # The theme imports its font from a web font service; the same font comes from the npm package instead.
    (assets/"bootstrap.min.css").write_text(re.sub(r"@import url\(https?://[^)]*\);?", "", bootstrap.read_text()))
    faces = [(font/f"latin-{style}.css").read_text() for style in ("300", "400", "400-italic", "600", "700", "700-italic")]
    (assets/"fonts").mkdir()
    for face in faces:
        for file in re.findall(r"url\(\./files/([^)]+)\)", face): shutil.copy(font/"files"/file, assets/"fonts"/file)
    (assets/"fonts.css").write_text("\n".join(faces).replace("url(./files/", "url(fonts/"))
    for name in ("site.css", "search.js"): shutil.copy(SITE/name, assets/name)
    shutil.copy(NBS/"styles.css", assets/"styles.css")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT/"_docs_offline", help="folder for the site")
    parser.add_argument("--deps", type=Path, default=ROOT/"_docs_deps", help="folder with the npm packages KaTeX, Bootswatch, Source Sans Pro")
    parser.add_argument("--skip-proc", action="store_true", help="reuse _proc/ from an earlier run")
    args = parser.parse_args(argv)
    if not args.skip_proc:
        os.chdir(ROOT)  # nbdev finds pyproject.toml from the working directory
        try: proc_nbs(str(NBS))  # what nbdev-proc-nbs runs, without its attempt to install Quarto
        except Exception as e:
            print(f"Processing the notebooks for the docs failed: {e}", file=sys.stderr)
            return 1
    site = yaml.safe_load((NBS/"nbdev.yml").read_text())["website"]
    pages = sidebar_pages(NBS/"_quarto.yml")
    listed = {nb for _, nb in pages}
    problems = [f"_quarto.yml lists {nb}, which is not in nbs/" for nb in listed if not (NBS/nb).exists()]
    problems += [f"nbs/{nb.name} is not in the sidebar of _quarto.yml" for nb in sorted(NBS.glob("*.ipynb"))
                 if nb.name not in listed and not nb.name.startswith("_")]
    if problems: print("Documentation problems:\n  " + "\n  ".join(problems), file=sys.stderr); return 1
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out/"figures").mkdir(parents=True)
    copy_assets(args.deps, args.out)
    docs = {nb: Page(PROC/nb, args.out/"figures") for _, nb in pages}
    titles = {nb: page.title for nb, page in docs.items()}
    html_names = {nb: page.html_name for nb, page in docs.items()}
    order, index = [nb for _, nb in pages], []
    for n, nb in enumerate(order):
        page = docs[nb]
        meta = {"title": page.title, "pagetitle": f"{page.title} – {site['title']}" if nb != "index.ipynb" else page.title,
                "description": str(page.meta.get("description", "")), "site-title": site["title"],
                "repo-url": site.get("repo-url", ""),
                "prev": {"href": html_names[order[n-1]], "title": titles[order[n-1]]} if n else None,
                "next": {"href": html_names[order[n+1]], "title": titles[order[n+1]]} if n+1 < len(order) else None}
        md = "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v}, allow_unicode=True) + "---\n\n" \
             + link_pages(page.markdown(), site.get("site-url", ""), html_names)
        problems += page.problems
        if nb[:1].isdigit() and not page.execution_record().startswith(FULL_RUN_RECORD):
            problems.append(f"{nb} does not show its saved full-mode execution record (core chapter): check `doc_procs` in pyproject.toml")
        target = args.out/page.html_name
        result = subprocess.run(["pandoc", "--from", "markdown", "--to", "html5", "--standalone",
                                 "--template", str(SITE/"template.html"), "--toc", "--toc-depth", "3",
                                 "--katex=assets/katex/", "--highlight-style", "pygments",
                                 "--variable", f"sidebar={sidebar_html(pages, titles, html_names, nb)}",
                                 "--output", str(target)], input=md, text=True, capture_output=True)
        if result.returncode != 0: problems.append(f"pandoc failed on {nb}: {result.stderr.strip()}"); continue
        index += search_entries(target.read_text(), page.html_name, page.title)
    (args.out/"assets"/"search_index.js").write_text("window.SEARCH_INDEX = " + json.dumps(index) + ";\n")
    if problems:
        print("Documentation problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"Docs: {len(docs)} pages in {args.out}/ (open {args.out/'index.html'}).")
    return 0


if __name__ == "__main__": sys.exit(main())
