"""The build's one addition to pyproject.toml: the bundled weights (``weights/``) and training recipes
(``recipes/``) live at the top of the repository, where the README's commands name them, and are copied into the
package as ``detect/_bundled/`` when a wheel is built, so ``pip install .`` (not only ``-e``) can run ``detect demo``
and the README's training commands. :mod:`detect.bundled` finds them in either place."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"weights": ("*.safetensors", "manifest.json", "README.md"), "recipes": ("*.yaml",)}


class BuildWithBundledFiles(build_py):
    def run(self) -> None:
        super().run()
        for folder, patterns in BUNDLED.items():
            target = Path(self.build_lib) / "detect" / "_bundled" / folder
            target.mkdir(parents=True, exist_ok=True)
            for pattern in patterns:
                for source in sorted((ROOT / folder).glob(pattern)):
                    shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildWithBundledFiles})
