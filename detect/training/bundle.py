"""``detect weights add``: a finished training run registered as weights (the run's model, its validation mAP and
the data it was measured on, its optimisation time and the recipe) in a weights folder's manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from detect import weights
from detect.config import load_yaml
from detect.errors import ConfigError, WeightsError

__all__ = ["bundle_run"]


def bundle_run(
    run: str | Path, name: str, directory: str | Path | None = None, recipe: str | Path | None = None
) -> "weights.WeightsEntry":
    """Register a finished training run as weights ``name`` in ``directory`` (e.g. the bundled ``weights/``).

    ``run`` is a run folder (``model.safetensors`` and ``summary.json`` written by :class:`Trainer`) or a
    ``model.safetensors`` in one. The manifest entry gets the run's validation mAP and the data it was measured
    on, its optimisation time and iteration count, and the recipe (the file's path and parsed contents) when given.
    """
    run = Path(run)
    model_path = run if run.suffix == ".safetensors" else run / "model.safetensors"
    summary_path = model_path.parent / "summary.json"
    model = weights.load_detector(model_path)
    _, _, config = weights.saved_architecture(model_path)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"{summary_path}: the run has no readable summary ({err}); did training finish?") from err
    recipe_entry: dict[str, Any] = {}
    if recipe is not None:
        recipe_path = Path(recipe)
        try:
            contents = load_yaml(recipe_path.read_text("utf-8"), f"recipe {recipe_path}")
            recipe_entry = {"path": recipe_path.as_posix(), "contents": contents}
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read recipe {recipe_path}: {err}") from err
    metrics = {
        "voc_map50": summary.get("mAP"),
        "iterations": summary.get("iterations"),
        "torch_threads": summary.get("torch_threads"),
        "eval_data": summary.get("val_data"),
    }
    directory = Path(directory) if directory is not None else weights.weights_dirs()[0]
    return weights.save_detector(
        model,
        directory / f"{name}.safetensors",
        name=name,
        config=config,
        recipe=recipe_entry,
        metrics=metrics,
        training_time_s=summary.get("train_seconds"),
        source="trained with detect train",
    )
