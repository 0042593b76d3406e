#!/usr/bin/env python
"""Screenshot the MLflow UI showing the latest sweep: its parent run expanded, the trials below it.

    .venv/bin/tunelab-train -m debug=smoke optimizer.lr=1e-3,3e-4 strategy=full,linear_probe
    .venv/bin/python scripts/ui_screenshot.py --store outputs/mlflow.db     # -> docs/images/mlflow_sweep.png

Starts tunelab-ui on a free 127.0.0.1 port, opens the experiment of the most recent sweep in a headless
Chromium (/usr/bin/chromium, driven by the playwright package; nothing is downloaded), does what a
person does (Model training view, [+] on the sweep, a few metric columns) and writes the PNG.
The steps are tests/helpers/ui_browser.py's, which the browser test (tests/cli/test_ui_browser.py) uses as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the browser helpers live with the tests that use them

from helpers import ui_browser  # noqa: E402
from helpers.ui_server import start_ui  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="the mlflow.db a sweep logged to")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "mlflow_sweep.png",
                        help="PNG to write (default: docs/images/mlflow_sweep.png)")
    parser.add_argument("--experiment", default="tunelab", help="MLflow experiment name (default: tunelab)")
    parser.add_argument("--metrics", default="val/acc,test/acc,best/val/acc",
                        help="metric columns to show, comma-separated (default: %(default)s)")
    parser.add_argument("--hide", default="Dataset,Source,Models",
                        help="columns to hide, comma-separated (default: %(default)s; '' keeps MLflow's)")
    parser.add_argument("--width", type=int, default=1400, help="viewport width (default 1400)")
    parser.add_argument("--height", type=int, default=800, help="viewport height (default 800)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = ui_browser.missing_browser()
    if reason:
        sys.exit(f"ui_screenshot: {reason}")
    if not args.store.is_file():
        sys.exit(f"ui_screenshot: no MLflow store at {args.store}")
    try:
        sweep = ui_browser.latest_sweep(args.store, args.experiment)
    except LookupError as error:
        sys.exit(f"ui_screenshot: {error}")
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    with start_ui(args.store) as url, \
            ui_browser.browser_page({"width": args.width, "height": args.height}) as page:
        try:
            children = ui_browser.open_sweep_page(page, url, sweep, show=split(args.metrics), hide=split(args.hide))
        except LookupError as error:  # a --metrics/--hide name the Columns menu does not have
            sys.exit(f"ui_screenshot: {error}")
        if len(children) != len(sweep.children):
            print(f"warning: the page shows {len(children)} of the sweep's {len(sweep.children)} trials",
                  file=sys.stderr)
        out = ui_browser.screenshot(page, args.out)
    print(f"{out}: sweep {sweep.parent_name!r} with {len(children)} trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
