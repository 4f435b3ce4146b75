"""`layerboost sensitivity`."""
from __future__ import annotations

from . import shows


@shows("model.name", "data.blocks.heldout", "output_dir")
def sensitivity(cfg) -> None:
    """Every (layer, option) swapped alone, scored against the original: sensitivity.csv + heatmap; cached."""
    from ..settings import workbench_settings

    import time
    from pathlib import Path

    from layerboost_core.sensitivity import cached_sensitivity, sensitivity_heatmap
    from layerboost_core.tables import write_csv
    from layerboost_core.workbench import open_workbench

    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    started = time.perf_counter()
    proxy = bench.proxy_evaluator()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(),
                              progress=bench.settings.progress)
    out = Path(cfg.output_dir) / "sensitivity" / f"{bench.info['name'].replace('/', '--')}-{bench.bank.id}"
    write_csv(out / "sensitivity.csv", rows)
    sensitivity_heatmap(rows, out / "sensitivity.html", title=f"{bench.info['name']}: KL to the original, one layer swapped")
    by = {(r["layer"], r["option"]): r for r in rows}
    options = sorted({r["option"] for r in rows})
    print("layer  " + "  ".join(f"{o + ' KL':>12}" for o in options))
    for layer in range(bench.switcher.num_layers):
        print(f"{layer:5d}  " + "  ".join(f"{by[(layer, o)]['kl']:12.4f}" for o in options))
    print(f"{len(rows)} swaps in {time.perf_counter() - started:.0f} s (including cache hits); written to {out}")
