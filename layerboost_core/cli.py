"""`layerboost <verb> [overrides]`: every verb composes the same Hydra config (conf/) and calls one library
function. Bad input ends in one line naming the field and value, exit status 2, no traceback unless
`verbose=true`."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from .errors import UserError, did_you_mean

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
VERBS: dict[str, Callable] = {}


def verb(name: str):
    """Register a CLI verb: a function taking the composed config."""
    def decorator(fn):
        VERBS[name] = fn
        return fn
    return decorator


def _model_choices() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "custom")


def _rewrite_model_override(overrides: list[str]) -> list[str]:
    """`model=<hub id or folder>` becomes the `custom` entry with that source; unknown short names fail."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "model" and sep and value not in _model_choices():
            looks_like_source = value.startswith("tiny:") or value.count("/") == 1 and not value.startswith(("/", ".", "~")) or Path(value).expanduser().exists()
            if not looks_like_source:
                raise UserError(f"model: unknown value {value!r}; {did_you_mean(value, _model_choices())}, "
                                "or a hub id (org/name) or a local folder")
            out += ["model=custom", f"model.source={value}", f"model.name={value}"]
        else:
            out.append(item)
    return out


def compose(overrides: list[str]):
    """The config for `overrides`, with Hydra's composition errors turned into one-line UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = _rewrite_model_override(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"config: {_one_line(str(error)) or type(error).__name__}") from None


def _one_line(hydra_message: str) -> str:
    """Hydra's multi-line message as one line: the problem plus its hint (`+key=` to add a key, the
    available options of a group), without the config search path."""
    lines = [line.strip() for line in hydra_message.split("Config search path:")[0].splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{lines[0]}; {lines[1].rstrip(':')}: {', '.join(lines[2:])}"
    return "; ".join(line.rstrip(".") for line in lines)


def quiet_libraries() -> None:
    """Keep third-party chatter (download retries, weight-loading bars) out of our output."""
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "fsspec", "lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_libraries()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: layerboost <verb> [key=value ...]\nverbs: {', '.join(sorted(VERBS))}\nconfig: {CONF_DIR}")
        sys.exit(0 if argv else 2)
    name, overrides = argv[0], argv[1:]
    verbose = any(o in ("verbose=true", "verbose=True", "verbose=1") for o in overrides)
    try:
        if name not in VERBS:
            raise UserError(f"verb: unknown value {name!r}; {did_you_mean(name, VERBS)}")
        cfg = compose(overrides)
        _setup_logging(bool(cfg.verbose))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        VERBS[name](cfg)
    except UserError as error:
        if verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work is saved and the same command resumes it", file=sys.stderr)
        sys.exit(130)


def _load_verbs() -> None:
    """Import the modules that register verbs (kept lazy so `--help` is instant)."""
    from . import commands  # noqa: F401
    import layerboost_search.command  # noqa: F401
