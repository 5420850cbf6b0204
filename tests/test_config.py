"""The recipe parser: overriding frozen dataclasses from mappings, hand-written expectations, and the bundled
manifest's architecture configs, which must load and write back unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from detect import detectors
from detect.config import from_dict, override, to_json
from detect.detectors.sppnet import SPPNetConfig
from detect.errors import ConfigError

MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.json"


@dataclass(frozen=True)
class Inner:
    size: int = 3
    sides: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ConfigError(f"size must be >= 0, got {self.size}")


@dataclass(frozen=True)
class Outer:
    name: str = "a"
    ratio: float = 0.5
    inner: Inner = field(default_factory=lambda: Inner(size=7))
    maybe: Inner | None = None
    grid: tuple[tuple[int, int], ...] = ((0, 0),)


def test_override_replaces_only_the_given_fields() -> None:
    config = override(Outer(), {"ratio": 0.25, "inner": {"sides": [4, 5, 6]}, "grid": [[1, 2], [3, 4]]})
    assert config == Outer(ratio=0.25, inner=Inner(size=7, sides=(4, 5, 6)), grid=((1, 2), (3, 4)))
    assert isinstance(config.inner.sides, tuple) and isinstance(config.grid[0], tuple)  # YAML lists -> tuples


def test_optional_nested_field_starts_from_its_class_defaults() -> None:
    assert override(Outer(), {"maybe": {"size": 1}}).maybe == Inner(size=1, sides=(1, 2))
    assert override(Outer(maybe=Inner(size=2)), {"maybe": None}).maybe is None


def test_none_data_leaves_the_config() -> None:
    config = Outer(name="b")
    assert override(config, None) is config


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"nmae": "x"}, "unknown key 'nmae' in Outer"),
        ({"inner": {"sise": 1}}, "unknown key inner.'sise' in Inner"),
        ({"maybe": {"sides": [1], "extra": 0}}, "unknown key maybe.'extra' in Inner"),
        ({"inner": 3}, "inner must be a mapping, got 3"),
    ],
)
def test_bad_keys_are_named_by_their_dotted_path(data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        override(Outer(), data, "")


def test_a_prefix_names_where_the_mapping_came_from() -> None:
    with pytest.raises(ConfigError, match=r"unknown key detector_config\.inner\.'x'"):
        override(Outer(), {"inner": {"x": 1}}, "detector_config.")
    with pytest.raises(ConfigError, match="detector_config. must be a mapping, got list"):
        override(Outer(), [1], "detector_config.")


def test_the_dataclass_checks_still_run() -> None:
    with pytest.raises(ConfigError, match="size must be >= 0, got -1"):
        override(Outer(), {"inner": {"size": -1}})


def test_from_dict_starts_from_the_types_defaults_and_keeps_nested_defaults() -> None:
    """SPP-Net's own sampling default (per image, background from 0.1) survives a partial ``sampling`` mapping."""
    config = from_dict(SPPNetConfig, {"sampling": {"batch_size": 64}, "scales": [160]})
    assert config.scales == (160,)
    assert config.sampling.batch_size == 64
    assert config.sampling.per_image is True and config.sampling.bg_iou_low == 0.1
    assert from_dict(Outer, {}) == Outer()


def test_to_json_by_hand() -> None:
    expected = (
        '{"grid": [[0, 0]], "inner": {"sides": [1, 2], "size": 7}, "maybe": null, "name": "a", "ratio": 0.5}'
    )
    assert to_json(Outer()) == expected
    assert from_dict(Outer, json.loads(expected)) == Outer()


@pytest.mark.parametrize("name", sorted(json.loads(MANIFEST.read_text())["models"]))
def test_bundled_manifest_configs_load_and_write_back_unchanged(name: str) -> None:
    """Every stored field reads back with its stored value; fields added to a config since the manifest was
    written take their defaults (an older manifest stays loadable and means what it meant)."""
    architecture = json.loads(MANIFEST.read_text())["models"][name]["architecture"]
    config_type = type(detectors.entry(architecture["builder"]).default_config)
    config = from_dict(config_type, architecture["config"])
    written = json.loads(to_json(config))
    assert {k: written[k] for k in architecture["config"]} == architecture["config"]
    defaults = json.loads(to_json(config_type()))
    assert {k: v for k, v in written.items() if k not in architecture["config"]} == {
        k: defaults[k] for k in written if k not in architecture["config"]
    }


# --- YAML aliases (issue 21, item 9) ---------------------------------------------------------------------------------


def _laughs(levels: int) -> str:
    """Nine nested levels of ten aliases each: ~400 bytes that stand for 10^9 values."""
    names = "abcdefghijk"
    lines = ["a: &a [lol]"]
    for k in range(1, levels + 1):
        lines.append(f"{names[k]}: &{names[k]} [" + ",".join([f"*{names[k - 1]}"] * 10) + "]")
    return "\n".join(lines) + f"\nz: *{names[levels]}\n"


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    import time

    from detect.training import load_recipe

    text = _laughs(9)
    assert len(text) < 500
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    began = time.process_time()
    with pytest.raises(ConfigError, match="YAML aliases expand to"):
        load_recipe(path)
    assert time.process_time() - began < 1.0  # counted, not expanded (was seconds, x10 per level)


def test_yaml_aliases_of_normal_size_still_work() -> None:
    from detect.config import load_yaml

    document = load_yaml("base: &b {lr: 0.01, momentum: 0.9}\ncopy: *b\nlist: [*b, *b]\n")
    assert document["copy"] == {"lr": 0.01, "momentum": 0.9} and len(document["list"]) == 2
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("a: [unclosed", "x.yaml")
