"""Recipes resolve, overrides apply, bad input gives the errors a user relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from waveforge import config
from waveforge.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", config.available_recipes())
def test_every_recipe_resolves(name: str) -> None:
    cfg = config.load(name)
    assert cfg.recipe == name
    # the saved form reloads to the same recipe
    assert config.from_dict(config.to_dict(cfg, mask_secrets=False)) == cfg


def test_expected_recipes_exist() -> None:
    want = {"tiny", "cifar10", "stl10", "celebahq256", "celebahq512", "celebahq1024", "ffhq1024", "lsun_church256"}
    assert want <= set(config.available_recipes())


def test_base_inheritance() -> None:
    ffhq, celeba = config.load("ffhq1024"), config.load("celebahq1024")
    assert ffhq.model == celeba.model and ffhq.diffusion == celeba.diffusion
    assert ffhq.train.total_images != celeba.train.total_images


def test_overrides_and_aliases_apply() -> None:
    cfg = config.load("tiny", ["train.lr_g=1e-4", "nodes=3", "time=2-00:00:00", "model.ch_mult=[1,1,2]",
                               "partition=gpu", "train.max_steps=7", "dist.precision=bf16"])
    assert cfg.train.lr_g == 1e-4 and isinstance(cfg.train.lr_g, float)
    assert cfg.cluster.nodes == 3 and cfg.cluster.partition == "gpu"
    assert cfg.cluster.time == "2-00:00:00"  # not YAML 1.1 sexagesimal
    assert cfg.model.ch_mult == [1, 1, 2]
    assert cfg.train.max_steps == 7 and cfg.dist.precision == "bf16"


def test_time_formats() -> None:
    assert config.time_limit_minutes("24:00:00") == 24 * 60
    assert config.time_limit_minutes("90") == 90
    assert config.time_limit_minutes("1-12") == 36 * 60
    with pytest.raises(ConfigError, match="cluster.time"):
        config.load("tiny", ["time=soon"])


def test_unknown_key_names_closest() -> None:
    with pytest.raises(ConfigError) as e:
        config.load("tiny", ["trian.lr_g=1"])
    assert "trian.lr_g" in str(e.value) and "train.lr_g" in str(e.value)
    with pytest.raises(ConfigError, match="train.r1_gamma"):
        config.load("tiny", ["r1_gamma=1"])


def test_wrong_type_and_range_name_key_value_allowed() -> None:
    with pytest.raises(ConfigError) as e:
        config.load("tiny", ["train.batch_size=many"])
    assert "train.batch_size" in str(e.value) and "'many'" in str(e.value) and "integer" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.load("tiny", ["dist.zero_stage_d=3"])
    assert "dist.zero_stage_d=3" in str(e.value) and "ZeRO-3" in str(e.value)
    with pytest.raises(ConfigError, match="one of 'fp32', 'bf16', 'fp16'"):
        config.load("tiny", ["dist.precision=fp8"])
    with pytest.raises(ConfigError, match="model.resolution"):
        config.load("tiny", ["model.resolution=48"])


@pytest.mark.parametrize("key", sorted(config.field_rules()))
def test_each_field_is_validated_by_itself_and_named(key: str) -> None:
    """A value that breaks a field's own rule is reported under that field's key, whatever the other fields
    are (the error used to name another key of the same check)."""
    rule = config.field_rules()[key]
    with pytest.raises(ConfigError) as e:
        config.load("tiny", {key: rule.bad})
    text = str(e.value)
    assert text.startswith(f"{key}=") and text.endswith(f" is out of range: {rule.allowed}"), text


def test_cross_field_rules_name_the_constrained_field() -> None:
    for overrides, key in ((["diffusion.beta_min=30"], "diffusion.beta_min=30.0"),
                           (["train.lr_min=0.5"], "train.lr_min=0.5"),
                           (["model.ch_mult=[1,1,1,1,1,1,1]"], "model.ch_mult="),
                           (["model.d_layers=9"], "model.d_layers=9"),
                           (["sampler.noise_filter=pds"], "sampler.noise_filter='pds'"),
                           (["gpus_per_node=0", "tasks_per_node=0"], "cluster.gpus_per_node=0")):
        with pytest.raises(ConfigError) as e:
            config.load("tiny", overrides)
        assert str(e.value).startswith(key), (overrides, str(e.value))


def test_unknown_recipe_lists_available() -> None:
    with pytest.raises(ConfigError) as e:
        config.load("tinyy")
    assert "tiny" in str(e.value) and "celebahq256" in str(e.value)


def test_batch_must_split_over_ranks() -> None:
    cfg = config.load("tiny", ["batch=16"])
    config.check_resources(cfg, world=4)
    assert config.micro_batch(cfg, world=4) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        config.check_resources(cfg, world=3)
    accum = config.load("tiny", ["batch=16", "dist.grad_accum=2"])
    config.check_resources(accum, world=4)
    assert config.micro_batch(accum, world=4) == 2  # micro-batch = batch / (ranks x grad_accum)
    with pytest.raises(ConfigError, match="dist.grad_accum=0 is out of range"):
        config.load("tiny", ["dist.grad_accum=0"])
    legacy = config.to_dict(cfg)  # recipes saved when grad_accum 0 meant 1 still load (and resume)
    legacy["dist"]["grad_accum"] = 0
    assert config.from_dict(legacy).dist.grad_accum == 1


def test_secrets_never_printed_or_saved(tmp_path: Path) -> None:
    cfg = config.load("tiny", ["storage.secret_key=hunter2-very-secret", "storage.access_key=AKIAEXAMPLE"])
    for secret in ("hunter2", "AKIAEXAMPLE"):
        assert secret not in config.to_yaml(cfg)
        assert secret not in str(config.flat(cfg))
    config.save(cfg, tmp_path / "recipe.yaml")
    assert "hunter2" not in (tmp_path / "recipe.yaml").read_text()
    assert "AKIAEXAMPLE" not in (tmp_path / "recipe.yaml").read_text()
    back = config.load_saved(tmp_path / "recipe.yaml")
    assert back.storage.secret_key == back.storage.access_key == ""


def test_training_hash_ignores_operational_fields() -> None:
    a = config.load("tiny")
    b = config.load("tiny", ["nodes=4", "run.name=x", "eval.every_images=5", "train.max_steps=3"])
    c = config.load("tiny", ["train.lr_g=1e-3"])
    assert config.training_hash(a) == config.training_hash(b) != config.training_hash(c)
    assert config.diff_training_fields(a, c) == ["train.lr_g: 0.0008 -> 0.001"]


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_print_config_and_errors() -> None:
    r = _job("jobs/train.py", "recipe=tiny", "train.lr_g=1e-4", "--print-config")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["lr_g"] == 1e-4
    r = _job("jobs/train.py", "recipe=tiny", "trian.lr_g=1")
    assert r.returncode == 2 and "train.lr_g" in r.stderr
    for bad, key in (("train.grad_clip=-1", "train.grad_clip=-1.0"), ("eval.grid_size=0", "eval.grid_size=0")):
        r = _job("jobs/train.py", "recipe=tiny", bad)  # each names its own key (not a neighbour's), one line
        assert r.returncode == 2 and r.stderr.startswith(f"error: {key} is out of range"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _job("jobs/train.py", "recipe=nope")
    assert r.returncode == 2 and "Available recipes" in r.stderr
    r = _job("jobs/train.py", "recipe=tiny", "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr
