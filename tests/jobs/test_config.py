import dataclasses

import pytest

from jobs.config import apply_overrides, from_dict, load_config, save_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    steps: int = 10
    opt: Inner = dataclasses.field(default_factory=Inner)
    extra: str | None = None


def test_overrides_nested_and_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nopt:\n  lr: 0.1\n")
    cfg = load_config(Outer, str(p), ["opt.lr=2e-4", "steps=7", "opt.betas=[0.8, 0.9]"])
    assert cfg.opt.lr == pytest.approx(2e-4) and cfg.steps == 7 and cfg.opt.betas == (0.8, 0.9)
    assert cfg.name == "a"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"config\.opt: unknown key\(s\) \['lrr'\]"):
        from_dict(Outer, {"opt": {"lrr": 1}})


def test_validation_error_surfaces():
    with pytest.raises(ValueError, match="lr must be > 0"):
        from_dict(Outer, apply_overrides({}, ["opt.lr=-1"]))


def test_bad_override_form():
    with pytest.raises(ValueError, match="not of the form"):
        apply_overrides({}, ["steps"])


def test_missing_file_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Outer, str(tmp_path / "nope.yaml"))


def test_save_roundtrip(tmp_path):
    cfg = from_dict(Outer, {"steps": 3, "opt": {"lr": 0.5}})
    url = save_config(cfg, str(tmp_path / "run"))
    assert load_config(Outer, url) == cfg


def test_override_and_value_errors_name_the_key(tmp_path):
    """A bad value is named by its key (not a TypeError from deep in validation); an unknown override is
    blamed on the override, not on the YAML file it is applied to."""
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nsteps: 3\n")
    with pytest.raises(ValueError, match=r"c.yaml.steps: 'abc' is not an integer"):
        load_config(Outer, str(path), ["steps=abc"])
    with pytest.raises(ValueError, match=r"override 'opt.lrr=1': opt has no key 'lrr'"):
        load_config(Outer, str(path), ["opt.lrr=1"])
    with pytest.raises(ValueError, match=r"c.yaml.name: 3 is not a string"):
        load_config(Outer, str(path), ["name=3"])
