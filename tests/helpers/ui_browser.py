"""Drive the MLflow UI that ``tunelab-ui`` serves, in a headless Chromium, as a person would.

Used by the browser test (tests/cli/test_ui_browser.py) and by scripts/ui_screenshot.py, which makes the
screenshot in the docs. Needs the ``playwright`` Python package and a Chromium binary (Debian's
/usr/bin/chromium; ``playwright install`` is never needed). Both are imported or looked up only when
used, so importing this module costs nothing where they are missing.

What a person does in MLflow 3.17, and what these helpers do:

1. open the link tunelab prints (``#/experiments/ID/runs?workflowType=machine_learning&viewStateShareKey=
   KEY``, tunelab.tracking.links.runs_page): the runs table, with the objective as a column (open_link).
   The bare ``#/experiments/ID`` lands on the *GenAI* overview instead, with a "Detect Issues"
   pop-over that blocks the page (dismissed with "Got it"); there the sidebar's switch from
   "GenAI" to "Model training" shows the runs table (open_runs_table). An "MLflow Assistant" side
   panel, open on a first visit, is closed either way;
2. click the [+] in front of a sweep's parent run: its trials appear nested (indented) below it;
3. tick runs and press "Compare": a page with their parameters side by side (compare_runs,
   compared_params).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers, root); no GPU; and none of Chromium's own traffic (updates, sync, QUIC
# probes), which on a machine without network floods it with refused connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 800}
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'  # MLflow's column id for the run name column
RUN_LINK = 'a[href*="/runs/"]'


def missing_browser() -> str | None:
    """Why a browser cannot be driven here (None if it can)."""
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    return None


@contextlib.contextmanager
def browser_page(viewport: dict | None = None, timeout_ms: int = 60_000):
    """A page in a fresh headless Chromium that can reach only 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=viewport or VIEWPORT)
            context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


@dataclass(frozen=True)
class SweepRuns:
    experiment_id: str
    parent_id: str
    parent_name: str
    children: dict[str, str]  # run id -> run name


def latest_sweep(store: Path, experiment: str = "tunelab") -> SweepRuns:
    """The most recent sweep (parent run tagged ``tunelab.sweep=parent``) in ``store``, and its trials."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(store).resolve()}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no experiment {experiment!r} in {store}")
    parents = client.search_runs([found.experiment_id], "tags.`tunelab.sweep` = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise LookupError(f"no sweep (parent run) in experiment {experiment!r} of {store}: run tunelab-train -m ...")
    parent = parents[0]
    children = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    return SweepRuns(found.experiment_id, parent.info.run_id, parent.info.run_name,
                     {c.info.run_id: c.info.run_name for c in children})


def _close_popups(page) -> None:
    # Things that pop up by themselves and that a person closes: Playwright closes them whenever they
    # show up before an action.
    page.add_locator_handler(page.get_by_role("button", name="Got it", exact=True), lambda b: b.click())


def open_link(page, url: str, link: str) -> None:
    """Open a link tunelab printed on the UI at ``url`` (the link's own host and port replaced)
    and wait for the runs table, switching nothing: the link alone must get there."""
    _close_popups(page)
    page.goto(f"{url}/{link.split('/', 3)[-1] if link.startswith('http') else link}")
    page.locator(".ag-header-cell" + RUN_NAME_CELL).wait_for()
    _close_assistant(page)


def shown_columns(page) -> list[str]:
    """The runs table's column ids: ``metrics.`val/acc```, ``params.`optimizer.lr```, ..."""
    return page.evaluate("() => [...document.querySelectorAll('.ag-header-cell[col-id]')].map(h => h.getAttribute('col-id'))")


def open_runs_table(page, url: str, experiment_id: str) -> None:
    """Open the experiment's bare link, get past MLflow 3's GenAI landing page to the runs table."""
    _close_popups(page)
    page.goto(f"{url}/#/experiments/{experiment_id}")
    toggle = page.get_by_role("button", name="Model training", exact=True)
    table = page.locator(".ag-header-cell" + RUN_NAME_CELL)
    toggle.or_(table).first.wait_for()
    if toggle.is_visible():
        toggle.click()
    table.wait_for()
    _close_assistant(page)


def _close_assistant(page) -> None:
    close_assistant = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close_assistant.is_visible():  # the "MLflow Assistant" side panel, open on a first visit
        close_assistant.click()
        close_assistant.wait_for(state="hidden")


# The runs as the table shows them, top to bottom: AG Grid renders the pinned and scrolling parts of
# a row as separate elements (same row-id = run id); the one holding the run-name cell is used.
_ROWS_JS = """() => [...document.querySelectorAll('.ag-row[row-id]')]
    .map(row => [row, row.querySelector('%s %s')])
    .filter(([row, link]) => link)
    .map(([row, link]) => ({run_id: row.getAttribute('row-id'), index: +row.getAttribute('row-index'),
                            name: link.textContent.trim(), indent: link.getBoundingClientRect().left}))
    .sort((a, b) => a.index - b.index)""" % (RUN_NAME_CELL, RUN_LINK)

_CHILDREN_JS = """(rows, parentId) => {
    const at = rows.findIndex(r => r.run_id === parentId);
    if (at < 0) return null;
    const kids = [];
    for (const r of rows.slice(at + 1)) { if (r.indent <= rows[at].indent) break; kids.push(r); }
    return kids;
}"""


@dataclass(frozen=True)
class ShownRun:
    run_id: str
    name: str
    indent: float  # x of the run's name on screen: children are further right than their parent


def shown_runs(page) -> list[ShownRun]:
    """Every run the table shows now, top to bottom."""
    return [ShownRun(r["run_id"], r["name"], r["indent"]) for r in page.evaluate(_ROWS_JS)]


def shown_children(page, parent_id: str) -> list[ShownRun] | None:
    """The runs shown nested (indented) right below ``parent_id``; None if the parent is not shown."""
    kids = page.evaluate(f"parentId => ({_CHILDREN_JS})(({_ROWS_JS})(), parentId)", parent_id)
    return None if kids is None else [ShownRun(r["run_id"], r["name"], r["indent"]) for r in kids]


def parent_row(page, parent_id: str):
    return page.locator(f'.ag-row[row-id="{parent_id}"]:has({RUN_NAME_CELL} {RUN_LINK})')


def expand(page, parent_id: str, expected: int | None = None, timeout_ms: int = 30_000) -> list[ShownRun]:
    """Click the [+] in front of the parent run if its children are hidden; wait until they show.

    Waits until ``expected`` children are shown (any, if None) and returns what is shown then, also
    when that is fewer or more than expected: the caller decides whether that is right.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    row = parent_row(page, parent_id)
    row.wait_for()
    if not shown_children(page, parent_id):
        row.locator(RUN_NAME_CELL).get_by_role("button").first.click()  # the only button there: [+]
    condition = "kids && kids.length > 0" if expected is None else f"kids && kids.length === {int(expected)}"
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(f"parentId => {{ const kids = ({_CHILDREN_JS})(({_ROWS_JS})(), parentId); "
                               f"return {condition}; }}", arg=parent_id, timeout=timeout_ms)
    return shown_children(page, parent_id) or []


def compare_runs(page, run_ids: list[str]) -> None:
    """Tick the runs in the table and press "Compare": MLflow's page of their params side by side."""
    for run_id in run_ids:
        page.locator(f'.ag-row[row-id="{run_id}"] input[type=checkbox]').first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_role("switch", name="Parameters - Show diff only").wait_for()


def compared_params(page, diff_only: bool = False) -> list[str]:
    """The parameter names the compare page lists (after switching on "Show diff only", if asked)."""
    switch = page.get_by_role("switch", name="Parameters - Show diff only")
    if diff_only and switch.get_attribute("aria-checked") != "true":
        switch.click()
        page.wait_for_function("s => s.getAttribute('aria-checked') === 'true'", arg=switch.element_handle())
    table = switch.locator("xpath=following::table[1]")
    return [name.strip() for name in table.locator("tr > th").all_inner_texts()]


def fit_run_names(page, max_extra_px: int = 500) -> None:
    """Widen the run-name column (dragging its header edge) until the longest shown name fits."""
    extra = page.evaluate("""() => Math.max(0, ...[...document.querySelectorAll('.ag-row %s %s')]
        .map(a => { const text = a.querySelector('span') || a; return text.scrollWidth - text.clientWidth; }))"""
                          % (RUN_NAME_CELL, RUN_LINK))
    if extra <= 0:
        return
    handle = page.locator(".ag-header-cell" + RUN_NAME_CELL + " .ag-header-cell-resize")
    handle.hover()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.down()
    page.mouse.move(x + min(extra + 24, max_extra_px), y, steps=10)
    page.mouse.up()


def set_columns(page, show: list[str] = (), hide: list[str] = ()) -> None:
    """Tick (``show``) or untick (``hide``) columns in the table's "Columns" menu, by exact name:
    metrics ("val/acc"), params, or attributes ("Dataset", "Source", "Models")."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    wanted = {**{name: False for name in hide}, **{name: True for name in show}}
    if not wanted:
        return
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    menu = page.get_by_role("dialog").filter(has=search)
    for name, on in wanted.items():
        search.fill(name)
        node = menu.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(rf"^{re.escape(name)}$"))
        try:
            node.wait_for(timeout=10_000)
        except PlaywrightTimeout:
            raise LookupError(f"no column {name!r} in the runs table's Columns menu") from None
        box = node.locator(".du-bois-light-tree-checkbox")
        if ("du-bois-light-tree-checkbox-checked" in (box.get_attribute("class") or "")) != on:
            box.click()
    search.fill("")
    page.keyboard.press("Escape")
    menu.wait_for(state="hidden")


def open_sweep_page(page, url: str, sweep: SweepRuns, show: list[str] = (), hide: list[str] = (),
                    timeout_ms: int = 30_000) -> list[ShownRun]:
    """The experiment's runs table with the sweep's parent expanded (and the ``show`` columns ticked,
    the ``hide`` ones unticked); returns the children shown below the parent."""
    open_runs_table(page, url, sweep.experiment_id)
    children = expand(page, sweep.parent_id, expected=len(sweep.children), timeout_ms=timeout_ms)
    set_columns(page, list(show), list(hide))
    fit_run_names(page)
    return children


def screenshot(page, path: Path, copy_to: Path | str | None = None) -> Path:
    """A full-page PNG at ``path`` (and a copy in the folder ``copy_to``, if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(copy_to) / path.name)
    return path
