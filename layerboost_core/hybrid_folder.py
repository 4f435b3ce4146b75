"""A hybrid model as one plain folder, and `load_hybrid` to get it back ready for generation or eval.

The folder (written by `export.export_hybrid`; `save_hybrid` is healing's call of it) is a model that plain
transformers loads with `trust_remote_code=True`: the weights under the hybrid model's own parameter names,
`config.json` with the plan, its settings and `auto_map`, the remote modeling code, the tokenizer, the plan
JSON, the `linear` parts alone, a model card, `heal_metrics.json` after healing, and a manifest: the sha256 of
every file and a content hash over plan, settings and those hashes. `load_hybrid` recomputes them and refuses
a folder changed since it was saved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_dir import content_hash
from .errors import UserError
from .patch import PlanSwitcher
from .plan import LayerPlan

HYBRID_FORMAT = "layerboost.hybrid/v2"  # v2: loadable by plain transformers
OLD_FORMATS = ("layerboost.hybrid/v1",)
MANIFEST = "layerboost_manifest.json"
PLAN_FILE = "plan.json"
PARTS_FILE = "linear_parts.safetensors"
METRICS_FILE = "heal_metrics.json"


@dataclass
class HybridModel:
    """A loaded hybrid: the model runs `plan` with the healed weights; `loaded` plugs into a Workbench.

    `model.generate(ids)` uses a `HybridCache` for the plan in place by default and refuses any other cache
    (`linear` layers keep their own state in it; a plain `DynamicCache` would be silently wrong).
    """

    model: torch.nn.Module
    tokenizer: object | None
    plan: LayerPlan
    switcher: PlanSwitcher
    loaded: object  # models.LoadedModel
    plan_json: dict
    manifest: dict

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Greedy generation with the hybrid cache; returns all token ids (prompt included)."""
        from .cache import hybrid_generate

        ids, _ = hybrid_generate(self.model, input_ids, max_new_tokens, self.plan, **kwargs)
        return ids


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content(plan: str, settings: dict, files: dict[str, str]) -> str:
    return content_hash(HYBRID_FORMAT, plan, settings, files)


def plan_is_folder(spec) -> bool:
    """True when `plan=` names a folder: it must then be a hybrid folder (`load_hybrid` refuses anything else)."""
    return spec is not None and Path(str(spec)).expanduser().is_dir()


def read_manifest(path: Path) -> dict | None:
    """The manifest of the folder at `path`, or None when there is none (not verified: see `verify_folder`)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def save_hybrid(path: Path, switcher: PlanSwitcher, plan: LayerPlan, tokenizer, plan_context: dict, metrics: dict,
                heal_key: str = "") -> Path:
    """Write the folder for the model `switcher` holds, running `plan` (its `linear` parts as they are now).

    Healing's writer: the same deployable folder as `export.export_hybrid`, plus `heal_metrics.json`.
    `plan_context` goes into the plan JSON (model, settings, bank_id, metrics, origin); `settings` is required.
    """
    from .export import export_hybrid

    return export_hybrid(switcher, plan, tokenizer, path, plan_context, metrics=metrics, heal_key=heal_key)


def verify_folder(path: Path) -> tuple[dict, dict]:
    """(manifest, plan JSON) of the folder, after checking every listed file against its hash.

    Raises UserError naming the first file that changed, went missing, or a manifest that was edited.
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("format") in OLD_FORMATS:
        raise UserError(f"plan: hybrid folder {str(path)!r} has the old format {manifest['format']} (plain "
                        f"transformers cannot load it); heal or export the plan again")
    if manifest is None or manifest.get("format") != HYBRID_FORMAT:
        raise UserError(f"plan: {str(path)!r} is not a hybrid model folder (no readable {MANIFEST} of format "
                        f"{HYBRID_FORMAT})")
    files = manifest.get("files") or {}
    for name in (PLAN_FILE, PARTS_FILE, "config.json"):
        if name not in files:
            raise UserError(f"plan: hybrid folder {str(path)!r} is refused: its manifest does not list {name}")
    for name, expected in files.items():
        target = path / name
        if not target.is_file():
            raise UserError(f"plan: hybrid folder {str(path)!r} is refused: {name} is missing")
        if _sha256(target) != expected:
            raise UserError(f"plan: hybrid folder {str(path)!r} is refused: {name} changed since it was saved "
                            "(manifest hash mismatch)")
    if manifest.get("content_hash") != _content(manifest.get("plan"), manifest.get("settings"), files):
        raise UserError(f"plan: hybrid folder {str(path)!r} is refused: {MANIFEST} was edited (content hash mismatch)")
    plan_json = json.loads((path / PLAN_FILE).read_text())
    if plan_json.get("plan") != manifest["plan"] or plan_json.get("settings") != manifest["settings"]:
        raise UserError(f"plan: hybrid folder {str(path)!r} is refused: {PLAN_FILE} disagrees with {MANIFEST}")
    return manifest, plan_json


def load_hybrid(path, device: str = "auto", dtype: str = "auto") -> HybridModel:
    """The hybrid saved at `path`: the family model patched with its plan and weights, and its tokenizer.

    The folder is verified first (see `verify_folder`); a folder whose plan, settings or weights changed
    since it was saved is refused with a UserError. The model is the project's own (a `PlanSwitcher` runs the
    plan, so eval and bench can switch plans on it); `model.generate(ids)` uses the hybrid cache by default.
    `none` layers' original attention is not in the folder: switched back to softmax, those layers are random.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import LoadedModel, fingerprint, resolve_device, resolve_dtype

    path = Path(path).expanduser()
    manifest, plan_json = verify_folder(path)
    plan = LayerPlan.from_json(plan_json)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = AutoModelForCausalLM.from_config(_family_config(path), dtype=torch_dtype)
    model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    switcher = PlanSwitcher(model, plan_json["settings"])
    plan.check_layers(switcher.num_layers)
    switcher.apply(plan)  # the plan in place: the model's keys are now those of the saved weights
    _load_weights(path, model)
    use_hybrid_cache_by_default(model)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    original = plan_json.get("model") or {}
    name = f"{original.get('name', path.name)}+healed"
    info = {"name": name, "source": str(path), "model_type": switcher.family.model_type,
            "num_layers": switcher.num_layers, "fingerprint": fingerprint(model), "original": original,
            "bank_id": plan_json.get("bank_id")}
    loaded = LoadedModel(model, tokenizer, name, str(path), torch_device, torch_dtype, info)
    return HybridModel(model, tokenizer, plan, switcher, loaded, plan_json, manifest)


def _family_config(path: Path):
    """The folder's config.json as the family's own config (model_type without `layerboost_`, no plan)."""
    from transformers import AutoConfig

    from .families import family_of

    fields = json.loads((path / "config.json").read_text())
    model_type = str(fields.pop("model_type", "")).removeprefix("layerboost_")
    for key in ("auto_map", "architectures", "layerboost_plan", "layerboost_settings", "transformers_version"):
        fields.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ValueError:
        raise UserError(f"plan: hybrid folder {str(path)!r} has config model_type {model_type!r}, not a "
                        "supported family") from None
    family_of(config)  # refuse an unsupported family before building the model
    return config


def _load_weights(path: Path, model) -> None:
    """Load the folder's weights (single file or shards) into `model`, whose plan is in place; every key must
    match, except the output embedding when it is tied to the input one."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(path.glob("model*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.lm_head.weight is model.get_input_embeddings().weight else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"plan: hybrid folder {str(path)!r} does not match its plan: missing weights "
                        f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


def use_hybrid_cache_by_default(model) -> None:
    """Make `model.generate` build a `HybridCache` for the plan in place when given no cache, and refuse a
    cache of another kind or for another plan (the transformers hook `_prepare_cache_for_generation`)."""
    from .cache import HybridCache, applied_plan

    def prepare(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        cache = model_kwargs.get("cache")
        if cache is None:
            if generation_config.use_cache is not False:
                model_kwargs["cache"] = HybridCache(model)
            return
        if not isinstance(cache, HybridCache) or cache.plan != applied_plan(model):
            raise UserError(f"cache: the model runs plan {applied_plan(model)} and needs HybridCache(model), "
                            f"not {type(cache).__name__}" + (f" for {cache.plan}" if isinstance(cache, HybridCache)
                                                             else ""))
        cache._is_user_defined = True  # as generate marks a user's cache: it is returned

    model._prepare_cache_for_generation = prepare


