"""The verbs of the `layerboost` CLI, each a thin call into the library."""
from __future__ import annotations

import statistics
import time

from .cli import verb
from .workbench import open_workbench


@verb("transfer")
def transfer_command(cfg) -> None:
    """Train (or reuse) the bank of `linear` replacements and report its held-out quality."""
    started = time.perf_counter()
    bench = open_workbench(cfg, with_bank=True)
    meta = bench.bank.meta
    trained = meta.get("training", {}).get("linear", {}).get("seconds")
    print(f"bank {bench.bank.id}: {meta['path']}")
    print(f"model {bench.info['name']} ({bench.info['num_layers']} layers, fingerprint {bench.info['fingerprint']})")
    if trained is not None:
        print(f"trained in {trained:.0f} s" + ("" if time.perf_counter() - started > trained else " (earlier run)"))
    else:
        print("reused from cache")
    from .transfer import transfer_errors

    errors = transfer_errors(bench.switcher, bench.splits.heldout)
    print(f"held-out relative MSE of linear attention output: median {statistics.median(errors):.4f}, "
          f"max {max(errors):.4f} (layer {errors.index(max(errors))})")
