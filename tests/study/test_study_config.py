"""Study YAML validation and run planning (no training: the mixture's files are never read)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_mole.study.compare import (
    SETTINGS,
    StudyConfigError,
    load_study,
    plan_runs,
    write_mixtures,
    write_single_mixtures,
)

from .conftest import write_study


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A model folder and a three-dataset, two-domain mixture (files need not exist here)."""
    (tmp_path / "model").mkdir()
    mixture = {
        "seed": 3,
        "max_length": 64,
        "datasets": [
            {"domain": "general", "train": "a/train.json", "test": "a/test.json"},
            {"domain": "document", "name": "docs", "train": "b/train.json", "select": "random"},
            {"domain": "general", "train": "c/train.json", "image_folder": "c/img", "take": 5},
        ],
    }
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mix.yaml").write_text(yaml.safe_dump(mixture), encoding="utf-8")
    return {"model": Path("model"), "mixture": Path("data/mix.yaml"), "root": tmp_path}


def study_file(world: dict[str, Path], **changes) -> Path:
    return write_study(world["root"] / "study.yaml", world, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sedes": [0]}, "sedes: unknown key"),
        ({"adapter": {"rnak": 2}}, "adapter.rnak: unknown key"),
        ({"adapter": {"type": "mole"}}, "adapter.type: not allowed here"),
        ({"adapter": {"rank": "two"}}, "adapter.rank: expected an integer"),
        ({"adapter": {"rank": 0}}, "adapter.rank"),
        (
            {"train": {"learning_rate": "fast", "max_steps": 4}},
            "train.learning_rate: expected a number",
        ),
        ({"sedes": [0]}, "sedes: unknown key \\(did you mean 'seeds'\\?\\)"),
        ({"settings": ["single", "mix_moel"]}, "did you mean 'mix_mole'"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size: must be >= 1"),
        ({"bootstrap": {"samples": 10}}, "bootstrap.samples: must be >= 100"),
        ({"bootstrap": {"confidence": 1.0}}, "bootstrap.confidence: must be in"),
        ({"extra_settings": [{"name": "a b", "base": "mix_mole"}]}, "extra_settings\\[0\\].name"),
        ({"train": {"seed": 1, "max_steps": 4}}, "train.seed: not allowed here"),
        ({"train": {"learning_rate": 0.1}}, "train.max_steps: required"),
        ({"seeds": [0, 0]}, "seeds: repeated seed"),
        ({"seeds": "0"}, "seeds: expected a list"),
        ({"settings": ["single", "mix_moel"]}, "settings\\[1\\]: unknown setting 'mix_moel'"),
        ({"single_steps": "half"}, "single_steps: must be one of"),
        ({"extra_settings": [{"name": "x", "base": "moe"}]}, "extra_settings\\[0\\].base"),
        ({"extra_settings": [{"base": "mix_mole"}]}, "extra_settings\\[0\\].name: required"),
        (
            {"extra_settings": [{"name": "mix_lora", "base": "mix_mole"}]},
            "extra_settings\\[0\\].name: 'mix_lora' is already a setting",
        ),
        (
            {"extra_settings": [{"name": "k0", "base": "mix_mole", "adapter": {"num_experts": 0}}]},
            "extra_settings\\[0\\].adapter.num_experts",
        ),
        (
            {"extra_settings": [{"name": "k", "base": "mix_mole", "train": {"lr": 1.0}}]},
            "extra_settings\\[0\\].train.lr: unknown key",
        ),
        ({"eval": {"limt": 3}}, "eval.limt: unknown key"),
        ({"eval": {"limit": 0}}, "eval.limit: must be >= 1"),
        ({"eval": {"split": "val"}}, "eval.split: must be one of"),
        ({"convergence": {"tail": 0.9}}, "convergence.tail: must be in"),
        ({"workers": 0}, "workers: must be >= 1"),
        ({"threads": 0}, "threads: must be >= 1"),
        ({"plots": {"loss_scale": "ln"}}, "plots.loss_scale: must be one of"),
        ({"model": "nowhere"}, "model: model directory not found"),
        ({"mixture": "nowhere.yaml"}, "mixture: mixture file not found"),
    ],
)
def test_study_yaml_errors_name_the_key(world, changes, message):
    with pytest.raises(StudyConfigError, match=message):
        load_study(study_file(world, **changes))


def test_numbers_written_as_text_are_numbers(world):
    # YAML 1.1 reads 2e-3 (no dot) as a string; the shared schema accepts it for float keys,
    # as a train YAML does (the study used to refuse it).
    study = load_study(
        study_file(
            world, train={"learning_rate": "2e-3", "max_steps": 4}, convergence={"tail": "0.25"}
        )
    )
    assert study.train["learning_rate"] == 0.002 and study.convergence.tail == 0.25
    assert study.training_config("mix_lora").train.learning_rate == 0.002


def test_a_study_wide_shared_expert_is_moles_alone_and_counted_by_the_rank_kr_control(world):
    study = load_study(
        study_file(world, adapter={"rank": 1, "num_experts": 3, "shared_rank": 1, "mlp_rank": 2})
    )
    assert study.training_config("mix_mole").adapter.shared_rank == 1
    for setting in ("single", "mix_lora", "mix_lora_2x"):
        assert study.training_config(setting).adapter.shared_rank == 0  # plain LoRA has none
    kr = study.training_config("mix_lora_rank_kr").adapter
    assert (kr.shared_rank, kr.mlp_rank) == (0, 3 * 2 + 1)  # K experts of rank 2, shared rank 1


def test_one_domain_mixture_is_refused(world):
    one = {"datasets": [{"domain": "general", "train": "a.json"}]}
    (world["root"] / "one.yaml").write_text(yaml.safe_dump(one), encoding="utf-8")
    with pytest.raises(StudyConfigError, match="mixture: needs at least two domains"):
        load_study(study_file(world, mixture="one.yaml"))


def test_plan_expands_settings_seeds_and_domains(world, tmp_path):
    study = load_study(
        study_file(
            world,
            seeds=[0, 1],
            train={"max_steps": 30, "per_device_batch_size": 4, "learning_rate": 1},
            extra_settings=[
                {"name": "mole_k4", "base": "mix_mole", "adapter": {"num_experts": 4}},
                {"name": "kr_k4", "base": "mix_lora_rank_kr", "adapter": {"num_experts": 4}},
                {
                    "name": "r2",
                    "base": "mix_lora",
                    "adapter": {"rank": 2},
                    "train": {"max_steps": 60},
                },
            ],
        )
    )
    assert study.model == (world["root"] / "model").resolve()  # relative to the YAML's folder
    assert study.settings == list(SETTINGS) and study.domains == ["general", "document"]
    assert study.train["learning_rate"] == 1.0 and isinstance(study.train["learning_rate"], float)
    runs = plan_runs(study, tmp_path / "out")
    by_id = {r.id: r for r in runs}
    assert len(runs) == 2 * (2 + 4 + 3)
    single = by_id["single/document/seed1"]
    assert single.steps == 15  # equal exposure: 30 steps / 2 domains
    assert single.config.adapter.type == "lora" and single.config.train.seed == 1
    assert single.run_dir == (tmp_path / "out" / "runs" / "single" / "document" / "seed1").resolve()
    assert single.eval_mixture.name == "single-document.yaml"
    assert single.config.train.report_to == ["none"]
    mole = by_id["mix_mole/seed0"].config
    assert (mole.adapter.type, mole.adapter.rank, mole.train.max_steps) == ("mole", 1, 30)
    assert by_id["mix_lora_2x/seed0"].steps == 60
    kr = by_id["mix_lora_rank_kr/seed0"].config.adapter
    assert (kr.type, kr.rank, kr.mlp_rank, kr.alpha) == ("lora", 1, 3, 2.0)  # MLP rank K*r
    assert by_id["mole_k4/seed1"].config.adapter.num_experts == 4
    assert by_id["kr_k4/seed0"].config.adapter.mlp_rank == 4
    r2 = by_id["r2/seed0"]
    assert (r2.config.adapter.rank, r2.steps, r2.base) == (2, 60, "mix_lora")
    assert Path(by_id["mix_lora/seed0"].config.data.mixture) == study.mixture

    same = load_study(study_file(world, single_steps="same_steps", settings=["single"]))
    assert {r.steps for r in plan_runs(same, tmp_path / "o2")} == {4}


def test_runs_trained_to_convergence_get_the_same_budget_unless_told(world, tmp_path):
    dev = {"max_steps": 30, "dev_per_domain": 5}
    study = load_study(study_file(world, train=dev, settings=["single", "mix_lora"]))
    assert study.single_steps == "same_steps"  # a budget is a cap: single runs stop on their own
    assert {r.steps for r in plan_runs(study, tmp_path / "a")} == {30}
    told = load_study(
        study_file(world, train=dev, settings=["single"], single_steps="equal_exposure")
    )
    assert {r.steps for r in plan_runs(told, tmp_path / "b")} == {15}
    assert load_study(study_file(world)).single_steps == "equal_exposure"


def test_single_domain_mixtures_keep_the_selection(world, tmp_path):
    study = load_study(study_file(world))
    paths = write_single_mixtures(study, tmp_path / "out")
    general = yaml.safe_load(paths["general"].read_text(encoding="utf-8"))
    assert (general["seed"], general["max_length"]) == (3, 64)
    data = (world["root"] / "data").resolve()
    assert general["datasets"] == [
        {
            "domain": "general",
            "train": str(data / "a/train.json"),
            "test": str(data / "a/test.json"),
            "name": "a/train.json",  # the default name, kept: it seeds `select: random`
        },
        {
            "domain": "general",
            "train": str(data / "c/train.json"),
            "image_folder": str(data / "c/img"),
            "take": 5,
            "name": "c/train.json",
        },
    ]
    document = yaml.safe_load(paths["document"].read_text(encoding="utf-8"))
    assert [d["name"] for d in document["datasets"]] == ["docs"]


def test_2x_control_trains_on_twice_the_take_where_the_data_can_grow(world, tmp_path):
    # c takes 5: the 2x control's mixture takes 10 of it (twice the samples, where c has them);
    # a and b take all, which cannot grow. Everything else is the study's mixture.
    study = load_study(study_file(world))
    write_mixtures(study, tmp_path / "out")
    by_id = {r.id: r for r in plan_runs(study, tmp_path / "out")}
    x2 = Path(by_id["mix_lora_2x/seed0"].config.data.mixture)
    assert x2.name == "samples-x2.yaml" and by_id["mix_lora_2x/seed0"].eval_mixture == x2
    doc = yaml.safe_load(x2.read_text(encoding="utf-8"))
    assert [d.get("take") for d in doc["datasets"]] == [None, None, 10]
    assert [d["name"] for d in doc["datasets"]] == ["a/train.json", "docs", "c/train.json"]
    assert Path(by_id["mix_mole/seed0"].config.data.mixture) == study.mixture

    # fractions double up to 1.0
    raw = yaml.safe_load((world["root"] / "data" / "mix.yaml").read_text(encoding="utf-8"))
    raw["datasets"][0]["take"], raw["datasets"][2]["take"] = 0.3, 0.75
    (world["root"] / "data" / "mix.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    write_mixtures(load_study(study_file(world)), tmp_path / "o2")
    doc = yaml.safe_load((tmp_path / "o2" / "mixtures" / "samples-x2.yaml").read_text())
    assert [d.get("take") for d in doc["datasets"]] == [0.6, None, 1.0]


def test_2x_control_keeps_the_mixture_when_it_takes_everything(world, tmp_path):
    raw = yaml.safe_load((world["root"] / "data" / "mix.yaml").read_text(encoding="utf-8"))
    raw["datasets"][2].pop("take")
    (world["root"] / "data" / "mix.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    study = load_study(study_file(world))
    write_mixtures(study, tmp_path / "out")
    run = next(r for r in plan_runs(study, tmp_path / "out") if r.setting == "mix_lora_2x")
    assert Path(run.config.data.mixture) == study.mixture and run.steps == 2 * 4
    assert not (tmp_path / "out" / "mixtures" / "samples-x2.yaml").exists()


def test_threads_per_run_are_set_for_serial_runs_and_restored(world):
    import torch

    from llava_mole.study import runner

    study = load_study(study_file(world, threads=1, plots={"loss_scale": "log"}))
    assert (study.threads, study.plots.loss_scale) == (1, "log")
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # so that setting 1 thread is visible
    try:
        with runner._threads(study.threads):
            inside = torch.get_num_threads()
        assert inside == 1 and torch.get_num_threads() == 2
        with runner._threads(None):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


def test_the_run_count_line_names_per_domain_runs_only_when_single_is_run(capsys):
    from llava_mole.study.compare import _announce
    from llava_mole.study.config import StudyConfig

    def line(settings: list[str]) -> str:
        study = StudyConfig(
            path=None, model=Path("/m"), mixture=Path("/x.yaml"), domains=["a", "b", "c"]
        )
        study.settings = settings
        _announce(study, 6, Path("/out"))
        return capsys.readouterr().out.strip()

    assert line(["single", "mix_lora"]) == (
        "[study] 6 runs: 2 settings x 3 seeds (single: x 3 domains) -> /out"
    )
    assert (
        line(["mix_lora_2x", "mix_lora_rank_kr"]) == "[study] 6 runs: 2 settings x 3 seeds -> /out"
    )
