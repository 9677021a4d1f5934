"""Dev split, teacher-forced dev score and the early-stopping rule (issue 18, part 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerControl, TrainerState

from llava_mole.toy.tiny import make_tiny
from llava_mole.train.convergence import (
    BEST_FILE,
    DEV_KEY,
    ConvergenceRule,
    DevEarlyStopping,
    DevScore,
    carve_dev,
    teacher_forced_exact,
)


def test_carve_dev_takes_the_same_count_from_every_domain_seeded_and_disjoint():
    domains = ["a"] * 50 + ["b"] * 10 + ["c"] * 7
    train, dev = carve_dev(domains, per_domain=8, seed=0)
    assert sorted(train + dev) == list(range(len(domains))) and not set(train) & set(dev)
    counts = {d: sum(domains[i] == d for i in dev) for d in "abc"}
    assert counts == {"a": 8, "b": 5, "c": 3}  # small domains keep half for training
    assert carve_dev(domains, 8, seed=0) == (train, dev)
    assert carve_dev(domains, 8, seed=1)[1] != dev
    with pytest.raises(ValueError, match="dev items per domain"):
        carve_dev(domains, 0, seed=0)


def test_teacher_forced_exact_is_greedy_decoding_reproducing_the_reference(tmp_path):
    tiny = make_tiny(tmp_path / "tiny", seed=0, pretrain=False, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(tiny).eval()
    tokenizer = AutoProcessor.from_pretrained(tiny).tokenizer
    prompt = torch.tensor([tokenizer.encode("What is the code for this image?")])
    greedy = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)[
        0, prompt.shape[1] :
    ]
    wrong = greedy.clone()
    wrong[2] = (wrong[2] + 1) % model.config.text_config.vocab_size
    rows = []
    for answer in (greedy, wrong):
        ids = torch.cat([prompt[0], answer])
        labels = torch.cat([torch.full_like(prompt[0], -100), answer])
        rows.append((ids, labels))
    batch = {
        "input_ids": torch.stack([r[0] for r in rows]),
        "attention_mask": torch.ones(2, rows[0][0].numel(), dtype=torch.long),
        "labels": torch.stack([r[1] for r in rows]),
        "domain_ids": torch.tensor([0, 1]),
    }
    score = teacher_forced_exact(model, [batch], ["greedy", "perturbed"])
    assert score.per_domain == {"greedy": 1.0, "perturbed": 0.0}
    assert score.counts == {"greedy": 1, "perturbed": 1} and score.macro == 0.5
    assert not model.training


def _drive(callback: DevEarlyStopping, model: nn.Module, state: TrainerState, steps: range):
    control = TrainerControl()
    for step in steps:
        state.global_step = step
        callback.on_step_end(None, state, control, model=model)
        if control.should_training_stop:
            return step
    return None


def test_the_rule_stops_after_patience_keeps_the_best_weights_and_replays_on_resume(tmp_path):
    scores = iter([0.1, 0.3, 0.303, 0.2, 0.25, 0.9])
    model = nn.Linear(2, 2)
    logged: list[dict] = []

    def score(m: nn.Module) -> DevScore:
        value = next(scores)
        with torch.no_grad():
            m.weight.fill_(value)  # the weights at each evaluation are recognisable
        return DevScore({"d": value}, {"d": 4})

    state = TrainerState(max_steps=100)
    state.log_history = []

    def log(values: dict) -> None:
        logged.append({"step": state.global_step, **values})
        state.log_history.append(logged[-1])

    rule = ConvergenceRule(every=10, patience=3, min_delta=0.005)
    callback = DevEarlyStopping(rule, score, tmp_path, log)
    callback.on_train_begin(None, state, TrainerControl())
    stopped = _drive(callback, model, state, range(1, 101))
    # 0.303 is within min_delta of 0.3: a strike, as are 0.2 and 0.25 -> stop at step 50.
    assert stopped == 50 and [r[DEV_KEY] for r in logged] == [0.1, 0.3, 0.303, 0.2, 0.25]
    summary = callback.summary()
    assert (summary["best_step"], summary["best_dev_score"], summary["converged_at"]) == (
        20,
        0.3,
        50,
    )
    assert (tmp_path / BEST_FILE).is_file()
    assert callback.restore_best(model) == 20 and torch.all(model.weight == 0.3)

    # A resumed run rebuilds the rule from the log history up to its checkpoint (step 30).
    resumed_state = TrainerState(max_steps=100)
    resumed_state.log_history = [r for r in logged if r["step"] <= 30]
    again = DevEarlyStopping(rule, score, tmp_path, log)
    again.on_train_begin(None, resumed_state, TrainerControl())
    assert (again.progress.best_step, again.progress.strikes) == (20, 1)


def test_a_tie_in_all_but_the_last_bit_is_judged_as_its_replay_judges_it(tmp_path):
    # Two macros of different per-domain scores that print alike: (0.95 + 1 + 59/60) / 3 and
    # (58/60 + 58/60 + 1) / 3. Live and replayed (from the logged values) decisions must agree,
    # or the kept weights are not those of the step the dev curve names (seen in a study).
    first = [0.95, 1.0, 59 / 60]
    second = [58 / 60, 58 / 60, 1.0]
    assert sum(first) / 3 != sum(second) / 3 and round(sum(first) / 3, 6) == round(
        sum(second) / 3, 6
    )
    scores = iter([first, [0.5, 0.5, 0.5], second, [0.5, 0.5, 0.5]])
    model = nn.Linear(2, 2)
    state = TrainerState(max_steps=100)
    state.log_history = []

    def score(m: nn.Module) -> DevScore:
        per = next(scores)
        with torch.no_grad():
            m.weight.fill_(per[0])
        return DevScore(dict(zip("abc", per)), dict.fromkeys("abc", 60))

    def log(values: dict) -> None:
        state.log_history.append({"step": state.global_step, **values})

    callback = DevEarlyStopping(ConvergenceRule(every=10, patience=9), score, tmp_path, log)
    callback.on_train_begin(None, state, TrainerControl())
    _drive(callback, model, state, range(1, 41))
    live = callback.progress.best_step
    callback.on_train_begin(None, state, TrainerControl())  # the end-of-run replay
    assert live == callback.progress.best_step == 10
    assert callback.restore_best(model) == 10 and torch.all(model.weight == 0.95)


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="smooth must be >= 1"):
        ConvergenceRule(every=10, patience=0)
    with pytest.raises(ValueError, match="decay_factor must be in"):
        ConvergenceRule(decays=1, decay_factor=1.0)


def _train(world, out, *extra: str) -> dict:
    import json

    from llava_mole.cli import main
    from tests.train.test_train import base_overrides

    overrides = base_overrides(world, out, max_steps=40, dev_per_domain=4, dev_every=2)
    overrides += ["train.dev_patience=2", "train.save_steps=2", *extra]
    argv = ["train", str(out / "cfg.yaml")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text("{}\n")
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}


def test_a_run_trains_to_convergence_keeps_its_best_weights_and_resumes_exactly(
    tiny_world, tmp_path, capsys
):
    from safetensors.torch import load_file

    summary = _train(tiny_world, tmp_path / "a")
    conv = summary["convergence"]
    assert "dev split: 12 items held out of" in capsys.readouterr().out
    # Dev scores every 2 steps; stopped after 2 without beating the best: before the budget.
    steps = [s for s, _ in conv["dev_curve"]]
    assert (
        steps == list(range(2, conv["converged_at"] + 1, 2))
        and summary["steps"] == conv["converged_at"] < 40
    )
    best = load_file(tmp_path / "a" / BEST_FILE)
    final = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert best and any("lora" in k.lower() for k in best)
    # The final adapter holds the best step's weights (file keys differ from module names).
    assert conv["best_step"] < conv["converged_at"]
    for name, tensor in best.items():
        assert any(f.shape == tensor.shape and torch.equal(f, tensor) for f in final.values()), name
    # Interrupted at step 4 and resumed: the same dev curve and the same final adapter.
    first = _train(tiny_world, tmp_path / "b", "train.stop_after_steps=4")
    assert first == {}
    resumed = _train(tiny_world, tmp_path / "b")
    assert resumed["convergence"]["dev_curve"] == conv["dev_curve"]
    again = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


def test_a_plateau_cuts_the_learning_rate_before_a_plateau_ends_the_run(tmp_path):
    # Strikes: 0.2 (1), 0.25 (2) -> cut; 0.28 (1), 0.29 (2) -> stop. A LambdaLR schedule gets
    # the cut on top of its own factor.
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.28, 0.29, 0.9])
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = TrainerState(max_steps=100)
    state.log_history = []

    def score(m: nn.Module) -> DevScore:
        return DevScore({"d": next(scores)}, {"d": 4})

    def log(values: dict) -> None:
        state.log_history.append({"step": state.global_step, **values})

    rule = ConvergenceRule(every=10, patience=2, decays=1, decay_factor=0.25)
    callback = DevEarlyStopping(rule, score, tmp_path, log)
    callback.on_train_begin(None, state, TrainerControl(), lr_scheduler=schedule)
    control, lrs = TrainerControl(), {}
    for step in range(1, 101):
        state.global_step = step
        optimizer.step()
        schedule.step()
        lrs[step] = optimizer.param_groups[0]["lr"]
        callback.on_step_end(None, state, control, model=model)
        if control.should_training_stop:
            break
    summary = callback.summary()
    assert (summary["lr_decayed_at"], summary["converged_at"], summary["best_step"]) == (
        [40],
        60,
        20,
    )
    assert lrs[40] == pytest.approx(1 / 41) and lrs[41] == pytest.approx(0.25 / 42)
    # A resume replays the cut from the log and scales the loaded schedule the same way.
    again = DevEarlyStopping(rule, score, tmp_path, log)
    state.log_history = [r for r in state.log_history if r["step"] <= 50]
    fresh = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD(model.parameters(), lr=1.0), lambda step: 1.0 / (1 + step)
    )
    again.on_train_begin(None, state, TrainerControl(), lr_scheduler=fresh)
    assert again.progress.lr_scale == 0.25 and again.progress.strikes == 1
    assert fresh.lr_lambdas[0](9) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="LambdaLR"):
        again._scale_schedule(torch.optim.lr_scheduler.StepLR(optimizer, 5))


def test_hold_counts_no_plateau_early_so_a_late_learner_keeps_its_learning_rate(tmp_path):
    # An early plateau (steps 20-60), then learning: without a hold it cuts at 40 and stops
    # at 60; with hold 0.5 of 100 steps nothing counts up to step 50, so the run lives on.
    curve = [0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 0.7, 0.7, 0.7, 0.7]

    def run(hold: float) -> tuple[dict, list[dict]]:
        values = iter(curve)
        state = TrainerState(max_steps=100)
        state.log_history = []

        def score(m: nn.Module) -> DevScore:
            return DevScore({"d": next(values)}, {"d": 4})

        def log(values: dict) -> None:
            state.log_history.append({"step": state.global_step, **values})

        rule = ConvergenceRule(every=10, patience=2, decays=1, hold=hold)
        callback = DevEarlyStopping(rule, score, tmp_path / str(hold), log)
        (tmp_path / str(hold)).mkdir()
        callback.on_train_begin(None, state, TrainerControl())
        _drive(callback, nn.Linear(2, 2), state, range(1, 101))
        return callback.summary(), state.log_history

    plain, _ = run(0.0)
    assert (plain["lr_decayed_at"], plain["converged_at"], plain["best_step"]) == ([40], 60, 20)
    held, history = run(0.5)
    assert held["hold_steps"] == 50 and held["lr_decayed_at"] == [100]  # 90, 100: strikes
    assert (
        held["converged_at"] is None and held["best_step"] == 80 and held["best_dev_score"] == 0.7
    )
    # A resume replays the hold: the same decisions from the log history.
    again = DevEarlyStopping(
        ConvergenceRule(every=10, patience=2, decays=1, hold=0.5), None, tmp_path, None
    )
    state = TrainerState(max_steps=100)
    state.log_history = [r for r in history if r["step"] <= 60]
    again.on_train_begin(None, state, TrainerControl())
    assert (again.progress.strikes, again.progress.decayed_at) == (1, [])
    with pytest.raises(ValueError, match="hold must be in"):
        ConvergenceRule(hold=1.0)


def test_a_resumed_run_replays_its_learning_rate_cuts_exactly(tiny_world, tmp_path):
    import json

    from safetensors.torch import load_file

    cut = ("train.dev_decays=1", "train.dev_decay_factor=0.25", "train.lr_scheduler=constant")
    summary = _train(tiny_world, tmp_path / "a", *cut)
    conv = summary["convergence"]
    (decayed,) = conv["lr_decayed_at"]
    assert decayed < conv["converged_at"] and summary["steps"] == conv["converged_at"]
    logs = [json.loads(line) for line in (tmp_path / "a" / "logs.jsonl").open()]
    lr = {r["step"]: r["learning_rate"] for r in logs if "learning_rate" in r}
    assert sorted(lr) == list(range(1, summary["steps"] + 1))  # dev steps log their loss too
    # The rate of the step after the cut was scheduled before it: the cut shows one step later.
    assert lr[decayed + 1] == pytest.approx(0.002) and lr[decayed + 2] == pytest.approx(0.0005)
    assert lr[max(lr)] == pytest.approx(0.0005)
    # Interrupted after the cut and resumed: same dev curve, learning rates and adapter.
    stop = f"train.stop_after_steps={decayed + 2}"
    assert _train(tiny_world, tmp_path / "b", *cut, stop) == {}
    resumed = _train(tiny_world, tmp_path / "b", *cut)
    assert resumed["convergence"] == conv
    logs_b = [json.loads(line) for line in (tmp_path / "b" / "logs.jsonl").open()]
    assert {r["step"]: r["learning_rate"] for r in logs_b if "learning_rate" in r} == lr
    final = load_file(tmp_path / "a" / "adapter_model.safetensors")
    again = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)


def test_the_rule_judges_the_mean_of_the_last_scores_so_one_lucky_score_does_not_hold_the_best(
    tmp_path,
):
    # Raw scores: a spike (0.9) among 0.6s, then a lasting 0.8. Unsmoothed, the spike is the
    # best and the run stops at step 70; averaged over 3, the 0.8s win (step 80).
    raw = [0.5, 0.6, 0.9, 0.6, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8]

    def run(smooth: int, folder) -> dict:
        scores = iter(raw)
        state = TrainerState(max_steps=100)
        state.log_history = []

        def log(values: dict) -> None:
            state.log_history.append({"step": state.global_step, **values})

        def score(m: nn.Module) -> DevScore:
            return DevScore({"d": next(scores)}, {"d": 60})

        callback = DevEarlyStopping(ConvergenceRule(10, 4, smooth=smooth), score, folder, log)
        callback.on_train_begin(None, state, TrainerControl())
        _drive(callback, nn.Linear(2, 2), state, range(1, 101))
        return callback.summary()

    plain = run(1, tmp_path)
    assert (plain["best_step"], plain["best_dev_score"], plain["converged_at"]) == (30, 0.9, 70)
    smoothed = run(3, tmp_path)
    assert smoothed["best_step"] == 80 and smoothed["best_dev_score"] == pytest.approx(0.8)
    assert smoothed["converged_at"] is None and smoothed["dev_curve"][2] == [30, 0.9]
