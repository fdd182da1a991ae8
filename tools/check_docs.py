"""Browser check of the offline docs site: headless Chromium loads every page, as a reader would.

Fails (exit 1) on raw front matter, a visible `#|` cell option, unrendered maths (`$...$` left in the text, a maths
element KaTeX did not render, a KaTeX error), a missing title, a link to a page or anchor that does not exist,
an image that does not load, a request to the network, a JavaScript error, or a search box that does
not find a page by its title. Saves screenshots of a few pages (the top, and where the first folded test cell is).
Talks to Chromium (Debian's `chromium`) over the DevTools protocol with `websocket-client`.
Usage: `python tools/check_docs.py _docs_offline [--screenshots index.html losses.html retfound.html]`.
"""
import argparse, base64, json, shutil, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import websocket

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-port=0"]
WIDTH, HEIGHT = 1440, 1000

# Runs in the page after it loaded; returns what the checks need.
PAGE_FACTS = r"""(() => {
  const skip = "script, style, pre, code, .katex, .sourceCode";
  const prose = document.body.cloneNode(true);
  prose.querySelectorAll(skip).forEach(e => e.remove());
  const blocks = [...prose.querySelectorAll("p, li, td, th, h1, h2, h3, h4, h5, h6, dd, dt, figcaption, summary")]
    .map(e => e.textContent);
  const box = document.getElementById("search-box"), heading = (document.querySelector("h1") || {textContent: ""}).textContent.trim();
  let search = null;  // whether searching for the page's title lists the page
  if (box) {
    box.value = heading.replace(/\s+/g, " "); box.dispatchEvent(new Event("input"));
    search = [...document.querySelectorAll("#search-results a")].some(a => a.getAttribute("href").split("#")[0] === location.pathname.split("/").pop());
    box.value = ""; box.dispatchEvent(new Event("input"));
  }
  return {
    search,
    title: document.title.trim(),
    heading,
    frontMatter: blocks.filter(t => /---\s*(description|title|output-file)\s*:|\boutput-file\s*:/.test(t)),
    directives: [...document.body.querySelectorAll("*")].filter(e => e.children.length === 0 && /(^|\n)\s*#\|\s*[a-z][\w-]*(:|\s|$)/.test(e.textContent))
      .map(e => e.textContent.trim().slice(0, 80)),
    rawMath: blocks.filter(t => /\$[^$\s][^$]*\$|\\\(|\\\[|\$\$/.test(t)).map(t => t.trim().slice(0, 120)),
    maths: document.querySelectorAll(".math").length,
    unrendered: [...document.querySelectorAll(".math")].filter(e => !e.querySelector(".katex")).map(e => e.textContent.slice(0, 80)),
    katexErrors: [...document.querySelectorAll(".katex-error")].map(e => e.textContent.slice(0, 80)),
    brokenImages: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src")),
    links: [...document.querySelectorAll("a[href]")].map(a => a.getAttribute("href")),
    ids: [...document.querySelectorAll("[id]")].map(e => e.id),
    folded: document.querySelectorAll("details.code-fold:not([open])").length,
  };
})()"""

# Scrolls to the first folded test cell (for a second screenshot); returns whether there is one.
SCROLL_TO_TESTS = r"""(() => {
  const summary = [...document.querySelectorAll("details.code-fold:not([open]) > summary")].find(s => s.textContent.startsWith("Tests"));
  if (!summary) return false;
  window.scrollTo({top: summary.getBoundingClientRect().top + window.scrollY - 0.6 * window.innerHeight, behavior: "instant"});
  return true;
})()"""


class DevTools:
    "A DevTools protocol connection to one page target."
    def __init__(self, url:str):
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method:str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message: raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method:str, timeout:float=30):
        "Wait until the event `method` arrives (it may have arrived already)."
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline: raise TimeoutError(f"no {method} within {timeout} s")
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try: self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException: pass
        self.ws.settimeout(60)


def start_chromium(profile:Path) -> tuple[subprocess.Popen, int]:
    "Start headless Chromium; return the process and its DevTools port."
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary: raise SystemExit("No chromium on PATH: run `make docs-deps` (Debian package chromium).")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file, deadline = profile/"DevToolsActivePort", time.monotonic() + 60
    while not (port_file.exists() and len(port_file.read_text().split()) == 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill(); raise SystemExit("Chromium did not start (no DevToolsActivePort).")
        time.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


def load_page(port:int, browser:DevTools, url:str, screenshot:Path|None) -> tuple[dict, list]:
    "Open `url` in a new tab; return the page's facts and the tab's DevTools events (its own only)."
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    tab = DevTools(f"ws://127.0.0.1:{port}/devtools/page/{target}")
    try:
        for domain in ("Page", "Runtime", "Log", "Network"): tab.call(f"{domain}.enable")
        tab.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        tab.call("Page.navigate", url=url)
        tab.wait_for("Page.loadEventFired")
        tab.call("Runtime.evaluate", expression="document.fonts.ready", awaitPromise=True)
        found = tab.call("Runtime.evaluate", expression=PAGE_FACTS, returnByValue=True)
        if "exceptionDetails" in found: raise RuntimeError(f"{url}: the page check raised {found['exceptionDetails']}")
        if screenshot:
            screenshot.write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
            if tab.call("Runtime.evaluate", expression=SCROLL_TO_TESTS, returnByValue=True)["result"].get("value"):
                tests = screenshot.with_name(screenshot.stem + "-tests.png")
                tests.write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
        return found["result"]["value"], tab.events
    finally:
        tab.ws.close()
        browser.call("Target.closeTarget", targetId=target)


def page_errors(events:list) -> list[str]:
    "JavaScript exceptions, console errors, failed loads and network requests among DevTools events."
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append("JavaScript error: " + details.get("exception", {}).get("description", details.get("text", "")).splitlines()[0])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"browser error: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file://", "data:", "about:")): errors.append(f"request to the network: {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(f"failed to load a resource: {params.get('errorText')}")
    return errors


def link_problems(page:str, links:list, ids:dict, site:Path) -> list[str]:
    "Links of `page` to files or anchors that are not in the site."
    problems = []
    for href in links:
        parts = urlsplit(href)
        if parts.scheme in ("http", "https", "mailto"): continue
        target = unquote(parts.path) or page
        if parts.scheme or not (site/target).exists(): problems.append(f"broken link {href}"); continue
        if parts.fragment and target in ids and parts.fragment not in ids[target]:
            problems.append(f"link {href}: no anchor #{parts.fragment} in {target}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="folder of the built site (make docs)")
    parser.add_argument("--screenshots", nargs="*", default=["index.html", "losses.html", "retfound.html"],
                        help="pages to photograph into SITE/screenshots/")
    args = parser.parse_args(argv)
    site = args.site.resolve()
    pages = sorted(p.name for p in site.glob("*.html"))
    if not pages: raise SystemExit(f"No pages in {site}: run `make docs` first.")
    shots = site/"screenshots"
    shutil.rmtree(shots, ignore_errors=True); shots.mkdir()
    problems, facts, ids = [], {}, {}
    with tempfile.TemporaryDirectory() as profile:
        proc, port = start_chromium(Path(profile))
        try:
            version = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=30).read())
            browser = DevTools(version["webSocketDebuggerUrl"])
            for page in pages:
                shot = shots/page.replace(".html", ".png") if page in args.screenshots else None
                facts[page], events = load_page(port, browser, (site/page).as_uri(), shot)
                ids[page] = set(facts[page]["ids"])
                problems += [f"{page}: {e}" for e in page_errors(events)]
        finally:
            proc.terminate()
            try: proc.wait(10)
            except subprocess.TimeoutExpired: proc.kill()
    for page, f in facts.items():
        say = lambda what, items: problems.extend(f"{page}: {what}: {item}" for item in items)
        if not f["title"]: problems.append(f"{page}: no <title>")
        if not f["heading"]: problems.append(f"{page}: no page heading (h1)")
        if f["search"] is False: problems.append(f"{page}: the search box does not find the page by its title")
        say("raw front matter", f["frontMatter"]); say("visible cell option", f["directives"])
        say("maths left as text", f["rawMath"]); say("maths not rendered by KaTeX", f["unrendered"])
        say("KaTeX error", f["katexErrors"]); say("image does not load", f["brokenImages"])
        problems += [f"{page}: {p}" for p in link_problems(page, f["links"], ids, site)]
    if problems:
        print("Docs check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    n_maths = sum(f["maths"] for f in facts.values())
    n_folded = sum(f["folded"] for f in facts.values())
    print(f"Docs check: {len(facts)} pages loaded in Chromium, {n_maths} formulas rendered by KaTeX, {n_folded} folded cells, "
          f"no problems. Screenshots in {shots}/: {', '.join(sorted(p.name for p in shots.glob('*.png')))}")
    return 0


if __name__ == "__main__": sys.exit(main())
