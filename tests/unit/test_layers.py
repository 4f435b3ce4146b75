"""The house has floors: each package imports only those below it (core -> surrogates -> search -> app), the
core never reads the Hydra config, the CLI is a leaf, and every package ships in the wheel."""
from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["layerboost_core", "layerboost_surrogates", "layerboost_search", "layerboost"]  # bottom to top
CONFIG_READERS = ("omegaconf", "hydra")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, those inside functions included."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
    return found


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def sources():
    for layer in LAYERS:
        yield from sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    own = layer_of(path.relative_to(ROOT).parts[0])
    for line, module in imports_of(path):
        other = layer_of(module)
        assert other is None or other <= own, (
            f"{path.relative_to(ROOT)}:{line} imports {module}: {LAYERS[own]} may import only "
            f"{', '.join(LAYERS[:own + 1])}")


def test_the_import_checker_sees_violations(tmp_path):
    """The checker itself: an upward import inside a function is found (imports_of resolves relative ones)."""
    bad = ROOT / "layerboost_core" / "_layer_probe.py"
    bad.write_text("def f():\n    from layerboost_search import driver\n    from .plan import LayerPlan\n")
    try:
        found = imports_of(bad)
    finally:
        bad.unlink()
    assert (2, "layerboost_search") in found and (3, "layerboost_core.plan") in found


INFERENCE = ROOT / "layerboost_core" / "inference"
PORTABLE_TOPS = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", sorted(INFERENCE.glob("*.py")), ids=lambda p: p.name)
def test_inference_modules_are_portable(path):
    """Exported folders carry these files flat and run them without LayerBoost: each imports only torch,
    transformers, the standard library and sibling files (`from .sibling import ...`: one dot, a module name,
    which is also what transformers' own relative-import scan finds and copies)."""
    from transformers.dynamic_module_utils import get_relative_imports

    siblings = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module and (INFERENCE / f"{node.module}.py").is_file(), (
                f"{path.name}:{node.lineno} imports from {'.' * node.level}{node.module or ''}: only sibling "
                "modules of inference/ travel with it")
            siblings.add(node.module)
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.split(".")[0] in PORTABLE_TOPS, f"{path.name}:{node.lineno} imports {name}"
    assert siblings == set(get_relative_imports(str(path)))


def test_core_never_reads_the_hydra_config():
    for path in sorted((ROOT / "layerboost_core").rglob("*.py")):
        for line, module in imports_of(path):
            assert module.split(".")[0] not in CONFIG_READERS, f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_the_cli_is_a_leaf():
    for path in sources():
        if path.name == "__main__.py":
            continue
        for line, module in imports_of(path):
            assert module != "layerboost.cli", f"{path.relative_to(ROOT)}:{line} imports the CLI"


def test_every_package_ships_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for layer in LAYERS:
        for init in (ROOT / layer).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(ROOT).parts)
            assert package in listed, f"{package} is missing from [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"]["layerboost.conf"] == "conf"


def test_the_verb_table_names_real_functions():
    from layerboost.cli import VERBS, resolve

    for name in VERBS:
        assert callable(resolve(name)), name


def test_help_imports_no_heavy_library():
    """The CLI's module and `layerboost --help` stay instant: torch, transformers and the verbs load only when
    a verb runs."""
    import subprocess
    import sys

    probe = ("import sys; from layerboost.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('torch', 'transformers', 'optuna', 'ray', 'layerboost.verbs.search') if m in sys.modules]\n"
             "print('heavy:', heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout, out.stdout
