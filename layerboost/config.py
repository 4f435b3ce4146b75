"""Composing the Hydra config of a verb: where conf/ is, `model=<hub id or folder>`, one-line errors."""
from __future__ import annotations

from pathlib import Path

from layerboost_core.errors import UserError, did_you_mean


def conf_dir() -> Path:
    """conf/: shipped inside the wheel as the package `layerboost.conf`; the checkout's folder otherwise."""
    try:
        from importlib.resources import files

        return Path(str(files("layerboost.conf")))
    except ModuleNotFoundError:  # running from a checkout that was never installed
        return Path(__file__).resolve().parents[1] / "conf"


def group_choices(group: str) -> list[str]:
    from .schema import registered_choices

    return sorted({p.stem for p in (conf_dir() / group).glob("*.yaml")} | set(registered_choices(group)))


def config_groups() -> list[str]:
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def model_choices() -> list[str]:
    return [name for name in group_choices("model") if name != "custom"]


def _rewrite_model_override(overrides: list[str]) -> list[str]:
    """`model=<hub id or folder>` becomes the `custom` entry with that source; unknown short names fail."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "model" and sep and value not in model_choices():
            looks_like_source = (value.startswith("tiny:") or value.count("/") == 1 and not value.startswith(("/", ".", "~"))
                                 or Path(value).expanduser().exists())
            if not looks_like_source:
                raise UserError(f"model: unknown value {value!r}; {did_you_mean(value, model_choices())}, "
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

    from .schema import register

    register()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"argument: {item!r} is not key=value; see `layerboost <verb> --help`")
    overrides = _rewrite_model_override(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
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
