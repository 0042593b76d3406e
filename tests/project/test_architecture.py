"""The layered house: packages import downward only (import-linter's contract in pyproject.toml),
and every ``_target_`` that conf/ and experiments/ name still resolves after a move."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_object

from tunelab.config.targets import refusal

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src)}, timeout=120)


def test_every_package_imports_only_the_layers_below_it():
    result = lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_the_contract_catches_an_engine_module_that_imports_a_cli(tmp_path):
    """Positive control: the same contract on a copy where the engine reaches up into a CLI,
    inside a function body, as the old code hid its cycles."""
    shutil.copytree(ROOT / "src" / "tunelab", tmp_path / "src" / "tunelab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    build = tmp_path / "src" / "tunelab" / "engine" / "build.py"
    build.write_text(build.read_text() + "\n\ndef _reaches_up():\n    from tunelab.cli.train import main\n\n    return main\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "tunelab.engine is not allowed to import tunelab.cli" in result.stdout
    assert "tunelab.engine.build -> tunelab.cli.train" in result.stdout


def _targets(node, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str) and "${" not in value:
                yield path, value
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{path}[{index}]")


def shipped_targets() -> list[tuple[str, str]]:
    found = []
    for folder in ("conf", "experiments"):
        for file in sorted((ROOT / folder).rglob("*.yaml")):
            for document in yaml.safe_load_all(file.read_text()):
                found += [(f"{file.relative_to(ROOT)}:{where}", target) for where, target in _targets(document)]
    return found


def test_the_scan_finds_the_targets_of_every_group():
    groups = {where.split("/")[1] for where, _ in shipped_targets() if where.startswith("conf/")}
    assert {"model", "data", "strategy", "optimizer", "scheduler", "trainer", "hydra"} <= groups


@pytest.mark.parametrize(("where", "target"), shipped_targets(), ids=lambda value: str(value))
def test_every_shipped_target_resolves(where, target):
    if target.startswith("hydra_plugins.hydra_ray_launcher") and importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher (the ray extra) is not installed")
    assert callable(get_object(target)), f"{where}: {target}"
    if not target.startswith(("hydra_plugins.", "hydra.")):  # Hydra builds its own plugins; tunelab builds the rest
        assert refusal(target, where) is None, f"{where}: the allow-list refuses {target}"


def test_every_mlflow_tag_name_is_written_in_one_module():
    """A ``"tunelab.<name>"`` string in the package is either a module path or a tag name from
    tunelab.tracking.tag_names, never a tag spelt out again elsewhere."""
    import ast

    from tunelab.tracking import tag_names

    known = {value for name, value in vars(tag_names).items() if name.isupper()}
    assert {"tunelab.config_hash", "tunelab.recipe_hash", "tunelab.best_run_id"} <= known
    spelt = []
    for file in sorted((ROOT / "src" / "tunelab").rglob("*.py")):
        if file.name == "tag_names.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                spelt.append(f"{file.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not spelt, "\n".join(spelt)
