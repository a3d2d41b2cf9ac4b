"""Run configs: every shipped config is valid; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from asymlora.cli import demo_config_path
from asymlora.config import ConfigError, RunConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [*sorted((ROOT / "configs").glob("multitask*.yaml")), demo_config_path()]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_multitask_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.data.tasks
    assert all(spec.startswith("bigbench:") for spec in cfg.data.tasks)
    for method in cfg.compare.methods or [cfg.adapter.method]:
        peft_cfg = cfg.adapter_for(method).to_peft([f"t{i}" for i in range(len(cfg.data.tasks))])
        assert peft_cfg.method == method
    assert load_config(None, _as_overrides(cfg)) == cfg  # the dump round-trips


def _as_overrides(cfg: RunConfig) -> list[str]:
    import yaml

    data = yaml.safe_load(dump_config(cfg))
    return [f"{section}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for section, values in data.items() if isinstance(values, dict) for k, v in values.items()] + [
        f"run_dir={cfg.run_dir}"
    ]  # fmt: skip


def test_the_paper_protocol_is_what_the_benchmark_config_says() -> None:
    cfg = load_config(ROOT / "configs" / "multitask_bigbench.yaml")
    assert 6 <= len(cfg.data.tasks) <= 8
    assert cfg.compare.methods == ["lora", "alora", "hydralora", "molora", "malora"]
    assert cfg.compare.single_task
    assert (cfg.adapter.r, cfg.adapter.lora_alpha, cfg.adapter.num_experts) == (8, 16, 3)


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["data.tasks=[bigbench:strategyqa]", "adapter.r=16", "train.lr=1e-4",
                             "adapter.target_modules=[q_proj,v_proj]", "data.max_test=null"])  # fmt: skip
    assert cfg.adapter.r == 16 and cfg.train.lr == 1e-4 and cfg.data.max_test is None
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.stepz=3", r"unknown config key 'train.stepz' \(did you mean 'steps'\?\).*valid keys"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("train.steps=abc", r"train.steps: expected int, got 'abc'"),
        ("train.steps=1.5", "train.steps: expected int"),
        ("adapter.router=hash", r"adapter.router='hash' is not allowed; choose one of"),
        ("adapter.method=foo", "method='foo'"),
        ("adapter.r=0", "r=0"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        ("train", "not of the form key=value"),
    ],
)
def test_bad_overrides_are_named(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.tasks=[bigbench:strategyqa]", override])


def test_missing_tasks_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tasks is empty"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_an_override_keeps_the_other_defaults_of_its_section() -> None:
    from asymlora.config import apply_overrides, from_dict
    from asymlora.recipes.init_similarity import InitSimilaritySettings

    settings = from_dict(InitSimilaritySettings, apply_overrides({}, ["train.steps=7"]))
    assert settings.train.steps == 7
    assert settings.train.warmup_steps == InitSimilaritySettings().train.warmup_steps == 5
