"""The installable package: what `pip install .` ships is every package in the tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in tool["package-dir"].items()}
    on_disk = set()
    for name, folder in {"visiondrop_edge": ROOT / "visiondrop_edge", **folders}.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            if "tests" not in relative:  # test folders are not part of the package
                on_disk.add(".".join((name, *relative)))
    assert on_disk == set(tool["packages"])


def test_the_console_script_is_the_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, _, attribute = project["scripts"]["visiondrop"].partition(":")
    import importlib

    from visiondrop_edge.cli import cli

    assert getattr(importlib.import_module(module), attribute) is cli
