"""The host's own web frontend (the comfyui-frontend-package the server serves), driven in a real
headless Chromium through Playwright's Chrome DevTools Protocol driver.

Playwright uses the system's Chromium (`/usr/bin/chromium`, or $FACESTUDIO_CHROMIUM): it never
downloads a browser. Without one, `require_browser()` skips with the reason, or fails when
$FACESTUDIO_REQUIRE_BROWSER=1 (CI sets it, so a missing browser cannot pass unseen).
"""
from __future__ import annotations

import contextlib
import os
import re
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

    def wait_for_pictures(self) -> None:
        """Until every Load Image node shows its picture: the frontend grows such a node to fit it, so its
        size is final only then."""
        self.page.wait_for_function(
            "() => app.graph.nodes.filter(n => n.type === 'LoadImage')"
            ".every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth))")
        self.page.wait_for_timeout(300)

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

    def arrange(self, layout: dict) -> float:
        """Places the overview Note and the groups left to right (each a Note, then its nodes, in as many
        columns as it needs); see workflow_defs.Workflow.layout. Returns the scale Fit View gives it."""
        scale = self.page.evaluate(ARRANGE_JS, {**layout, "viewport": [VIEWPORT["width"], VIEWPORT["height"]]})
        self.page.wait_for_timeout(200)
        return scale

    # --- the templates browser, as a user opens it ------------------------------------------------
    def open_templates(self, module: str) -> None:
        """Opens the templates browser with the sidebar's Templates button and picks `module`'s entry
        (under Custom Nodes in 1.27, Extensions in 1.48), then waits for its cards."""
        self.close_dialogs()
        self.close_templates()
        self.page.locator("button").filter(has_text=re.compile("^\\s*Tem\u00ad?plates\\s*$")).first.click()
        self.page.get_by_text(module, exact=True).first.click()
        self.page.wait_for_selector(TEMPLATE_CARD)
        self.page.wait_for_timeout(300)

    def close_templates(self) -> None:
        """Closes the templates browser as a user does (Escape); 1.48's is no PrimeVue dialog, so
        close_dialogs() does not see it."""
        for _ in range(3):
            if not self.page.locator(TEMPLATE_CARD).count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
        raise RuntimeError("the templates browser does not close on Escape")

    def sort_templates(self, label: str) -> bool:
        """Picks `label` in the browser's sort menu (1.48: Default, ..., 'A \u2192 Z'); False where there
        is no sort menu (1.27)."""
        menu = self.page.locator('button[role="combobox"]').filter(has_text="Default")
        if not menu.count():
            return False
        menu.first.click()
        self.page.get_by_role("option", name=label).click()
        self.page.wait_for_timeout(300)
        return True

    def template_cards(self) -> list[dict]:
        """The browser's cards in the order shown: name (from the card's test id), the title shown and
        whether it is cut off (an ellipsis or clamped lines), and the thumbnail's natural size (0 when it
        did not load). Each card is scrolled into view first, as lazily loaded thumbnails need; the grid
        is scrolled on until no new card appears (1.27 renders only the rows near the view)."""
        cards, shown, seen = self.page.locator(TEMPLATE_CARD), [], set()
        while True:
            new = 0
            for i in range(cards.count()):
                card = cards.nth(i)
                name = card.get_attribute("data-testid")
                if name in seen:
                    continue
                seen.add(name)
                new += 1
                card.scroll_into_view_if_needed()
                try:  # an image not yet in view has no src at all (and counts as complete)
                    self.page.wait_for_function(
                        "(card) => { const i = card.querySelector('img'); return i && i.src && i.complete && i.naturalWidth; }",
                        arg=card.element_handle(), timeout=10_000)
                except Exception as error:  # playwright's TimeoutError: reported as a 0x0 thumbnail
                    if "Timeout" not in type(error).__name__:
                        raise
                # Read while in view: 1.27 empties the images of cards scrolled away.
                shown.append(card.evaluate(TEMPLATE_CARD_JS))
            if not new:
                return shown
            cards.last.scroll_into_view_if_needed()
            self.page.wait_for_timeout(300)

    def open_template(self, name: str) -> None:
        """Clicks `name`'s card (scrolling the grid down to it, as a user does); returns when the browser
        has closed and its graph is on the canvas."""
        card = self.page.locator(f'[data-testid="template-workflow-{name}"]')
        for _ in range(20):
            if card.count():
                break
            self.page.locator(TEMPLATE_CARD).last.scroll_into_view_if_needed()
            self.page.wait_for_timeout(300)
        card.click()
        self.page.wait_for_function(f"() => !document.querySelector('{TEMPLATE_CARD}') && app.graph.nodes.length > 0")
        self.page.wait_for_timeout(500)

    def shown_layout(self) -> dict:
        """What the canvas holds and shows: each node's and group's rectangle in graph units (a node's with
        its title bar), the view's scale and offset, and the canvas's place on the page."""
        return self.page.evaluate(SHOWN_LAYOUT_JS)

    def uncovered(self, points) -> list[bool]:
        """For page points (x, y): whether the canvas (or a widget drawn on it) is what the page shows
        there, not a panel, a menu or a dialog over it, nor nothing (off the canvas)."""
        return self.page.evaluate(UNCOVERED_JS, [list(p) for p in points])

    def fit_view(self) -> None:
        self.page.evaluate(FIT_VIEW_JS)
        self.page.wait_for_timeout(500)

    def screenshot_page(self, path, quality: int = 85) -> None:
        """The whole page as the user sees it (panels and dialogs included), as a JPEG."""
        self.page.screenshot(path=str(path), type="jpeg", quality=quality)

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

TEMPLATE_CARD = '[data-testid^="template-workflow-"]'
TEMPLATE_CARD_JS = r"""
(card) => {
  const title = card.querySelector('h3'), img = card.querySelector('img');
  return {
    name: card.dataset.testid.slice('template-workflow-'.length),
    title: title ? title.innerText.trim() : '',
    title_cut: title ? (title.scrollWidth > title.clientWidth + 1 || title.scrollHeight > title.clientHeight + 1) : true,
    thumbnail: img ? [img.naturalWidth, img.naturalHeight] : [0, 0],
  };
}
"""
SHOWN_LAYOUT_JS = r"""
() => {
  const T = LiteGraph.NODE_TITLE_HEIGHT || 30, c = app.canvas, box = c.canvas.getBoundingClientRect();
  return {
    nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                                      rect: [n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T]})),
    groups: (app.graph.groups || app.graph._groups || []).map(g => ({title: g.title, color: g.color,
                                                                      rect: [...g.pos, ...g.size]})),
    scale: c.ds.scale, offset: [...c.ds.offset], canvas: [box.left, box.top, box.width, box.height],
  };
}
"""
UNCOVERED_JS = r"""
(points) => {
  const canvas = app.canvas.canvas;
  return points.map(([x, y]) => {
    const e = document.elementFromPoint(x, y);
    // The canvas itself, or a DOM widget the frontend draws on it (a Note's or a prompt's text box).
    return !!e && (e === canvas || e.tagName === 'TEXTAREA' || !!e.closest('.dom-widget, .dom-widgets, .comfy-multiline-input'));
  });
}
"""

ARRANGE_JS = r"""
(layout) => {
  const g = app.graph, LG = window.LiteGraph;
  const TITLE = LG.NODE_TITLE_HEIGHT || 30, PAD = 16, GAP = 30, COLUMN = 320;
  for (const [id, title] of Object.entries(layout.titles)) g.getNodeById(+id).title = title;
  const note = (text, width, title) => {
    const n = LG.createNode("Note");
    g.add(n);
    n.title = title;
    n.widgets[0].value = text;
    // Lines of about 6.8 px per character, paragraph by paragraph, plus the text box's margins.
    const lines = text.split("\n").reduce((sum, p) => sum + Math.max(1, Math.ceil(p.length * 6.8 / (width - 24))), 0);
    // Never below what the frontend itself would give it (it enforces that on load: title, text box).
    const least = n.computeSize ? n.computeSize() : [0, 0];
    n.size = [Math.max(width, least[0]), Math.max(36 + lines * 17, least[1])];
    n.color = "#432"; n.bgcolor = "#653";
    return n;
  };
  // The overview note is a column of its own; each group, a Note under its title and then its nodes,
  // flows down columns no taller than `height` and spans as many as it needs. All groups sit in one
  // row, so the whole graph is a block the frontends' Fit View (which 1.48 applies to every template it
  // opens) can show at a readable scale: `height` is chosen for the largest such scale.
  const overview = note(layout.description, COLUMN + 60, "About: " + layout.title);
  const groups = layout.groups.map(spec => {
    const nodes = spec.nodes.map(id => g.getNodeById(+id));
    const width = Math.max(COLUMN, ...nodes.map(n => n.size[0]));
    for (const n of nodes) n.size = [width, n.size[1]];
    const header = note(spec.note, width, "Step " + spec.title);
    return {spec, width: Math.max(width, header.size[0]), items: [header, ...nodes]};
  });
  const place = (height, apply) => {
    let x = overview.size[0] + GAP, bottom = TITLE + overview.size[1];
    if (apply) overview.pos = [0, TITLE];
    for (const group of groups) {
      let columnX = x + PAD, y = 2 * TITLE, columnTop = true, right = columnX + group.width;
      for (const n of group.items) {
        if (!columnTop && y + n.size[1] > height) { columnX += group.width + GAP; y = 2 * TITLE; }
        if (apply) n.pos = [columnX, y];  // a node's pos is its body's corner, under its own title
        y += n.size[1] + PAD + TITLE;
        columnTop = false;
        right = Math.max(right, columnX + group.width);
        bottom = Math.max(bottom, y - TITLE);
      }
      group.rect = [x, 0, right + PAD - x, 0];
      x = right + PAD + GAP;
    }
    for (const group of groups) group.rect[3] = bottom + PAD;
    return [x - GAP, bottom + PAD];
  };
  // Fit View's scale at the viewport the workflows are made for (LGraphCanvas.ds.fitToBounds: 0.75 of it).
  const [W, H] = layout.viewport, fit = ([w, h]) => Math.min(0.75 * W / w, 0.75 * H / h, 1);
  let best = null;
  for (let height = 600; height <= 3000; height += 25) {
    const scale = fit(place(height, false));
    if (!best || scale > best.scale) best = {height, scale};
  }
  const [width, height] = place(best.height, true);
  for (const {spec, rect} of groups) {
    const group = new LG.LGraphGroup(spec.title);
    group.color = spec.color;
    g.add(group);
    group.pos = rect.slice(0, 2);
    group.size = rect.slice(2);
  }
  g.setDirtyCanvas(true, true);
  return fit([width, height]);  // the scale Fit View gives
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
