"""The host's own web frontend (the comfyui-frontend-package the server serves), driven in a real
headless Chromium through Playwright's Chrome DevTools Protocol driver.

Playwright uses the system's Chromium (`/usr/bin/chromium`, or $FACESTUDIO_CHROMIUM): it never
downloads a browser. Without one, `require_browser()` skips with the reason, or fails when
$FACESTUDIO_REQUIRE_BROWSER=1 (CI sets it, so a missing browser cannot pass unseen).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

REQUIRE_ENV = "FACESTUDIO_REQUIRE_BROWSER"
CHROMIUM_ENV = "FACESTUDIO_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1920, "height": 1080}
# Settings written before the page opens, so no first-run dialog covers the canvas.
# The minimap, canvas info and canvas menu are hidden so screenshots show the graph alone.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                  "Comfy.Graph.CanvasMenu": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}


def chromium_path() -> str | None:
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser_reason() -> str | None:
    """Why the frontend cannot be driven here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the 'playwright' package is not installed (requirements-test.txt; scripts/test.sh installs it)"
    if chromium_path() is None:
        where = os.environ.get(CHROMIUM_ENV) or " / ".join(CANDIDATES)
        return (f"no Chromium found ({where}); install it (Debian/Ubuntu: apt-get install chromium, which "
                f"scripts/setup.sh does when run as root) or set {CHROMIUM_ENV}")
    return None


def require_browser() -> None:
    reason = missing_browser_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"the frontend tests need a browser ({REQUIRE_ENV}=1): {reason}", pytrace=False)
    pytest.skip(f"frontend tests skipped: {reason}")


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield instance
        finally:
            instance.close()


@contextlib.contextmanager
def opened(server):
    """A Frontend on `server` in a fresh browser; closed afterwards (a test module's `page` fixture)."""
    require_browser()
    with browser() as instance:
        page = Frontend(instance, server)
        try:
            yield page
        finally:
            page.close()


class Frontend:
    """One page of the host's UI, served by `server` (a facestudio_testing.server.ComfyServer)."""

    def __init__(self, browser_instance, server, timeout_ms: float = 180_000):
        for key, value in QUIET_SETTINGS.items():
            server.request(f"/settings/{key}", value)
        self.page = browser_instance.new_page(viewport=VIEWPORT)
        self.page.set_default_timeout(timeout_ms)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(server.url)
        self.page.wait_for_function(
            "() => window.app && app.graph && window.LiteGraph && app.vueAppReady"
            " && Object.keys(LiteGraph.registered_node_types).length > 100")
        self.close_dialogs()
        # Errors of the page's own start-up (e.g. an offline fetch), kept apart from ours.
        self.startup_errors, self.errors = self.errors, []

    def close(self) -> None:
        self.page.close()

    # --- dialogs ------------------------------------------------------------------------------
    def dialogs(self) -> list[str]:
        """The text of every dialog open on the page (PrimeVue dialogs: missing nodes, errors...)."""
        return self.page.evaluate(
            "() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)"
            ".map(d => d.innerText.trim().slice(0, 500))")

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    # --- missing models and the queue's errors ------------------------------------------------
    def missing_models(self, timeout_ms: float = 15_000) -> list[tuple[str, str]]:
        """(folder, file) of each entry of the frontend's Missing Models list for the workflow just
        loaded; [] when it shows none within `timeout_ms`. 1.27: its Missing Models dialog, one
        '<folder> / <file>' line each. 1.48: the Missing Models group of its Errors tab (opened from the
        error overlay's 'View details'), a file line then a folder line each."""
        try:
            kind = self.page.wait_for_function(MISSING_MODELS_SHOWN_JS, timeout=timeout_ms).json_value()
        except Exception as error:  # playwright's TimeoutError: nothing shown
            if "Timeout" not in type(error).__name__:
                raise
            return []
        if kind == "overlay":
            self.page.evaluate(VIEW_DETAILS_JS)
            try:
                self.page.wait_for_selector(MISSING_MODEL_GROUP, timeout=timeout_ms)
            except Exception as error:
                if "Timeout" not in type(error).__name__:
                    raise
                return []  # an overlay for other errors (e.g. a missing picture) and no missing model
        text = self.page.evaluate(MISSING_MODELS_TEXT_JS)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if kind == "dialog":
            return [tuple(part.strip() for part in line.split(" / ", 1)) for line in lines if " / " in line]
        # 1.48: '<count>', 'Missing Models', a description, then file, folder[, 'Download'] per entry.
        rows = [line for line in lines[3:] if line not in ("Download", "Download all")]
        return [(folder, name) for name, folder in zip(rows[::2], rows[1::2])]

    def queue(self) -> dict:
        """Queues the loaded workflow as the Run button does (app.queuePrompt) and returns the server's
        answer to that POST /prompt: {'prompt_id': ...}, or the refusal ({'error', 'node_errors'})."""
        with self.page.expect_response(
                lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith("/prompt")) as answer:
            self.page.evaluate("() => app.queuePrompt(0)")
        return answer.value.json()

    def shown_text(self) -> str:
        """Everything the page shows as text (dialogs, panels, overlays), untruncated."""
        return self.page.evaluate("() => document.body.innerText")

    # --- graphs -------------------------------------------------------------------------------
    def registered(self, class_types) -> list[str]:
        return self.page.evaluate("(types) => types.filter(t => LiteGraph.registered_node_types[t])",
                                  sorted(set(class_types)))

    def load_api(self, prompt: dict, name: str) -> None:
        self.page.evaluate("([p, name]) => app.loadApiJson(p, name)", [prompt, name])

    def load_workflow(self, workflow: dict, name: str) -> None:
        """What opening a workflow file or template does: app.loadGraphData."""
        self.page.evaluate("async ([w, name]) => { await app.loadGraphData(w, true, true, name); }",
                           [workflow, name])
        self.page.wait_for_timeout(300)

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => app.graph.nodes.map(n => n.type)")

    def unknown_node_types(self) -> list[str]:
        """Types of loaded nodes the frontend has no definition for (what its missing-nodes dialog lists).
        LiteGraph's registry, kept by every frontend from 1.2x to 1.48."""
        return self.page.evaluate(
            "() => app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")

    def nodes_with_error_badges(self) -> list[str]:
        """'type (title)' of every node drawn with the error outline: frontend 1.48 also marks a node whose
        model or image file is not on the server, 1.27 only after a failed queue."""
        return self.page.evaluate(
            "() => app.graph.nodes.filter(n => n.has_errors).map(n => `${n.type} (${n.title})`)")

    def graph_to_prompt(self) -> dict:
        """The frontend's own conversion of the loaded graph into the API prompt it would queue."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def serialize(self) -> dict:
        # Through JSON as the frontend's own Save does: undefined fields are left out, not null.
        return self.page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")

    def arrange(self, layout: dict) -> None:
        """Places the groups as columns left to right (nodes top to bottom, a Note at the top of each),
        with an overview Note above them; see workflow_defs.Workflow.layout."""
        self.page.evaluate(ARRANGE_JS, layout)
        self.page.wait_for_timeout(200)

    def fit_view(self) -> None:
        self.page.evaluate(FIT_VIEW_JS)
        self.page.wait_for_timeout(500)

    def screenshot(self, path, quality: int = 80) -> None:
        """The canvas (with the DOM widgets drawn over it) as a JPEG."""
        self.page.locator("#graph-canvas").screenshot(path=str(path), type="jpeg", quality=quality)


# Which Missing Models list the page shows: 1.27's dialog, or 1.48's error overlay (its Errors tab holds
# the list); null while neither is there.
MISSING_MODEL_GROUP = '[data-testid="error-group-missing-model"]'
MISSING_MODELS_SHOWN_JS = r"""
() => {
  const shown = e => e.offsetParent !== null;
  if ([...document.querySelectorAll('.p-dialog')].some(d => shown(d) && /models were not found/.test(d.innerText)))
    return "dialog";
  if ([...document.querySelectorAll('[data-testid="error-group-missing-model"]')].some(shown)) return "panel";
  if ([...document.querySelectorAll('button')].some(b => shown(b) && b.innerText.trim() === 'View details'))
    return "overlay";
  return null;
}
"""
VIEW_DETAILS_JS = r"""
() => [...document.querySelectorAll('button')].find(b => b.offsetParent !== null
                                                      && b.innerText.trim() === 'View details').click()
"""
MISSING_MODELS_TEXT_JS = r"""
() => {
  const shown = e => e.offsetParent !== null;
  const dialog = [...document.querySelectorAll('.p-dialog')]
    .find(d => shown(d) && /models were not found/.test(d.innerText));
  if (dialog) return dialog.innerText;
  const group = [...document.querySelectorAll('[data-testid="error-group-missing-model"]')].find(shown);
  return group ? group.innerText : "";
}
"""

ARRANGE_JS = r"""
(layout) => {
  const g = app.graph, LG = window.LiteGraph;
  const TITLE = LG.NODE_TITLE_HEIGHT || 30, PAD = 20, GAP = 40, COLUMN = 340, MAX_HEIGHT = 1150;
  for (const [id, title] of Object.entries(layout.titles)) g.getNodeById(+id).title = title;
  const note = (text, width, height, title) => {
    const n = LG.createNode("Note");
    g.add(n);
    n.title = title;
    n.widgets[0].value = text;
    n.size = [width, height];
    n.color = "#432"; n.bgcolor = "#653";
    return n;
  };
  const noteHeight = (text, width) => 60 + Math.ceil(text.length * 7.2 / (width - 30)) * 18;
  const overview = note(layout.description, 2 * COLUMN + 3 * PAD, 0, "About: " + layout.title);
  overview.size = [overview.size[0], noteHeight(overview.widgets[0].value, overview.size[0])];
  overview.pos = [0, 0];
  const top = overview.size[1] + 2 * TITLE + GAP;
  let x = 0;
  for (const spec of layout.groups) {
    const nodes = spec.nodes.map(id => g.getNodeById(+id));
    const width = Math.max(COLUMN, ...nodes.map(n => n.size[0]));
    const header = note(spec.note, width, noteHeight(spec.note, width), "Step " + spec.title);
    let columnX = x + PAD, y = top + TITLE, right = columnX + width, bottom = y;
    header.pos = [columnX, y];
    y += header.size[1] + TITLE + PAD;
    for (const n of nodes) {
      n.size = [Math.max(width, n.size[0]), n.size[1]];
      if (y + n.size[1] > top + MAX_HEIGHT && y > top + TITLE + header.size[1] + TITLE + PAD) {
        columnX += width + GAP; y = top + TITLE;  // wrap into a second column inside the group
      }
      n.pos = [columnX, y];
      y += n.size[1] + TITLE + PAD;
      right = Math.max(right, columnX + n.size[0]);
      bottom = Math.max(bottom, y - TITLE);
    }
    const group = new LG.LGraphGroup(spec.title);
    group.color = spec.color;
    g.add(group);
    group.pos = [x, top - TITLE];
    group.size = [right - x + PAD, bottom - top + TITLE + PAD];
    x = right + PAD + GAP;
  }
  g.setDirtyCanvas(true, true);
}
"""

FIT_VIEW_JS = r"""
() => {
  const c = app.canvas, nodes = app.graph.nodes, groups = app.graph.groups || app.graph._groups || [];
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  const grow = (x, y, w, h) => { minX = Math.min(minX, x); minY = Math.min(minY, y);
                                 maxX = Math.max(maxX, x + w); maxY = Math.max(maxY, y + h); };
  for (const n of nodes) grow(n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30);
  for (const gr of groups) grow(gr.pos[0], gr.pos[1], gr.size[0], gr.size[1]);
  const w = c.canvas.clientWidth || c.canvas.width, h = c.canvas.clientHeight || c.canvas.height;
  const margin = 40;
  c.min_font_size_for_lod = 0;  // full detail at any zoom, for screenshots
  const scale = Math.min((w - 2 * margin) / (maxX - minX), (h - 2 * margin) / (maxY - minY), 1);
  c.ds.scale = scale;
  c.ds.offset = [(w / scale - (maxX - minX)) / 2 - minX, (h / scale - (maxY - minY)) / 2 - minY];
  c.setDirty(true, true);
  c.draw(true, true);
}
"""
