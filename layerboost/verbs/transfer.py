"""`layerboost transfer`."""
from __future__ import annotations

from . import shows


@shows("model.name", "transfer.batches", "transfer.batch_size", "transfer.steps_per_batch", "transfer.lr",
       "transfer.rebuild", "attention.linear.window")
def transfer(cfg) -> None:
    """Train (or reuse) the bank of `linear` replacements and report its held-out quality."""
    from ..settings import workbench_settings

    import statistics
    import time

    from layerboost_core.transfer import transfer_errors
    from layerboost_core.workbench import open_workbench

    started = time.perf_counter()
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    meta = bench.bank.meta
    trained = meta.get("training", {}).get("linear", {}).get("seconds")
    print(f"bank {bench.bank.id}: {meta['path']}")
    print(f"model {bench.info['name']} ({bench.info['num_layers']} layers, fingerprint {bench.info['fingerprint']})")
    if trained is not None:
        print(f"trained in {trained:.0f} s" + ("" if time.perf_counter() - started > trained else " (earlier run)"))
    else:
        print("reused from cache")
    errors = transfer_errors(bench.switcher, bench.splits.heldout)
    print(f"held-out relative MSE of linear attention output: median {statistics.median(errors):.4f}, "
          f"max {max(errors):.4f} (layer {errors.index(max(errors))})")
