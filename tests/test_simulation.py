"""The public Simulation (a plan in the user's own loop), parameter coverage, operand
rounding and the hardware's prediction, against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lpcli import Simulation, StatsCollector, load_plan, train_check
from lpcli.data import batch_indices, load_data
from lpcli.errors import InputError
from lpcli.formats import parse_format
from lpcli.kernels import quantize
from lpcli.models import ROOT, ownership, parameter_layers
from lpcli.plan import TENSORS, Plan
from lpcli.recipe import load_recipe
from lpcli.recommend import recommend
from lpcli.stats import analyze

from conftest import run_cli


def fixed_plan(model: nn.Module, fmt: str = "fx8.4", **extra) -> Plan:
    layers = {name: {t: parse_format(fmt) for t in TENSORS} for name in parameter_layers(model)}
    return Plan(layers=layers, softmax_input=parse_format("fp32"), softmax_error=parse_format("fp32"), **extra)


def test_user_loop_reproduces_the_kahan_run_of_train_check_bit_for_bit(tmp_path):
    recipe = load_recipe("digits-mlp")
    seed, steps = 0, 120
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(recommend(analyze(recipe, seed=seed)).document()))
    plan = load_plan(plan_path)
    report = train_check(recipe, plan, seed=seed, steps=steps).document()

    # The user's side: public API, their own model and loop.
    data = load_data(recipe.data, recipe.source)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    batches = batch_indices(len(data.y_train), 32, steps, seed)
    losses = []
    with Simulation(model, plan) as sim:
        optimizer = sim.optimizer(lr=0.05, seed=seed)
        for step, index in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = sim.cross_entropy(model(data.x_train[index]), data.y_train[index])
            loss.backward()
            optimizer.step()
            if (step + 1) % 25 == 0 or step + 1 == steps:
                losses.append(float(loss.detach()))
        evaluation = sim.evaluate(data.x_test, data.y_test)
        diagnostics = sim.diagnostics()
    kahan = report["runs"]["kahan"]
    assert losses == kahan["loss_curve"]["values"]
    assert evaluation.accuracy == kahan["test_accuracy"]
    assert evaluation.accuracy_fp32_logits == kahan["test_accuracy_fp32_logits"]
    assert evaluation.loss == kahan["test_loss"]
    for name, values in diagnostics["layers"].items():
        assert values == {key: runs["kahan"] for key, runs in report["diagnostics"][name].items()}
    assert diagnostics["softmax"].items() <= report["softmax"]["kahan"].items()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # every hook removed
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_stats_collector_records_the_updates_adamw_made():
    torch.manual_seed(0)
    data = load_data({"name": "digits", "test_fraction": 0.2, "seed": 0, "standardize": None}, "digits")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    collector = StatsCollector(model, lr=1e-3, optimizer=optimizer)
    direct: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
    for index in batch_indices(len(data.y_train), 32, 40, 0):
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        collector.step()
        before = {name: torch.cat([p.detach().flatten().clone() for p in model[int(name)].parameters()])
                  for name in direct}
        optimizer.step()
        for name in direct:
            after = torch.cat([p.detach().flatten() for p in model[int(name)].parameters()])
            direct[name].append((after - before[name]).abs())
    doc = collector.document(classes=10)
    for name, updates in direct.items():
        measured = float(torch.cat(updates[:-1]).median())  # the collector sees each update at the next step()
        assert doc["layers"][name]["update"]["p50"] == pytest.approx(measured, rel=0.10)
        # Adam's step is about lr whatever the gradient: an SGD formula (lr * |g|) is far off
        assert doc["layers"][name]["update"]["p50"] > 5 * 1e-3 * doc["layers"][name]["weight_grad"]["p50"]


class TiedAndShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight  # tied
        self.block = nn.Linear(4, 4)
        self.again = self.block  # one module under two names
        self.scale = nn.Parameter(torch.ones(()))  # bare, on the model
        self.frozen = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.again(self.block(self.b(self.a(x))))) * self.scale


def test_ownership_plans_tied_and_shared_parameters_once():
    model = TiedAndShared()
    owned = ownership(model)
    assert owned.parameters == {ROOT: ["scale"], "a": ["a.weight", "a.bias"], "b": [],
                                "block": ["block.weight", "block.bias"]}
    assert owned.tied == {"b.weight": "a.weight", "again.weight": "block.weight", "again.bias": "block.bias"}
    names = sorted(n for names in owned.parameters.values() for n in names)
    assert names == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_plan_coverage_is_checked_and_keep_fp32_is_honoured():
    model = TiedAndShared()
    base = fixed_plan(model)
    with pytest.raises(InputError, match="scale.*keep_fp32"):
        Simulation(model, base.__class__(**{**base.__dict__, "parameters": {ROOT: []}}))
    with pytest.raises(InputError, match="no trainable parameter 'nope'"):
        Simulation(model, base.__class__(**{**base.__dict__, "parameters": {ROOT: ["nope"]}}))
    with pytest.raises(InputError, match="already stored"):
        Simulation(model, base.__class__(**{**base.__dict__, "keep_fp32": ("a.weight",)}))
    plan = base.__class__(**{**base.__dict__, "parameters": {ROOT: []}, "keep_fp32": ("scale",)})
    with Simulation(model, plan) as sim:
        optimizer = sim.optimizer(lr=0.1)
        groups = {g["name"]: g for g in optimizer.param_groups}
        assert [p for p in groups["keep_fp32"]["params"]] == [model.scale]
        assert str(groups["keep_fp32"]["weight_format"]) == "fp32"
        assert all(str(groups[n]["weight_format"]) == "fx8.4" for n in ("a", "block"))
        assert "b" not in groups  # stores nothing of its own: its weight is a's
        assert "parameter scale (keep_fp32)" in sim.kept_fp32()


def test_inputs_tuple_outputs_and_errors_are_rounded():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)
    model = nn.Sequential()
    model.add_module("rnn", lstm)
    plan = fixed_plan(model, "fx8.4")
    seen = {}
    lstm.register_forward_hook(lambda m, args, out: seen.update(args=args))  # after the rounding pre-hook
    x = torch.randn(2, 4, 3) * 3
    with Simulation(model, plan):
        out, (h, c) = model(x)
        grads = {}
        out.register_hook(lambda g: grads.update(out=g))
        (out.sum() * 0.01).backward()
    fx = parse_format("fx8.4")
    assert torch.equal(seen["args"][0], quantize(x, fx)) and not torch.equal(x, quantize(x, fx))
    for tensor in (out, h, c):
        assert torch.equal(tensor, quantize(tensor, fx))
    assert torch.equal(lstm.weight_ih_l0.grad, quantize(lstm.weight_ih_l0.grad, fx))
    assert grads["out"].abs().max() > 0


def test_prediction_is_the_argmax_of_the_rounded_input_with_ties_to_the_lowest_index():
    model = nn.Sequential(nn.Linear(2, 3))
    plan = Plan(layers={}, softmax_input=parse_format("fx4.0"), softmax_error=parse_format("fp32"))
    plan = Plan(**{**plan.__dict__, "keep_fp32": ("0.weight", "0.bias")})
    logits = torch.tensor([[0.0, 0.3, -2.0], [-1.2, 0.0, -0.1], [1.0, 0.6, 0.9], [5.0, 1.0, 0.0]])
    with Simulation(model, plan) as sim:
        predicted = sim.predict(logits)
    rounded = torch.round(logits - logits.max(dim=1, keepdim=True).values)  # fx4.0: integers, ties to even
    expected = [min(i for i, v in enumerate(row) if v == max(row)) for row in rounded.tolist()]
    assert predicted.tolist() == expected == [0, 1, 0, 0]


def test_train_check_refuses_a_plan_that_leaves_a_parameter_out(small_recipe, tmp_path):
    recipe = small_recipe()
    plan = tmp_path / "plan.yaml"
    assert run_cli("recommend", recipe, "-o", plan).exit_code == 0
    doc = yaml.safe_load(plan.read_text())
    doc["layers"]["2"]["parameters"] = ["2.weight"]
    plan.write_text(yaml.safe_dump(doc))
    result = run_cli("train-check", recipe, "--plan", plan, "-o", tmp_path / "report.json")
    assert result.exit_code == 2 and "2.bias" in result.stderr and "keep_fp32" in result.stderr
    assert not (tmp_path / "report.json").exists()
    doc["keep_fp32"] = ["2.bias"]
    plan.write_text(yaml.safe_dump(doc))
    result = run_cli("train-check", recipe, "--plan", plan, "--json")
    assert result.exit_code in (0, 1, 3)
    assert "parameter 2.bias (keep_fp32)" in result.json()["kept_fp32"]


def test_the_plans_momentum_format_stores_the_buffer():
    """The momentum buffer lives on its planned grid after every step (the float64
    reference: m = Q_m(Q_m(m * momentum) + g) with the gradient the simulation rounded)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    plan = fixed_plan(model, "fx12.8")
    layers = {name: {**fmts, "momentum": parse_format("fx6.4"), "weight_grad": parse_format("fp32")}
              for name, fmts in plan.layers.items()}
    plan = Plan(**{**plan.__dict__, "layers": layers})
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with Simulation(model, plan) as sim:
        optimizer = sim.optimizer(lr=0.1, momentum=0.9)
        assert {str(g["momentum_format"]) for g in optimizer.param_groups} == {"fx6.4"}
        expected = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = [p.grad.double() for p in model.parameters()]
            optimizer.step()
            for i, (m, g) in enumerate(zip(expected, grads, strict=True)):
                expected[i] = quantize(quantize(m * 0.9, "fx6.4").double() + g, "fx6.4").double()
        for p, m in zip(model.parameters(), expected, strict=True):
            assert torch.equal(optimizer.state[p]["momentum_buffer"].double(), m)


def test_stats_from_a_user_adamw_loop_give_the_recipes_weight_widths():
    """digits-adamw: the user's own loop (torch's AdamW at the peak lr, StatsCollector
    attached) and the recipe route (lpcli analyze) recommend the same weight formats."""
    recipe = load_recipe("digits-adamw")
    routed = recommend(analyze(recipe, steps=30))
    data = load_data(recipe.data, recipe.source)
    torch.manual_seed(recipe.training.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.003, betas=(0.9, 0.999), weight_decay=0.01)
    collector = StatsCollector(model, lr=0.003, optimizer=optimizer)
    for index in batch_indices(len(data.y_train), 32, 30, recipe.training.seed):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        collector.step()
        optimizer.step()
    mine = recommend(collector.document(classes=10))
    assert {n: str(f["weight"]) for n, f in mine.layers.items()} == \
        {n: str(f["weight"]) for n, f in routed.layers.items()}
    assert all(not isinstance(f["variance"], type(parse_format("fp32"))) for f in mine.layers.values())


class FailsOnLargeBatches(nn.Module):
    """Trains (batches of 32) and passes the first check (2 samples); raises on the test set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 100:
            raise ValueError("batch too large for this model")
        return self.fc(x)


def test_an_exception_in_evaluation_is_one_line_of_bad_input(small_recipe, tmp_path):
    recipe = small_recipe(model={"import": "test_simulation:FailsOnLargeBatches"},
                          training={"lr": 0.05, "batch_size": 32, "steps": 20, "analyze_steps": 3})
    out = tmp_path / "report.json"
    result = run_cli("train-check", recipe, "-o", out)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "model: the forward of test_simulation:FailsOnLargeBatches raised ValueError: batch too large" \
        in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
