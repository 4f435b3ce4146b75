"""A healed hybrid model as one plain folder, and `load_hybrid` to get it back ready for generation or eval.

The folder holds the base model's Hugging Face weights and config (saved with the original attention in
place, so they load anywhere as a normal checkpoint), the tokenizer, the plan JSON (with its option
settings), the healed `linear` parts, `heal_metrics.json`, and a manifest: the sha256 of every file and a
content hash over plan, settings and those hashes. `load_hybrid` recomputes them and refuses a folder
changed since it was saved. The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_dir import atomic_dir, content_hash
from .errors import UserError
from .patch import PlanSwitcher
from .plan import LayerPlan

HYBRID_FORMAT = "layerboost.hybrid/v1"
MANIFEST = "layerboost_manifest.json"
PLAN_FILE = "plan.json"
PARTS_FILE = "linear_parts.safetensors"
METRICS_FILE = "heal_metrics.json"


@dataclass
class HybridModel:
    """A loaded hybrid: the model runs `plan` with the healed weights; `loaded` plugs into a Workbench.

    Generate with `generate` (or `model.generate(..., cache=HybridCache(model))`): `linear` layers keep their
    own state in the hybrid cache, a plain `DynamicCache` would be wrong for them.
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

    `plan_context` goes into the plan JSON (model, settings, bank_id, metrics, origin); `settings` (the
    option settings) is required: `load_hybrid` rebuilds the plan's modules from it.
    """
    from safetensors.torch import save_file

    if "settings" not in plan_context:
        raise ValueError("plan_context needs the option settings ('settings')")
    model = switcher.model
    path = Path(path)
    with atomic_dir(path) as tmp:
        switcher.restore()  # original attention in place: standard keys, no `learned` tensors
        try:
            model.save_pretrained(tmp)
        finally:
            switcher.apply(plan)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        parts = {f"layers.{i}.{name}": t.detach().cpu().contiguous()
                 for i, option in enumerate(plan.layers) if option == "linear"
                 for name, t in switcher.module(i, "linear").learned.state_dict().items()}
        save_file(parts, str(tmp / PARTS_FILE))  # no metadata: its key order is not stable, the bytes would vary
        plan_json = json.loads(json.dumps(plan.to_json(**plan_context), default=str))
        (tmp / PLAN_FILE).write_text(json.dumps(plan_json, indent=2) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        settings = plan_json["settings"]
        manifest = {"format": HYBRID_FORMAT, "plan": str(plan), "plan_id": plan.id, "settings": settings,
                    "files": files, "content_hash": _content(str(plan), settings, files), "heal_key": heal_key,
                    "torch": str(torch.__version__)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_folder(path: Path) -> tuple[dict, dict]:
    """(manifest, plan JSON) of the folder, after checking every listed file against its hash.

    Raises UserError naming the first file that changed, went missing, or a manifest that was edited.
    """
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    if manifest is None or manifest.get("format") != HYBRID_FORMAT:
        raise UserError(f"plan: {str(path)!r} is not a hybrid model folder (no readable {MANIFEST} of format "
                        f"{HYBRID_FORMAT})")
    files = manifest.get("files") or {}
    for name in (PLAN_FILE, PARTS_FILE):
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
    """The healed hybrid saved at `path`: model running its plan with the healed weights, and its tokenizer.

    The folder is verified first (see `verify_folder`); a folder whose plan, settings or weights changed
    since it was saved is refused with a UserError.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .families import family_of
    from .models import LoadedModel, fingerprint, resolve_device, resolve_dtype

    path = Path(path).expanduser()
    manifest, plan_json = verify_folder(path)
    plan = LayerPlan.from_json(plan_json)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    family_of(AutoConfig.from_pretrained(path))  # refuse an unsupported family before reading weights
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    switcher = PlanSwitcher(model, plan_json["settings"])
    plan.check_layers(switcher.num_layers)
    switcher.apply(plan)
    parts = load_file(str(path / PARTS_FILE))
    for index, option in enumerate(plan.layers):
        if option == "linear":
            prefix = f"layers.{index}."
            state = {k[len(prefix):]: v for k, v in parts.items() if k.startswith(prefix)}
            switcher.module(index, "linear").learned.load_state_dict(state)
    original = plan_json.get("model") or {}
    name = f"{original.get('name', path.name)}+healed"
    info = {"name": name, "source": str(path), "model_type": switcher.family.model_type,
            "num_layers": switcher.num_layers, "fingerprint": fingerprint(model), "original": original,
            "bank_id": plan_json.get("bank_id")}
    loaded = LoadedModel(model, tokenizer, name, str(path), torch_device, torch_dtype, info)
    return HybridModel(model, tokenizer, plan, switcher, loaded, plan_json, manifest)


def hybrid_workbench(cfg, path, with_splits: bool = True):
    """(Workbench, plan) for `plan=<hybrid folder>` in eval and bench: the healed model instead of model + bank.

    The workbench's switcher restores the healed base model (all-softmax) and applies the stored plan.
    """
    from omegaconf import OmegaConf

    from .data import make_splits
    from .workbench import Workbench

    hybrid = load_hybrid(path, str(cfg.device), str(cfg.dtype))
    splits = None
    if with_splits:
        if hybrid.tokenizer is None:
            raise UserError(f"plan: hybrid folder {str(path)!r} has no tokenizer; it cannot be evaluated on text")
        d = cfg.data
        splits = make_splits(hybrid.tokenizer, d.source, int(d.seq_len), OmegaConf.to_container(d.fractions),
                             OmegaConf.to_container(d.blocks), d.text_field)
    hybrid.switcher.restore()
    return Workbench(cfg, hybrid.loaded, splits, hybrid.switcher, None), hybrid.plan


def original_reference(cfg, bench, blocks: torch.Tensor):
    """A ProxyEvaluator of the hybrid's model against the ORIGINAL (unhealed) model it was made from.

    The healed base weights may differ from the original (merged LoRA), so the reference distributions come
    from the original, loaded from the source recorded in the plan JSON, and then the evaluator is pointed
    at the hybrid's model.
    """
    from .metrics import ProxyEvaluator
    from .models import load_model

    original = bench.info.get("original") or {}
    if not original.get("source"):
        raise UserError(f"plan: hybrid folder {bench.info['source']!r} does not record the model it was made from")
    reference = load_model(original["name"], original["source"], str(cfg.device), str(cfg.dtype))
    if original.get("fingerprint") and reference.info["fingerprint"] != original["fingerprint"]:
        raise UserError(f"plan: hybrid folder was made from {original['name']} with fingerprint "
                        f"{original['fingerprint']}, but {original['source']} now has fingerprint "
                        f"{reference.info['fingerprint']}")
    proxy = ProxyEvaluator(reference.model, blocks)
    proxy.model = bench.model
    del reference
    return proxy
