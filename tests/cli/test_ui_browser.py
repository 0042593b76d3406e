"""The MLflow UI as a person uses it after a sweep: a real 2x2 sweep, a real tunelab-ui, headless Chromium.

The person opens the link tunelab-train prints at the end of the sweep: MLflow's classic runs table
of the experiment (not MLflow 3's GenAI landing page), with the objective as a column. The sweep's
parent run is one row; its [+] shows the four trials nested below it. Ticking the trials and
pressing "Compare" lists their parameters side by side: only what the sweep varied differs, and no
folder or store location is among them (those are tags). The shared steps live in
tests/helpers/ui_browser.py (scripts/ui_screenshot.py uses them too).
"""

from __future__ import annotations

import os
import re
import time

import pytest

from conftest import run_cli
from helpers.runs import SMOKE_GRID
from helpers import ui_browser
from helpers.ui_server import start_ui
from tunelab.tracking.links import run_link
from tunelab.tracking.run_records import is_location

# What a sweep over optimizer.lr and strategy may vary: the two overrides (as config values, as
# sweep.* params and as the strategy's chosen file) and the strategy group's own settings.
VARIED = re.compile(r"^(optimizer\.lr|sweep\.optimizer\.lr|sweep\.strategy|choice\.strategy|strategy\..+)$")
LOCATION_WORDS = ("dirpath", "paths.", "_dir", "tracking_uri", "artifact_root", "output_dir")


@pytest.mark.slow
def test_the_printed_link_shows_the_sweep_nested_and_its_trials_compare_on_what_varied(tmp_path):
    reason = ui_browser.missing_browser()
    if reason:
        pytest.skip(reason)
    result = run_cli(tmp_path, *SMOKE_GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"
    sweep = ui_browser.latest_sweep(store)  # what the store holds, to check the page against
    assert len(sweep.children) == 4
    link = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", result.stdout)  # the link the person follows
    assert link and f"#/experiments/{sweep.experiment_id}/runs?" in link.group(1), result.stdout[-2000:]

    started = time.monotonic()
    with start_ui(store) as url, ui_browser.browser_page() as page:
        ui_browser.open_link(page, url, link.group(1))  # no clicks: the link alone reaches the runs table
        columns = ui_browser.shown_columns(page)
        assert "metrics.`val/acc`" in columns, f"the objective is not a column: {columns}"
        assert {"params.`sweep.optimizer.lr`", "params.`sweep.strategy`"} <= set(columns), columns
        page.get_by_role("link", name=sweep.parent_name, exact=True).wait_for()  # the sweep's name, as its own row
        assert sweep.parent_name.startswith("sweep ")
        rows = ui_browser.shown_runs(page)
        top_level = [r.name for r in rows if r.indent == min(row.indent for row in rows)]
        assert top_level == [sweep.parent_name], f"the trials must nest under the sweep, not sit beside it: {top_level}"

        children = ui_browser.expand(page, sweep.parent_id, expected=4)
        ui_browser.fit_run_names(page)
        shot = ui_browser.screenshot(page, tmp_path / "mlflow_sweep.png",
                                     copy_to=os.environ.get("TUNELAB_TEST_ARTIFACTS"))
        names = [child.name for child in children]
        assert len(children) == 4, f"expected the 4 trials nested below the parent, the page shows {names}"
        # a trial's name says what was swept, not what every trial shares (debug=smoke)
        assert all(re.fullmatch(r"#\d optimizer\.lr=\S+ strategy=\S+", name) for name in names), names
        assert {child.run_id for child in children} == set(sweep.children)
        assert sorted(names) == sorted(sweep.children.values())
        for child in children:  # each trial is a visible link to its run page
            link_to_run = page.get_by_role("link", name=child.name, exact=True)
            assert link_to_run.is_visible() and link_to_run.get_attribute("href").endswith(f"/runs/{child.run_id}")
        parent_indent = next(r.indent for r in ui_browser.shown_runs(page) if r.run_id == sweep.parent_id)
        assert all(child.indent > parent_indent for child in children), "trials are not nested (indented)"

        ui_browser.compare_runs(page, [child.run_id for child in children])
        listed = ui_browser.compared_params(page)
        assert len(listed) > 50 and "optimizer.lr" in listed and "choice.model" in listed, listed
        located = [p for p in listed if any(word in p for word in LOCATION_WORDS) or is_location(p, "")]
        assert not located, f"locations listed as parameters: {located}"
        differing = ui_browser.compared_params(page, diff_only=True)
        assert {"optimizer.lr", "sweep.strategy"} <= set(differing), differing
        assert all(VARIED.match(p) for p in differing), f"differ but were not varied: {differing}"

        # the end-of-run link of a single run: its run page
        child = children[0]
        page.goto(run_link(f"sqlite:///{store}", sweep.experiment_id, child.run_id).replace("http://127.0.0.1:5000", url))
        page.get_by_role("heading", name=child.name).wait_for()
    assert shot.stat().st_size > 10_000
    assert time.monotonic() - started < 150
