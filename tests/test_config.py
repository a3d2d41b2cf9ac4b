"""Run configs: every shipped config is valid; bad keys and values are named."""

from __future__ import annotations

import argparse
import re
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
        (
            "train.lr=nan",
            r"train.lr=nan must be a finite number > 0",
        ),  # the shared check: multi-task runs too
        ("train.weight_decay=-0.1", r"train.weight_decay=-0.1 must be a finite number >= 0"),
        ("train.max_grad_norm=inf", r"train.max_grad_norm=inf must be a finite number >= 0"),
        ("train", "not of the form key=value"),
        # an empty key raised IndexError out of the error message itself (a traceback, exit 1); an empty part
        # gave "unknown config key 'train' (did you mean 'train'?)"
        ("=3", r"override '=3': the key '' has an empty name; write key=value or section.key=value"),
        (" =3", r"override ' =3': the key '' has an empty name"),
        (".steps=3", r"override '.steps=3': the key '.steps' has an empty name"),
        ("train..lr=1", r"override 'train..lr=1': the key 'train..lr' has an empty name"),
        ("train.=1", r"override 'train.=1': the key 'train.' has an empty name"),
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


# --- one config tree, one loader (OmegaConf structured configs) ------------------------------------------
def test_sweep_cell_ids_are_those_computed_before_the_sections_were_shared() -> None:
    """The ledger keys finished cells by id: the ids below were computed on the code before the config
    tree was shared (config.py and federated/config.py with separate classes, no OmegaConf), then moved once
    on purpose (session 11) for configs whose ``train.save_every`` is not the default (multitask_bigbench.yaml
    has 100): `sweep.BOOKKEEPING_KEYS` are held at their defaults in a cell's identity. A ledger written
    before keeps its finished cells done through `sweep.done_ids`; the campaign's ids did not move."""
    from asymlora.recipes.sweep import cell_id, expand, load_sweep

    cells = expand(load_sweep(ROOT / "configs" / "sweep_multitask.yaml"))
    assert len(cells) == 45
    assert [c.id for c in cells[:3]] == ["b0ef0bb952f9", "cd2e3dbc28a6", "b84311a1add3"]
    assert cells[-1].id == "ed7d0151a1e9"
    # from the defaults (adapter.lora_alpha unset: the declared 16, not OmegaConf's 16.0)
    assert cell_id(load_config(None, ["data.tasks=[bigbench:strategyqa]"])) == "2f07f08ee83a"
    bench = load_config(ROOT / "configs" / "multitask_bigbench.yaml", ["compare.methods=[]", "compare.single_task=false",
                        "train.epochs=2", "data.metric={strategyqa: exact_match}"])  # fmt: skip
    assert cell_id(bench) == "1f98d7c4cfcd"


def test_federated_sections_extend_the_shared_ones_and_keep_their_keys() -> None:
    import dataclasses

    from asymlora import config as shared
    from asymlora.federated import config as fed

    for name, base in [("ModelSettings", shared.BaseModelSettings), ("AdapterSettings", shared.BaseAdapterSettings),
                       ("TrainSettings", shared.BaseTrainSettings), ("EvalSettings", shared.BaseEvalSettings),
                       ("DataSettings", shared.DataSettings)]:  # fmt: skip
        assert issubclass(getattr(fed, name), base) and issubclass(getattr(shared, name), base), name
    keys = {section: sorted(f.name for f in dataclasses.fields(getattr(fed, cls)))
            for section, cls in [("model", "ModelSettings"), ("adapter", "AdapterSettings"),
                                 ("train", "TrainSettings"), ("eval", "EvalSettings")]}  # fmt: skip
    assert keys == {  # the federated keys (+ the shared mixed_precision): no multi-task key leaks in
        "model": ["name"],
        "adapter": ["intermediate_rank", "lora_alpha", "lora_dropout", "method", "r", "target_modules"],
        "train": ["batch_size", "local_steps", "lr", "max_grad_norm", "mixed_precision", "weight_decay"],
        "eval": ["batch_size", "global_scores", "local_only", "max_examples", "max_new_tokens"],
    }
    cfg = fed.FedConfig()
    assert (cfg.adapter.method, cfg.adapter.target_modules, cfg.eval.max_new_tokens) == (
        "lora",
        ["q_proj", "v_proj"],
        16,
    )
    assert (cfg.data.max_test, cfg.data.max_length, cfg.train.local_steps) == (200, 192, 10)
    assert list(cfg.to_dict()["train"]) == [
        "local_steps",
        "batch_size",
        "lr",
        "weight_decay",
        "max_grad_norm",
        "mixed_precision",
    ]
    run = RunConfig()
    assert (run.adapter.method, run.adapter.target_modules, run.eval.max_new_tokens) == (
        "alora",
        ["q_proj", "o_proj"],
        24,
    )
    assert list(run.to_dict()["train"])[:3] == ["steps", "epochs", "batch_size"]


def test_one_adapter_builder_for_both_runs() -> None:
    from asymlora.federated.config import load_fed_config
    from asymlora.tuner.config import AsymLoraConfig

    fed = load_fed_config(None, ["data.tasks=[bigbench:a, bigbench:b]", "clients.num=2", "adapter.r=4"])
    # what FedConfig.base_adapter built by hand before there was one builder
    assert fed.base_adapter() == AsymLoraConfig(method="lora", r=4, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], intermediate_rank=16,
                                                num_experts=1)  # fmt: skip
    run = load_config(None, ["data.tasks=[bigbench:a, bigbench:b]", "adapter.router=task"])
    routed = run.adapter.to_peft(["a", "b"])
    assert (routed.num_experts, routed.task_names, routed.router) == (2, ["a", "b"], "task")
    assert run.adapter_for("lora").to_peft(["a", "b"]).num_experts == 3  # lora: no task routing


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.steps=3"], r"unknown config key 'train.steps' \(did you mean 'local_steps'\?\)"),
        (["adapter.num_experts=3"], r"unknown config key 'adapter.num_experts'.*valid keys here: \['method'"),
        (
            ["clients.partition=shards"],
            r"clients.partition='shards' is not allowed; choose one of \['task', 'dirichlet', 'iid'\]",
        ),
        (
            ["dp.clipping=maybe"],
            r"dp.clipping='maybe' is not allowed; choose one of \['off', 'server', 'client'\]",
        ),
        (["clients.ranks=[8, x]"], r"clients.ranks\[1\]: expected int, got 'x' \(str\)"),
        (["rounds=null"], r"rounds: expected int, got None"),
        (["train.local_steps=-1"], r"train.local_steps=-1 must be an integer >= 0"),
        # each of these ran: AdamW raised on every client in round 1 (NaN lr, negative or NaN weight decay),
        # an infinite lr made every loss NaN (exit 0), and a negative / NaN clipping norm turned clipping off
        (["train.lr=nan"], r"train.lr=nan must be a finite number > 0, e.g. train.lr=1e-3"),
        (["train.lr=inf"], r"train.lr=inf must be a finite number > 0"),
        (["train.lr=0"], r"train.lr=0.0 must be a finite number > 0"),
        (["train.weight_decay=-1"], r"train.weight_decay=-1.0 must be a finite number >= 0 \(0 = off\)"),
        (["train.weight_decay=nan"], r"train.weight_decay=nan must be a finite number >= 0"),
        (
            ["train.max_grad_norm=-1"],
            r"train.max_grad_norm=-1.0 must be a finite number >= 0 \(0 = no clipping\)",
        ),
        (["train.max_grad_norm=nan"], r"train.max_grad_norm=nan must be a finite number >= 0"),
    ],
)
def test_federated_config_errors_name_the_key_the_value_and_the_fix(overrides: list[str], match: str) -> None:
    from asymlora.federated.config import load_fed_config

    with pytest.raises(ConfigError, match=match):
        load_fed_config(None, ["data.tasks=[bigbench:a, bigbench:b]", "clients.num=2", *overrides])


def test_the_syntax_conveniences_are_kept(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.tasks=bigbench:strategyqa", "compare.methods=[lora]", "compare=null",
                             "baselines={strategyqa: 0.5}", "train.lr=1e-4", "run_dir="])  # fmt: skip
    assert cfg.data.tasks == ["bigbench:strategyqa"]  # one value where a list is expected
    assert cfg.compare == RunConfig().compare  # null for a section: its defaults
    assert cfg.baselines == {"strategyqa": 0.5} and cfg.train.lr == 1e-4 and cfg.run_dir == ""
    with pytest.raises(ConfigError, match=r"baselines.strategyqa: expected float, got 'high' \(str\)"):
        load_config(None, ["data.tasks=[bigbench:a]", "baselines={strategyqa: high}"])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"override 'train.steps=3': 'train' is not a section"):
        load_config(scalar, ["train.steps=3"])
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        (tmp_path / "list.yaml").write_text("- a\n")
        load_config(tmp_path / "list.yaml")


def test_a_missing_file_is_a_config_error_and_a_file_not_found_error(tmp_path: Path) -> None:
    from asymlora.federated.config import FedConfig, load_fed_config

    for load in (load_config, load_fed_config):
        with pytest.raises(ConfigError, match="does not exist") as info:
            load(tmp_path / "nope.yaml")
        assert isinstance(info.value, FileNotFoundError)
    assert isinstance(load_config(None, ["data.tasks=[x:a]", "clients.num=1"], schema=FedConfig), FedConfig)


def test_the_federated_config_survives_its_json_message() -> None:
    from asymlora.federated.config import fed_config_from_json, load_fed_config

    cfg = load_fed_config(ROOT / "configs" / "fed_bigbench_het.yaml", ["rounds=2", "dp.clipping=server",
                                                                        "dp.noise_multiplier=0.5", "strategy=zeropad"])  # fmt: skip
    assert cfg.strategies == ["zeropad"]  # the single-strategy alias
    back = fed_config_from_json(cfg.to_json())
    assert back == cfg and fed_config_from_json(back.to_json()).to_json() == back.to_json()
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        fed_config_from_json(cfg.to_json().replace('"local_steps"', '"stepz"'))


@pytest.mark.parametrize("argv", [["train", "nope.yaml"], ["train", "CONFIG", "train.stepz=3"],
                                  ["fed", "configs/fed_bigbench_homo.yaml", "clients.partition=shards"],
                                  ["fed", "configs/fed_bigbench_homo.yaml", "=3"]])  # fmt: skip
def test_the_cli_refuses_a_bad_config_with_one_line_and_exit_2(argv: list[str], capsys) -> None:
    from asymlora.cli import main

    argv = [
        str(demo_config_path()) if a == "CONFIG" else str(ROOT / a) if a.startswith("configs/") else a
        for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert any(
        word in err
        for word in ("does not exist", "did you mean 'steps'", "'shards' is not allowed", "empty name")
    ), err


def test_a_run_from_a_config_without_an_adapter_section_can_be_resumed(tmp_path: Path) -> None:
    """The saved config.yaml is read back with lora_alpha typed (16.0) while the run's own config kept the
    declared default (16): the resume check compares the configs, not their text."""
    from asymlora.recipes.multitask import CONFIG_FILE, prepare_run_dir

    cfg = load_config(None, ["data.tasks=[bigbench:strategyqa]", f"run_dir={tmp_path / 'run'}"])
    prepare_run_dir(cfg, overwrite=False, resume=False)
    assert "lora_alpha: 16\n" in (tmp_path / "run" / CONFIG_FILE).read_text()
    prepare_run_dir(cfg, overwrite=False, resume=True)  # the same config: no error
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(load_config(None, ["data.tasks=[bigbench:strategyqa]", f"run_dir={tmp_path / 'run'}",
                                           "adapter.r=4"]), overwrite=False, resume=True)  # fmt: skip


# --- a section given a value, FSDP with the stopping rule, the help of every argument -----------------------
@pytest.mark.parametrize(
    ("schema", "yaml_text", "overrides", "message"),
    [
        ("run", "", ["stopping=5"], "stopping is a section (keys: val_examples, every, patience, min_delta, "
         "restore_best), not a value (5); set one of its keys, e.g. stopping.val_examples=5"),
        ("run", "stopping: 5\n", [], "e.g. stopping.val_examples=5"),
        ("run", "", ["train=3"], "train is a section (keys: steps, epochs, batch_size, "),
        ("run", "train: {steps: 4}\n", ["train=3"], "e.g. train.steps=3"),
        ("run", "adapter: lora\n", [], "not a value ('lora'); set one of its keys, e.g. adapter.method=lora"),
        # never a no-op (the key's default) nor a value that fails validation: else the generic form
        ("run", "", ["stopping=true"], "not a value (True); set one of its keys, e.g. stopping.val_examples=<value>"),
        ("run", "", ["stopping=[1, 2]"], "e.g. stopping.val_examples=<value>"),
        ("run", "", ["stopping=0"], "e.g. stopping.val_examples=<value>"),  # every=0 is refused, the rest defaults
        ("run", "", ["data=bigbench:x"], "e.g. data.tasks=[bigbench:x]"),  # a string into a list of strings
        ("run", "", ["adapter=task"], "e.g. adapter.router=task"),  # the key whose choices name it
        ("run", "", ["model=true"], "e.g. model.gradient_checkpointing=true"),
        ("run", "train: {steps: 4}\n", ["train=[1, 2]"], "not a value ([1, 2]); set one of its keys, e.g. train.steps=<value>"),
        ("fed", "", ["clients=1"], "clients is a section (keys: num, ranks, partition, dirichlet_over, alpha, "
         "fraction, per_round, min_per_round, max_failed_rounds), not a value (1); set one of its keys, e.g. clients.num=1"),
        ("fed", "timeouts: 60\n", [], "e.g. timeouts.wait_nodes=60"),
        ("fed", "", ["dp=true"], "e.g. dp.clipping=<value>"),  # dp.clipping=server alone is refused
        ("fed", "", ["secagg=[1, 2]"], "e.g. secagg.enabled=<value>"),
        ("fed", "", ["clients.num=2", "clients.partition=iid", "secagg=true"], "e.g. secagg.enabled=true"),  # the enabled key first
        ("fed", "", ["secagg=true"], "e.g. secagg.enabled=<value>"),  # SecAgg+ with 1 client is refused
        ("fed", "", ["data=bigbench:x"], "e.g. data.tasks=[bigbench:x]"),
        ("fed", "", ["adapter=lora"], "e.g. adapter.method=<value>"),  # its default, not target_modules=[lora]
    ],
)  # fmt: skip
def test_a_section_given_a_value_names_its_keys_and_a_fix_that_works(
    tmp_path: Path, schema: str, yaml_text: str, overrides: list[str], message: str
) -> None:
    from asymlora.federated.config import FedConfig

    cls = RunConfig if schema == "run" else FedConfig
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data: {tasks: [bigbench:a]}\n" + ("clients: {num: 1}\n" if cls is FedConfig else "") + yaml_text
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, schema=cls)
    assert message in str(info.value)
    fix = str(info.value).rsplit("e.g. ", 1)[1]  # the suggested key=value loads once the bad value is gone
    if fix.endswith("=<value>"):
        return
    section = fix.split(".", 1)[0]
    cleaned = tmp_path / "clean.yaml"
    cleaned.write_text(
        "".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith(section))
    )
    kept = [o for o in overrides if not o.startswith(section + "=")]
    assert load_config(cleaned, [*kept, fix], schema=cls) is not None


@pytest.mark.parametrize("schema", ["run", "fed"])
def test_every_concrete_fix_for_a_section_given_a_value_loads_and_changes_the_config(schema: str) -> None:
    """Each section of both schemas given 5, true, a string, a list: the suggested ``key=value`` loads and
    is not a no-op; or none is invented (the generic ``key=<value>`` form naming a key of the section)."""
    import dataclasses

    from asymlora.federated.config import FedConfig

    cls: type = RunConfig if schema == "run" else FedConfig
    base = ["data.tasks=[bigbench:a]"] + (
        ["clients.num=4", "clients.partition=iid"] if cls is FedConfig else []
    )
    reference = dump_config(load_config(None, base, schema=cls))
    sections = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)]
    assert len(sections) == (7 if cls is RunConfig else 13)
    concrete = 0
    for f in sections:
        keys = [k.name for k in dataclasses.fields(typing_cast_type(f.default_factory))]
        for value in ("5", "true", "lora", "[1, 2]", "bigbench:x"):
            with pytest.raises(ConfigError) as info:
                load_config(None, [*base, f"{f.name}={value}"], schema=cls)
            message = str(info.value)
            assert message.startswith(f"{f.name} is a section (keys: "), message
            key, _, suggested = message.rsplit(f"e.g. {f.name}.", 1)[1].partition("=")
            assert key in keys, message
            if suggested != "<value>":
                concrete += 1
                fixed = load_config(None, [*base, f"{f.name}.{key}={suggested}"], schema=cls)
                assert dump_config(fixed) != reference, message
    assert concrete >= 10  # the rule still suggests values where one fits


def typing_cast_type(factory: object) -> type:
    assert isinstance(factory, type)
    return factory


def test_a_mapping_where_a_value_is_expected_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^data.tasks: expected list\[str\], got the mapping \{'a': 1\}$"):
        load_config(None, ["data.tasks={a: 1}"])
    with pytest.raises(ConfigError, match=r"^train.steps: expected int, got the mapping"):
        load_config(None, ["data.tasks=[bigbench:a]", "train.steps={a: 1}"])


@pytest.mark.parametrize("override", ["stopping=5", "train=[1, 2]", "adapter=lora"])
def test_the_cli_refuses_a_section_given_a_value_with_one_line_and_exit_2(override: str, capsys) -> None:
    from asymlora.cli import main

    assert main(["train", str(ROOT / "configs" / "multitask_bigbench.yaml"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "is a section (keys: " in err


def test_fsdp_with_the_stopping_rule_is_refused_before_anything_is_loaded() -> None:
    base = ["data.tasks=[bigbench:a]", "model.name=/nope/never/loaded"]
    with pytest.raises(ConfigError, match=re.escape(
        "the stopping rule (stopping.val_examples > 0) does not run with an FSDP-sharded model (train.fsdp=true); "
        "use train.fsdp=false (DDP) or stopping.val_examples=0"
    )):  # fmt: skip
        load_config(None, [*base, "train.fsdp=true", "stopping.val_examples=4"])
    assert load_config(None, [*base, "train.fsdp=true"]).train.fsdp  # either alone is fine
    assert load_config(None, [*base, "stopping.val_examples=4"]).stopping.enabled


def test_fsdp_with_training_traces_is_refused_before_anything_is_loaded() -> None:
    """Under torchrun with train.fsdp=true, rank 0 alone read the sharded adapter for traces.jsonl: a
    collective the other rank never joined, and gloo aborted both (exit -6, "collective mismatch")."""
    base = ["data.tasks=[bigbench:a]", "model.name=/nope/never/loaded"]
    with pytest.raises(ConfigError, match=re.escape(
        "train.trace_every=5 does not run with an FSDP-sharded model (train.fsdp=true): the traces read the "
        "whole adapter on rank 0; use train.fsdp=false (DDP) or train.trace_every=0"
    )):  # fmt: skip
        load_config(None, [*base, "train.fsdp=true", "train.trace_every=5"])
    assert load_config(None, [*base, "train.trace_every=5"]).train.trace_every == 5


def _positionals(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """(command, action) of every positional argument of ``parser``'s subcommands."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(name, a) for a in sub._actions if not a.option_strings]
    return out


def test_every_positional_argument_has_help() -> None:
    from asymlora.cli import build_parser
    from asymlora.federated.__main__ import build_parser as build_fed_parser

    for parser in (build_parser(), build_fed_parser()):
        positionals = _positionals(parser)
        assert len(positionals) >= 2
        missing = [f"{command} {a.dest}" for command, a in positionals if not a.help]
        assert not missing, missing


def _options(parser: argparse.ArgumentParser, command: str = "") -> list[tuple[str, argparse.Action]]:
    """(command, action) of every option (``--x``) of ``parser`` and of its subcommands, recursively."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _options(sub, f"{command} {name}".strip())
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            out.append((command, action))
    return out


def test_every_option_with_a_default_says_it_in_its_help() -> None:
    """`asymlora serve --help` once said nothing of --max-wait-ms's 5 ms or --max-tokens' 256 (docs/serving.md did)."""
    from asymlora.cli import build_parser
    from asymlora.federated.__main__ import build_parser as build_fed_parser

    for parser in (build_parser(), build_fed_parser()):
        options = _options(parser)
        assert len(options) >= 10
        silent = [
            f"{command} {action.option_strings[0]} (default {action.default!r})"
            for command, action in options
            if action.default not in (None, False, "", [], argparse.SUPPRESS)
            and "default" not in (action.help or "")
        ]
        assert not silent, silent
