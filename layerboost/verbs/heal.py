"""`layerboost heal`."""
from __future__ import annotations

from . import adopts_plan_file, shows


@adopts_plan_file
@shows("plan", "heal.tokens", "heal.lr", "heal.batch_size", "heal.lora.enabled", "heal.out", "output_dir")
def heal(cfg) -> None:
    """Distil `plan=` from the original model (KL of next-token distributions on train blocks) and save a
    hybrid model folder (<output_dir>/healed/<plan id>/ or heal.out); the same command resumes."""
    from ..settings import heal_settings, plan_spec, workbench_settings

    from pathlib import Path

    from layerboost_core.heal import heal_to_folder
    from layerboost_core.plan import load_plan
    from layerboost_core.workbench import attach_head_choices, open_workbench

    spec = plan_spec(cfg, "")
    workbench = workbench_settings(cfg)
    settings = heal_settings(cfg).for_blocks(workbench.data.seq_len)  # refused here, before any loading
    bench = open_workbench(workbench)
    plan = load_plan(spec, bench.info)  # a foreign plan is refused before any training
    attach_head_choices(bench, plan.layers)
    out = Path(cfg.heal.out) if cfg.heal.get("out") else Path(cfg.output_dir) / "healed" / plan.id
    heal_to_folder(bench, plan, settings, out, source=spec)
