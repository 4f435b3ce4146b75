"""`layerboost export`."""
from __future__ import annotations

from . import adopts_plan_file, shows


@adopts_plan_file
@shows("plan", "out", "model.name", "output_dir")
def export(cfg) -> None:
    """A plan straight from the search (bank weights, no healing) as a model folder that plain transformers
    loads: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; `out=` names the folder
    (default <output_dir>/exported/<plan id>). A plan made for another model is refused."""
    from pathlib import Path

    from ..settings import plan_spec, workbench_settings

    from layerboost_core.errors import UserError
    from layerboost_core.export import export_hybrid, export_plan
    from layerboost_core.transfer import bank_id
    from layerboost_core.plan import load_plan
    from layerboost_core.workbench import attach_bank, attach_head_choices, bank_id_or_none, needs_bank, open_workbench

    spec = plan_spec(cfg, "")
    bench = open_workbench(workbench_settings(cfg))
    attach_head_choices(bench, load_plan(spec, bench.info).layers)  # a mixed layer's kept heads, as searched
    plan, plan_json = export_plan(spec, bench.info, bench.settings.options)  # refused before any training
    if needs_bank(plan.layers):
        expected, here = plan_json.get("bank_id"), bank_id(bench.info, bench.splits.hashes["train"],
                                                           bench.settings.options, bench.settings.transfer)
        if expected not in (None, "none", here):  # checked before any training: the ids are hashes of settings
            raise UserError(f"plan: {spec!r} was measured with bank {expected}; this export would use bank {here} "
                            "(other data, workload or transfer settings, and the file does not record its own): "
                            "pass the search's own overrides")
        attach_bank(bench)
    bench.switcher.apply(plan)
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.output_dir) / "exported" / plan.id
    context = {"model": bench.info, "settings": bench.settings.options, "bank_id": bank_id_or_none(bench),
               "metrics": plan_json.get("metrics") or {}, "workload": plan_json.get("workload"),
               "made_with": bench.settings.record(),
               "origin": {"exported_by": "layerboost export", "source": spec, **(plan_json.get("origin") or {})}}
    export_hybrid(bench.switcher, plan, bench.loaded.tokenizer, out, context)
    print(f"plan {plan} (id {plan.id}) of {bench.info['name']} exported to {out}")
    print(f"load it anywhere with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
