"""Every shipped config composes and validates; registries and conf/ groups stay in sync; config errors name keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from omegaconf import DictConfig

from artifacts.targets import BUILD_SPECULATIVE_METHODS
from build.config import BuildConfig, validate
from build.errors import ConfigError
from compile.registry import COMPILERS
from quantize.registry import QUANTIZERS

pytestmark = pytest.mark.unit
GROUPS = ("model", "quantize", "compile", "publish", "speculative")
CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_registries_match_conf_groups() -> None:
    from artifacts.store import STORES

    assert sorted(QUANTIZERS) == options("quantize")
    assert sorted(COMPILERS) == options("compile")
    assert sorted(STORES) == options("publish")
    # speculative=<method>: the methods a build records, plus none
    assert sorted(["none", *BUILD_SPECULATIVE_METHODS]) == options("speculative")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(hydra: None, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":
        overrides += ["model.source=/some/dir", "model.name=some-model"]
    if group == "publish" and option == "s3":
        overrides += ["publish.uri=s3://some-bucket/prefix"]
    if group == "speculative" and option == "draft_model":
        overrides += ["speculative.draft.source=/some/draft"]
    if group == "compile" and option == "neuron":  # compiles for the neuron engine only
        overrides += ["target.engine=neuron"]
    if group == "compile" and option == "tensorrt_llm":
        overrides += ["target.engine=tensorrt_llm"]
    cfg = compose(config_name="build", overrides=overrides)
    typed = validate(cfg)
    assert isinstance(typed, BuildConfig)


def test_defaults(hydra: None) -> None:
    typed = validate(compose(config_name="build"))
    assert (typed.model.source, typed.quantize.method, typed.compile.backend, typed.publish.store) == (
        "kiln:tiny",
        "none",
        "none",
        "local",
    )


def test_missing_required_key_named(hydra: None) -> None:
    cfg = compose(config_name="build", overrides=["model=hf"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "model.name" in str(err.value)
    assert "model.source" in str(err.value)
    with pytest.raises(ConfigError, match=r"publish\.uri"):
        validate(compose(config_name="build", overrides=["publish=s3"]))


def test_all_problems_reported_at_once(hydra: None) -> None:
    cfg: DictConfig = compose(
        config_name="build",
        overrides=[
            "model.dtype=int3",
            "convert.max_shard_size=lots",
            "model.synth.num_key_value_heads=3",
            "target.tensor_parallel_degree=0",
        ],
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for key in (
        "model.dtype",
        "convert.max_shard_size",
        "model.synth.num_key_value_heads",
        "target.tensor_parallel_degree",
    ):
        assert key in text


def _schema_of(group: str, option: str) -> type:
    from build.config import ModelConfig, PublishConfig, SpeculativeConfig

    return {
        "quantize": lambda: QUANTIZERS[option].config_cls,
        "compile": lambda: COMPILERS[option].config_cls,
        "model": lambda: ModelConfig,
        "publish": lambda: PublishConfig,
        "speculative": lambda: SpeculativeConfig,
    }[group]()


def _repeated_defaults(values: dict, schema: object, prefix: str) -> list[str]:  # type: ignore[type-arg]
    out = []
    for key, value in values.items():
        default = getattr(schema, key)
        if isinstance(value, dict):
            out += _repeated_defaults(value, default, f"{prefix}{key}.")
        elif value == default:
            out.append(f"{prefix}{key}={value!r}")
    return out


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_yaml_does_not_repeat_schema_defaults(group: str, option: str) -> None:
    """Each default is written once, in the dataclass schema: an option's YAML sets only what differs. (An option
    that extends another, like tiny_trained, is held against the defaults of its schema too.)"""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    assert isinstance(values, dict)
    values.pop("defaults", None)
    schema = _schema_of(group, option)()
    assert _repeated_defaults(values, schema, f"{group}.") == []


def test_build_yaml_only_picks_groups() -> None:
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(CONF / "build.yaml"), resolve=False)
    assert isinstance(values, dict)
    assert set(values) == {"defaults", "hydra"}  # every build key's default lives in BuildConfig
