"The offline docs build: Quarto's cell options, nbdev's processing, folding, show_doc tables, links, and the browser check."
import base64, json, shutil, subprocess, sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import REPO_DIR

sys.path.insert(0, str(REPO_DIR/"tools"))
import build_docs, check_docs  # noqa: E402

PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6360000002000100ffff03000006000557bfabd40000000049454e44ae426082")).decode()


def code(source, *outputs): return new_code_cell(source, outputs=list(outputs))
def stream(text, name="stdout"): return new_output("stream", name=name, text=text)


def write_processed(tmp_path, cells, front="---\ntitle: Tiny chapter\ndescription: A summary\noutput-file: tiny.html\n---\n"):
    "A notebook as `nbdev-proc-nbs` leaves it: front matter in a raw cell, then the cells."
    nb = new_notebook(cells=[nbformat.v4.new_raw_cell(front), *cells])
    path = tmp_path/"00_tiny.ipynb"
    nbformat.write(nb, path)
    (tmp_path/"figures").mkdir(exist_ok=True)
    return build_docs.Page(path, tmp_path/"figures")


def test_front_matter_is_title_and_file_name(tmp_path):
    page = write_processed(tmp_path, [new_markdown_cell("Text.")])
    assert (page.title, page.meta["description"], page.html_name) == ("Tiny chapter", "A summary", "tiny.html")
    assert "title:" not in page.markdown() and "---" not in page.markdown()


def test_quarto_cell_options(tmp_path):
    page = write_processed(tmp_path, [
        code("#| echo: false\nhidden_code()", stream("output of hidden code")),
        code("#| include: false\nexcluded_code()", stream("output of excluded code")),
        code("#| output: false\nshown_code = 1", stream("suppressed output")),
        code("#| output: asis\nmarkdown_maker()", new_output("execute_result", data={"text/markdown": "**raw markdown**", "text/plain": "x"})),
        code("#| code-fold: true\n#| code-summary: \"Helper\"\nfolded_code = 2"),
        code("#| code-fold: show\nopen_code = 3"),
    ])
    md = page.markdown()
    assert "output of hidden code" in md and "hidden_code()" not in md
    assert "excluded" not in md
    assert "shown_code = 1" in md and "suppressed output" not in md
    assert "\n**raw markdown**\n" in md and "markdown_maker" in md
    assert '<details class="code-fold"><summary>Helper</summary>' in md and "folded_code = 2" in md
    assert '<details class="code-fold" open><summary>Code</summary>' in md
    assert "#|" not in md


def test_long_test_cells_and_imports_fold(tmp_path):
    long_test = "\n".join(f"test_eq(f({i}), {i})" for i in range(build_docs.FOLD_LINES + 1))
    short_test = "test_eq(f(1), 1)\ntest_eq(f(2), 2)"
    page = write_processed(tmp_path, [code("import math\nfrom pathlib import Path"), code(long_test), code(short_test),
                                      code("#| code-fold: false\n" + long_test)])
    md = page.markdown()
    assert md.count("<summary>Imports (2 lines)</summary>") == 1
    assert md.count(f"<summary>Tests ({build_docs.FOLD_LINES + 1} lines)</summary>") == 1  # not the code-fold: false one
    assert md.count("<details") == 2 and short_test in md


def test_outputs_images_and_errors(tmp_path):
    page = write_processed(tmp_path, [
        code("plot()", new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})),
        code("table()", new_output("execute_result", data={"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "df"})),
        code("warn()", stream("careful", "stderr")),
        code("fail()", new_output("error", ename="ValueError", evalue="bad input", traceback=[])),
    ])
    md = page.markdown()
    assert "![](figures/tiny_1.png)" in md and (tmp_path/"figures"/"tiny_1.png").read_bytes().startswith(b"\x89PNG")
    assert "```{=html}\n<table>" in md and "<Figure>" not in md
    assert ".cell-output-stderr" in md
    assert page.problems == ["00_tiny.ipynb cell 3: ValueError: bad input"]


def test_nbdev_processing_then_page(tmp_path):
    "A notebook in nbs/ form, processed by nbdev as nbdev-proc-nbs does, then turned into a page."
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import exec_nb
    nb = new_notebook(cells=[
        new_markdown_cell("# Tiny chapter\n\n> A summary of it."),
        code("#| default_exp tiny"),
        code("#| hide\nsecret = 42"),
        new_markdown_cell("Some maths: $a^2 + b^2$."),
        code('#| export\ndef scale(x:float, # the value\n          k:int=2, # the factor\n         )->float:\n'
             '    "Multiply `x` by `k`."\n    return x*k'),
        code("#| exports\ndef shown(y): return y"),
        code("assert scale(1) == 2"),
    ])
    nbformat.write(nb, tmp_path/"src.ipynb")
    exec_nb(tmp_path/"src.ipynb", tmp_path/"proc.ipynb", FilterDefaults)
    (tmp_path/"figures").mkdir()
    page = build_docs.Page(tmp_path/"proc.ipynb", tmp_path/"figures")
    md = page.markdown()
    assert (page.title, page.meta["description"]) == ("Tiny chapter", "A summary of it.")
    assert "secret" not in md and "default_exp" not in md and "return x*k" not in md  # hidden, as nbdev hides them
    assert "### scale" in md and "scale(x:float, k:int=2) -> float" in md
    assert "<td><code>k</code></td><td><code>int</code></td><td><code>2</code></td><td>the factor</td>" in md
    assert '<details class="code-fold" open><summary>Exported source</summary>' in md and "def shown(y)" in md
    assert "$a^2 + b^2$" in md and "#|" not in md


def test_processing_keeps_the_saved_run(tmp_path):
    "nbdev reruns cells that import something, in test mode; the page still shows the saved full-mode outputs."
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import main as process_one
    record = "Outputs from one run in full mode: 2 code cells, fingerprint `0123456789ab`."
    nb = new_notebook(cells=[
        new_markdown_cell("# Tiny chapter\n\n> A summary of it."),
        code("#| export\ndef scale(x): return 2 * x"),
        code("import os\nprint('full mode' if not os.environ.get('IN_TEST') else 'test mode')", stream("full mode\n")),
        code("#| echo: false\nfrom fundus_lab.core import execution_record\nexecution_record()",
             new_output("execute_result", data={"text/markdown": record, "text/plain": "<Markdown>"}, execution_count=3)),
    ])
    nbformat.write(nb, tmp_path/"01_tiny.ipynb")
    process_one((tmp_path/"01_tiny.ipynb", tmp_path/"proc.ipynb", FilterDefaults))  # as nbdev-proc-nbs runs each notebook
    (tmp_path/"figures").mkdir()
    page = build_docs.Page(tmp_path/"proc.ipynb", tmp_path/"figures")
    assert page.execution_record() == record and page.execution_record().startswith(build_docs.FULL_RUN_RECORD)
    md = page.markdown()
    assert "\nfull mode\n" in md and "\ntest mode\n" not in md  # the printed line of the saved run, not of the rerun


def test_parameter_table_leaves_other_markdown_alone():
    assert build_docs.show_doc_markdown("### CONSTANT\n\n```python\n42\n```") == "### CONSTANT\n\n```python\n42\n```"
    table = build_docs.parameter_table("def f(\n    a, # first\n    *rest, # more\n    flag:bool=False, # a switch\n    **kw\n):")
    assert "f(a, *rest, flag:bool=False, **kw)" in table
    assert "<td><code>*rest</code></td><td></td><td></td><td>more</td>" in table
    assert "<td><code>**kw</code></td>" in table


def test_links_to_the_site_and_notebooks_become_relative():
    md = "[`f`](https://fundus-lab.github.io/fundus-lab/losses.html#focalloss), [chapter](13_losses.ipynb#focal), [x](http://x.org)"
    out = build_docs.link_pages(md, "https://fundus-lab.github.io/fundus-lab", {"13_losses.ipynb": "losses.html"})
    assert out == "[`f`](losses.html#focalloss), [chapter](losses.html#focal), [x](http://x.org)"


def test_sidebar_lists_every_notebook():
    pages = build_docs.sidebar_pages(REPO_DIR/"nbs"/"_quarto.yml")
    names = [nb for _, nb in pages]
    assert sorted(names) == sorted(p.name for p in (REPO_DIR/"nbs").glob("*.ipynb"))
    assert names[0] == "index.ipynb" and len(set(names)) == len(names)
    assert build_docs.cell_options("#| code-summary: \"Exported source\"\n#| exports\nx = 1") == \
        ({"code-summary": "Exported source", "exports": True}, "x = 1")


@pytest.mark.skipif(shutil.which("pandoc") is None, reason="pandoc is not installed (make docs-deps)")
def test_pandoc_renders_folds_and_maths(tmp_path):
    page = write_processed(tmp_path, [new_markdown_cell("Inline $x^2$ and\n\n$$\\sum_i x_i$$"), code("import os")])
    html = subprocess.run(["pandoc", "-f", "markdown", "-t", "html5", "--katex=assets/katex/"], input=page.markdown(),
                          text=True, capture_output=True, check=True).stdout
    assert '<span class="math inline">x^2</span>' in html and '<span class="math display">' in html
    assert '<details class="code-fold"><summary>Imports (1 lines)</summary>' in html


BAD_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<p>--- description: a summary title: A page ---</p>
<pre><code>#| echo: false
show_doc(f)</code></pre>
<p>The loss is $-\\log p_t$ here.</p>
<p><span class="math inline">\\(x\\)</span></p>
<a href="missing.html">gone</a> <a href="good.html#nowhere">no anchor</a> <a href="https://example.org">outside</a>
<img src="figures/none.png">
<script>undefinedFunction();</script>
</body></html>"""
GOOD_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>Good</title></head><body>
<h1 id="top">Good</h1><p>A <code>#|</code> sign in code, a link to <a href="good.html#top">the top</a>.</p></body></html>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make docs-deps)")
def test_browser_check_finds_each_defect(tmp_path, capsys):
    (tmp_path/"good.html").write_text(GOOD_PAGE)
    assert check_docs.main([str(tmp_path), "--screenshots", "good.html"]) == 0
    assert (tmp_path/"screenshots"/"good.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path/"bad.html").write_text(BAD_PAGE)
    assert check_docs.main([str(tmp_path), "--screenshots"]) == 1
    err = capsys.readouterr().err
    for expected in ("bad.html: no <title>", "bad.html: no page heading", "bad.html: raw front matter",
                     "bad.html: visible cell option: #| echo: false", "bad.html: maths left as text",
                     "bad.html: maths not rendered by KaTeX", "bad.html: broken link missing.html",
                     "bad.html: link good.html#nowhere: no anchor", "bad.html: image does not load: figures/none.png",
                     "bad.html: JavaScript error: ReferenceError: undefinedFunction is not defined"):
        assert expected in err, expected
    assert "good.html:" not in err and "example.org" not in err


def test_workflows_run_the_readme_commands():
    "The GitHub workflows install as the README does and run its commands with the project's Python."
    import yaml
    workflows = REPO_DIR/".github"/"workflows"
    test, deploy = (yaml.safe_load((workflows/name).read_text()) for name in ("test.yaml", "deploy.yaml"))
    runs = lambda wf: [step.get("run", "") for job in wf["jobs"].values() for step in job["steps"]]
    pythons = lambda wf: {step["with"]["python-version"] for job in wf["jobs"].values() for step in job["steps"]
                          if step.get("uses", "").startswith("actions/setup-python")}
    assert {"make install", "make test", "make check-sync"} <= set(runs(test))
    assert "make install" in runs(deploy) and ".venv/bin/nbdev-docs" in runs(deploy)
    assert pythons(test) == pythons(deploy) == {"3.11"}
    publish = [s for s in deploy["jobs"]["deploy"]["steps"] if s.get("uses", "").startswith("peaceiris/actions-gh-pages")]
    assert publish and publish[0]["with"]["publish_dir"] == "./_docs"
    readme = (REPO_DIR/"README.md").read_text()
    assert all(cmd in readme for cmd in ("make test", "make check-sync", "nbdev-docs", "make docs-check"))
    pins = (REPO_DIR/".github"/"constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
