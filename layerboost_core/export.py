"""Export a plan as a model folder that plain transformers loads (`trust_remote_code=True`), healed or not.

The folder holds the weights under the hybrid model's own parameter names (the `linear` and `mixed<k>` layers'
learned tensors included, `none` layers' attention left out), `config.json` naming the remote classes (`auto_map`)
with the plan and its settings, the remote code (`modeling_layerboost.py` plus the project's `inference/`
modules it imports, verbatim: one source, no retyped twin), the tokenizer, `plan.json`, a model card, and
the manifest of content hashes that `load_hybrid` verifies. Written under a temporary name, then renamed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .attention import bank_option
from .cache_dir import atomic_dir
from .errors import UserError
from .hybrid_folder import HYBRID_FORMAT, MANIFEST, METRICS_FILE, PARTS_FILE, PLAN_FILE, _content, _sha256
from .patch import PlanSwitcher
from .plan import LayerPlan, load_plan

REMOTE_MODULE = "modeling_layerboost"
_HERE = Path(__file__).parent
CARD_FILE = "README.md"


def remote_files() -> dict[str, Path]:
    """Folder file name -> source of the code that travels into the folder: the remote model, the `inference/`
    modules it imports and whatever those import relatively (found as transformers will look for them: the
    folder is flat, so `from .x import` in any of them means `x.py` next to it)."""
    from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

    remote = _HERE / "remote_code" / f"{REMOTE_MODULE}.py"
    files = {remote.name: remote}
    for name in sorted(get_relative_imports(str(remote))):
        module = _HERE / "inference" / f"{name}.py"
        files[module.name] = module
        files.update({Path(f).name: Path(f) for f in get_relative_import_files(str(module))})
    return files


def export_plan(spec: str, model_info: dict, settings: dict) -> tuple[LayerPlan, dict]:
    """(plan, its plan JSON or {}) for `plan=<plan.json or SSLN...>` on the loaded model `model_info`.

    Refuses, with one UserError line, a plan made for another model (fingerprint or layer count) and a plan
    JSON whose option settings differ from those the export would run (its metrics would not apply).
    """
    plan = load_plan(spec, model_info)
    if not (spec.endswith(".json") or Path(spec).is_file()):
        return plan, {}
    data = json.loads(Path(spec).read_text())
    recorded = data.get("settings")
    if recorded is not None and _json(recorded) != _json(settings):
        raise UserError(f"plan: {spec!r} was measured with option settings {json.dumps(recorded, sort_keys=True)}, "
                        f"but the export would run {json.dumps(_json(settings), sort_keys=True)}")
    return plan, data


def export_hybrid(switcher: PlanSwitcher, plan: LayerPlan, tokenizer, out_dir, plan_context: dict,
                  metrics: dict | None = None, heal_key: str = "") -> Path:
    """Write the deployable folder for the model `switcher` holds running `plan` (its `linear` parts as now).

    `plan_context` goes into the plan JSON and the model card (model, settings, bank_id, metrics, workload,
    origin); `settings` (the option settings) is required. `metrics` (healing's before/after and curve) is
    written to `heal_metrics.json` when given. Returns the folder.
    """
    if "settings" not in plan_context:
        raise ValueError("plan_context needs the option settings ('settings')")
    plan.check_layers(switcher.num_layers)
    remote_class_names(switcher.model)  # an unexportable family is refused before anything is written
    out_dir = Path(out_dir)
    plan_json = _json(plan.to_json(**plan_context))
    with atomic_dir(out_dir) as tmp:
        _write_weights(tmp, switcher, plan)
        _write_config(tmp, switcher.model, plan, plan_json["settings"])
        for name, source in remote_files().items():
            shutil.copyfile(source, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(json.dumps(plan_json, indent=2) + "\n")
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        (tmp / CARD_FILE).write_text(model_card(plan, plan_json, metrics))
        _write_manifest(tmp, plan, plan_json["settings"], heal_key)
    return out_dir


def _json(value):
    """`value` as plain JSON data (tuples become lists, odd objects strings), as it will read back."""
    return json.loads(json.dumps(value, default=str))


def _write_weights(tmp: Path, switcher: PlanSwitcher, plan: LayerPlan) -> None:
    """model.safetensors with the plan in place (so the keys are the remote model's), and the learned parts
    alone in linear_parts.safetensors (the bank-shaped copy the project reads back as a bank: those of every
    layer that runs them, `linear` or `mixed<k>`)."""
    from safetensors.torch import save_file

    previous = switcher.plan
    switcher.apply(plan)
    try:
        switcher.model.save_pretrained(tmp)
    finally:
        switcher.apply(previous)
    parts = {f"layers.{i}.{name}": t.detach().cpu().contiguous()
             for i, option in enumerate(plan.layers) if bank_option(option) == "linear"
             for name, t in switcher.module(i, "linear").learned.state_dict().items()}
    save_file(parts, str(tmp / PARTS_FILE))  # no metadata: its key order is not stable, the bytes would vary


def remote_class_names(model) -> tuple[str, str]:
    """(config class, model class) names in modeling_layerboost.py for the family of `model`; a family its
    class table lacks is refused (one UserError line)."""
    from .remote_code.modeling_layerboost import CLASSES

    model_type = model.config.model_type
    if model_type not in CLASSES:
        raise UserError(f"model family: {model_type!r} cannot be exported (no remote classes in "
                        f"{REMOTE_MODULE}.py); exportable families: {', '.join(sorted(CLASSES))}")
    config_class, model_class = CLASSES[model_type]
    return config_class.__name__, model_class.__name__


def _write_config(tmp: Path, model, plan: LayerPlan, settings: dict) -> None:
    """config.json: the family's config under model_type `layerboost_<family>` (refused without
    trust_remote_code, never silently loaded as all-softmax), auto_map, the plan and its settings."""
    config = json.loads((tmp / "config.json").read_text())
    config_class, model_class = remote_class_names(model)
    config.update(model_type=f"layerboost_{config['model_type']}", architectures=[model_class],
                  auto_map={"AutoConfig": f"{REMOTE_MODULE}.{config_class}",
                            "AutoModelForCausalLM": f"{REMOTE_MODULE}.{model_class}"},
                  layerboost_plan=list(plan.layers), layerboost_settings=settings)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_manifest(tmp: Path, plan: LayerPlan, settings: dict, heal_key: str) -> None:
    files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": HYBRID_FORMAT, "plan": str(plan), "plan_id": plan.id, "settings": settings,
                "files": files, "content_hash": _content(str(plan), settings, files), "heal_key": heal_key,
                "torch": str(torch.__version__)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def model_card(plan: LayerPlan, plan_json: dict, heal_metrics: dict | None) -> str:
    """README.md of the folder: the plan, how it was measured, and how to load it."""
    model = plan_json.get("model") or {}
    name = model.get("name", "model")
    mixed = sorted(set(plan.layers) - {"softmax", "linear", "none"})
    counts = ", ".join(f"{plan.count(o)} {o}" for o in ("softmax", "linear", "none", *mixed))
    lines = [f"# {name}: LayerBoost hybrid {plan}", "",
             f"A LayerBoost hybrid of `{name}` (source `{model.get('source', '?')}`, fingerprint "
             f"`{model.get('fingerprint', '?')}`): per layer, attention is `softmax` (unchanged, full KV cache), "
             "`linear` (softmax over the first `sinks` and last `window` tokens plus linear attention with a "
             "learned Hedgehog feature map over the rest: sink + window KV and a constant-size state), `mixed<k>` "
             "(k KV heads per layer keep softmax over the whole context, the other heads are `linear`: the kept "
             "heads' KV plus their state) or `none` (removed: no cache).", "",
             f"Plan `{plan}` (id `{plan.id}`): {counts} of {len(plan)} layers. Bank `{plan_json.get('bank_id')}`; "
             f"{'healed' if heal_metrics else 'not healed'}.", "",
             "| layer | option |", "|---|---|", *(f"| {i} | {o} |" for i, o in enumerate(plan.layers)), "",
             f"Option settings: `{json.dumps(plan_json.get('settings'), sort_keys=True)}`", ""]
    lines += _metrics_section(plan_json.get("metrics") or {}, plan_json.get("workload"), heal_metrics)
    lines += ["## Load it", "", "Plain transformers, without LayerBoost installed:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained(folder)",
              "ids = tokenizer('Hello', return_tensors='pt').input_ids",
              "out = model.generate(ids, max_new_tokens=32)  # uses the hybrid LayerBoostCache by default", "```",
              "", "A cache of another kind (e.g. `DynamicCache`) and padded batches are refused: `linear` layers "
              "keep their own state and read no padding mask. With LayerBoost installed, "
              "`layerboost_core.load_hybrid(folder)` verifies the files against `layerboost_manifest.json` first.",
              ""]
    if plan_json.get("origin"):
        lines += [f"Origin: `{json.dumps(plan_json['origin'], sort_keys=True)}`", ""]
    return "\n".join(lines)


def _metrics_section(metrics: dict, workload, heal_metrics: dict | None) -> list[str]:
    """Measured quality and speed, one row per metric with its fidelity (never mixed)."""
    lines = ["## How it was measured", ""]
    if not metrics:
        lines += ["No measurements were recorded with this plan.", ""]
    else:
        lines += ["| metric | value | fidelity |", "|---|---|---|"]
        for key, entry in sorted(metrics.items()):
            entry = entry if isinstance(entry, dict) else {"value": entry}
            lines.append(f"| {key} | {_fmt(entry.get('value'))} | {entry.get('fidelity', '?')} |")
        lines.append("")
    if workload:
        lines += [f"Workload (latency and memory): `{json.dumps(workload, sort_keys=True)}`", ""]
    if heal_metrics and heal_metrics.get("before") and heal_metrics.get("after"):
        lines += ["Healing, held-out metrics before -> after:", "",
                  *(f"- {k}: {_fmt(v)} -> {_fmt(heal_metrics['after'].get(k))}"
                    for k, v in sorted(heal_metrics["before"].items())), ""]
    return lines


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
