"""transformers' internals stay in `ort_trainer/transformers_compat.py`, and the tested range is what is enforced."""

import ast
import importlib.metadata
import logging
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ort_trainer import ORTTrainer, ORTTrainingArguments, transformers_compat

from .tiny_models import tiny_model


PACKAGE = Path(transformers_compat.__file__).parent
# Private attributes of transformers objects that the package reads or writes.
PRIVATE_ATTRIBUTES = ("_attn_implementation",)


def _internals_used(path: Path) -> list:
    """Imports from transformers' submodules, private top-level names, and known private attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transformers."):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "transformers":
            found += [f"line {node.lineno}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("transformers.")]
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            root = node.value.value
            submodule = node.value.attr[:1].islower()  # transformers.<submodule>.<name>, not <Class>.<method>
            if isinstance(root, ast.Name) and root.id == "transformers" and submodule:
                found.append(f"line {node.lineno}: transformers.{node.value.attr}.{node.attr}")
    return found


def test_only_the_compat_module_touches_transformers_internals():
    modules = [path for path in PACKAGE.rglob("*.py") if path.name != "transformers_compat.py"]
    assert len(modules) > 5
    offenders = {str(path.relative_to(PACKAGE)): used for path in modules if (used := _internals_used(path))}
    assert offenders == {}


def test_the_check_sees_internals(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import transformers\nfrom transformers.cache_utils import DynamicLayer\n"
        "name = model.config._attn_implementation\ntransformers.utils.logging.set_verbosity_info()\n"
        "config = transformers.AutoConfig.from_pretrained(path)\n"
    )
    assert len(_internals_used(source)) == 3


def test_setup_pins_the_tested_range():
    requirements = [Requirement(line) for line in importlib.metadata.requires("ort_trainer")]
    (transformers,) = [requirement for requirement in requirements if requirement.name == "transformers"]
    assert transformers.specifier == Requirement(f"transformers{transformers_compat.TESTED_TRANSFORMERS}").specifier


def test_the_suite_runs_inside_the_tested_range():
    assert transformers_compat.untested_version_warning(importlib.metadata.version("transformers")) is None


@pytest.mark.parametrize("version", ["5.0.0", "9.0.0"])
def test_a_version_outside_the_range_is_named_in_a_warning(version):
    message = transformers_compat.untested_version_warning(version)
    assert message.startswith(
        f"ort_trainer was tested with transformers{transformers_compat.TESTED_TRANSFORMERS}; transformers {version} "
        "is installed."
    )


def test_the_trainer_warns_once_and_still_runs_outside_the_range(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(transformers_compat.importlib.metadata, "version", lambda name: "9.0.0")
    transformers_compat.warn_if_untested.cache_clear()
    args = ORTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], use_ort=False)
    try:
        with caplog.at_level(logging.WARNING, logger="ort_trainer"):
            ORTTrainer(model=tiny_model("bert"), args=args)
            ORTTrainer(model=tiny_model("bert"), args=args)
    finally:
        transformers_compat.warn_if_untested.cache_clear()
    warnings = [record.message for record in caplog.records if "transformers 9.0.0 is installed" in record.message]
    assert len(warnings) == 1
