"""Do the change assessment's 95% intervals hold their coverage? Measured by redrawing its sample 200 times.

Usage: python bench/change_coverage.py --workspace WS [--run default-2018-to-default-2024] [--replicates 200]

WS holds a change run of the demo cities at two vintages made with the default model (bench/change.py --keep, or:
`demo-data --vintages 2018,2024`, `map --vintage 2018`, `map --vintage 2024`, `change --before default-2018 --after
default-2024`). The census is both dates' reference polygons rasterised on each change grid; each replicate draws
the assessment's stratified sample with a new seed, labels it from the references and estimates as `change` does
(engine.accuracy.change.change_coverage). Acceptance (issue 22): the area of each true change class is covered at
least 90% of the time.

Writes bench/results/change_coverage.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402

console = Console(width=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--run", default="default-2018-to-default-2024")
    parser.add_argument("--replicates", type=int, default=200)
    args = parser.parse_args()

    from engine.accuracy.change import ChangeAssessConfig, change_coverage
    from engine.catalog import find_catalog, load_catalog
    from engine.pipelines.change import dated_rows
    from engine.workspace import Workspace

    ws = Workspace.at(args.workspace)
    products = ws.products(args.run)
    run = json.loads((products / "run.json").read_text())
    before, after = run["vintages"]
    catalog = load_catalog(find_catalog(ws))
    rows_b = {r["city"]: r for r in dated_rows(catalog, ws, before)}
    rows_a = {r["city"]: r for r in dated_rows(catalog, ws, after)}
    cities = [{"city": c, "region": rows_b[c]["region"], "reference_before": rows_b[c]["reference"],
               "reference_after": rows_a[c]["reference"], "imagery_before": rows_b[c]["imagery"], "imagery_after": rows_a[c]["imagery"]}
              for c in sorted(rows_b) if c in rows_a and (products / "cities" / c / "change.tif").is_file()]
    cfg = ChangeAssessConfig()
    doc = change_coverage(products, cities, cfg, replicates=args.replicates)

    view = Table(title=f"change assessment: coverage of the 95% intervals over {doc['replicates']} samples of n={doc['n_total']} "
                       f"({len(cities)} cities)")
    for column in ("quantity", "class", "census", "mean estimate", "relative bias", "coverage", "mean CI width"):
        view.add_column(column, justify="left" if column in ("quantity", "class") else "right")
    for quantity, by_class in doc["national"].items():
        for name, entry in by_class.items():
            scale = 1e-4 if quantity == "area" else 1.0
            fmt = "{:,.2f}" if quantity == "area" else "{:.3f}"
            view.add_row(quantity, name, fmt.format(entry["census"] * scale) if entry["census"] is not None else "",
                         fmt.format(entry["mean_estimate"] * scale) if entry["mean_estimate"] is not None else "",
                         f"{entry['relative_bias']:+.3f}" if entry["relative_bias"] is not None else "",
                         f"{entry['coverage']:.3f}" if entry["coverage"] is not None else "",
                         fmt.format(entry["mean_ci_width"] * scale) if entry["mean_ci_width"] is not None else "")
    console.print(view)
    area = doc["national"]["area"]
    held = {name: entry["coverage"] for name, entry in area.items()}
    console.print(f"area coverage by class: {held}; target >= 0.90 each; zero-width intervals: {doc['zero_width_intervals']}")
    path = write_results("change_coverage", {"area_coverage": held, "target": 0.9, "replicates": doc["replicates"],
                                             "n_total": doc["n_total"], "cities": len(cities)},
                         {"coverage": doc, "note": "demo cities at 2018 and 2024, default model (tiny, 3 epochs); census from both dates' references"})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
