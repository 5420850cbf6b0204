"""Where the files the project ships live: the bundled weights and the training recipes.

In a source checkout (and an editable install) they are the repository's ``weights/`` and ``recipes/``; a wheel
(``pip install .``) carries copies under ``detect/_bundled/`` (``setup.py`` puts them there). A recipe named on the
command line that is not a file here, such as the README's ``recipes/faster_rcnn_shapes.yaml`` run outside a
checkout, is looked up by its file name among the shipped ones (:func:`recipe_path`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundled_dir", "recipe_path", "recipes_dir", "weights_dir"]

_PACKAGE = Path(__file__).resolve().parent


def bundled_dir(name: str) -> Path:
    """``weights`` or ``recipes``: the wheel's copy when installed from one, else the checkout's folder."""
    installed = _PACKAGE / "_bundled" / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def weights_dir() -> Path:
    return bundled_dir("weights")


def recipes_dir() -> Path:
    return bundled_dir("recipes")


def recipe_path(path: str | Path) -> Path:
    """``path`` when it is a file; else the shipped recipe of that file name (``recipes/x.yaml`` or ``x.yaml`` or
    ``x``) when there is one; else ``path`` unchanged (its reader then says it is missing)."""
    given = Path(path)
    if given.is_file():
        return given
    for name in (given.name, f"{given.name}.yaml"):
        shipped = recipes_dir() / name
        if shipped.is_file():
            return shipped
    return given
