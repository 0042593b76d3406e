"""The MLflow UI as a person uses it after a sweep: a real 2x2 sweep, a real tunelab-ui, headless Chromium.

The person opens the link tunelab-train prints (``#/experiments/ID``), switches MLflow 3's landing page
from "GenAI" to "Model training", finds the sweep's parent run and clicks its [+]: the four trials
show up nested below it. The shared steps live in tunelab.ui_browser (scripts/ui_screenshot.py uses
them too).
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import run_cli
from test_sweeps import SMOKE_GRID
from tunelab import ui_browser


@pytest.mark.slow
def test_sweep_shows_as_a_parent_with_its_trials_nested(tmp_path):
    reason = ui_browser.missing_browser()
    if reason:
        pytest.skip(reason)
    result = run_cli(tmp_path, *SMOKE_GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"
    sweep = ui_browser.latest_sweep(store)  # what the store holds, to check the page against
    assert len(sweep.children) == 4
    assert f"#/experiments/{sweep.experiment_id}" in result.stdout  # the link the person follows

    started = time.monotonic()
    with ui_browser.start_ui(store) as url, ui_browser.browser_page() as page:
        ui_browser.open_runs_table(page, url, sweep.experiment_id)
        parent_link = page.get_by_role("link", name=sweep.parent_name, exact=True)
        parent_link.wait_for()  # the sweep's name, as its own row
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
        assert all("optimizer.lr=" in name and "strategy=" in name for name in names), names
        assert {child.run_id for child in children} == set(sweep.children)
        assert sorted(names) == sorted(sweep.children.values())
        for child in children:  # each trial is a visible link to its run page
            link = page.get_by_role("link", name=child.name, exact=True)
            assert link.is_visible() and link.get_attribute("href").endswith(f"/runs/{child.run_id}")
        parent_indent = next(r.indent for r in ui_browser.shown_runs(page) if r.run_id == sweep.parent_id)
        assert all(child.indent > parent_indent for child in children), "trials are not nested (indented)"
    assert shot.stat().st_size > 10_000
    assert time.monotonic() - started < 90
