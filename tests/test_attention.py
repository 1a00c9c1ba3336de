"""Simulated attention (lpcli.attention with the simulator's rounding): the same numbers as
torch's attention where every format is float32, the NUMERICS rounding points against an
independent reference built from torch's fixed-point fake quantization, masks, counts,
the plan and stats files, the rule, and the CLI on a transformer written here."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lpcli.errors import InputError
from lpcli.formats import FixedPoint, Float32, FloatFormat, parse_format
from lpcli.kernels import quantize
from lpcli.plan import plan_from_document
from lpcli.recommend import Rules, attention_probs_format, fixed_tensor_format, recommend_attention
from lpcli.simulate import Simulator
from lpcli.simulation import Simulation
from lpcli.stats import StatsCollector, validate_stats

FP32 = {"input": Float32(), "probs": Float32(), "input_error": Float32(), "probs_error": Float32()}


class SelfAttention(nn.Module):
    """A user's attention block: no parameters of its own, projections as children."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _fq(x: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    """Fixed-point nearest-even rounding by torch's own fake quantization (the oracle)."""
    return torch.fake_quantize_per_tensor_affine(x, 2.0 ** -fmt.frac, 0, -2 ** (fmt.width - 1),
                                                 2 ** (fmt.width - 1) - 1)


def _masks(kind: str, n: int) -> tuple[torch.Tensor | None, bool]:
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(n, n, generator=g) > 0.3
        mask[2] = False  # a row with no key at all
        return mask, False
    if kind == "float":
        return torch.where(torch.rand(n, n, generator=g) > 0.3, 0.0, float("-inf")), False
    if kind == "causal":
        return None, True
    return None, False


@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal"])
def test_float32_formats_reproduce_torch_attention(kind):
    torch.manual_seed(0)
    model = SelfAttention()
    x = torch.randn(3, 6, 8, requires_grad=True)
    mask, causal = _masks(kind, 6)
    y0 = model(x, mask, causal)
    g0 = torch.autograd.grad(y0.square().sum(), x)[0]
    sim = Simulator(model, {}, attention={"(root)": FP32})
    try:
        y1 = model(x, mask, causal)
        g1 = torch.autograd.grad(y1.square().sum(), x)[0]
    finally:
        sim.remove()
    assert sim.attention["(root)"].keys == 6
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    if kind == "bool":
        assert torch.equal(y1[:, :, 2], torch.zeros_like(y1[:, :, 2]))  # no key: zeros, as torch


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_with_masks_and_weights(need_weights):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 6, 8, requires_grad=True)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6) == 0  # True: attend, like the padding's type
    causal = ~causal
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        y0, w0 = mha(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        g0 = torch.autograd.grad(y0.square().sum(), x)[0]
        sim = Simulator(mha, {}, attention={"(root)": FP32})
        y1, w1 = mha(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        g1 = torch.autograd.grad(y1.square().sum(), x)[0]
        sim.remove()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    counts = sim.counts()["attention"]["(root)"]
    assert counts["keys"] == 6


def test_transformer_decoder_and_encoder_run_through_the_simulation():
    torch.manual_seed(2)
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                           dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    y0 = model(src, tgt, tgt_mask=causal)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(names) == 3  # encoder self, decoder self, decoder cross
    sim = Simulator(model, {}, attention={n: FP32 for n in names})
    try:
        y1 = model(src, tgt, tgt_mask=causal)
    finally:
        sim.remove()
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    assert {n: sim.attention[n].keys for n in names} == dict(zip(names, [5, 4, 5], strict=True))


def _reference(q, k, v, grad_out, fmts, mask):
    """NUMERICS' attention rounding written out with fake quantization: forward rounds the
    finite S - rowmax(S) and P; backward rounds dP and dS (from the rounded P)."""
    scores = (q * (1 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    shifted = scores - scores.amax(-1, keepdim=True)
    finite = torch.isfinite(shifted)
    s_q = torch.where(finite, _fq(torch.where(finite, shifted, 0.0), fmts["input"]), float("-inf"))
    p = _fq(torch.softmax(s_q, -1), fmts["probs"])
    out = p @ v
    dp = _fq(grad_out @ v.transpose(-2, -1), fmts["probs_error"])
    ds = _fq(p * (dp - (dp * p).sum(-1, keepdim=True)), fmts["input_error"])
    return out, ds, p, s_q, finite, shifted


def test_rounding_points_against_fake_quantization():
    torch.manual_seed(4)
    fmts = {"input": FixedPoint(5, 2), "probs": FixedPoint(5, 4), "input_error": FixedPoint(10, 12),
            "probs_error": FixedPoint(8, 8)}
    q, k, v = (torch.randn(2, 2, 7, 4) * 2 for _ in range(3))
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(5)) > 0.25
    mask.fill_diagonal_(True)
    grad_out = torch.randn(2, 2, 7, 4) * 0.05
    out_ref, ds_ref, p_ref, s_ref, finite, shifted = _reference(q, k, v, grad_out, fmts, mask)

    class Core(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    core = Core()
    sim = Simulator(core, {}, attention={"(root)": fmts})
    qg = q.clone().requires_grad_(True)
    try:
        out = core(qg, k, v)
        out.backward(grad_out)
    finally:
        sim.remove()
    assert torch.equal(out, out_ref)
    # dS reaches q through the scale and K: compare there.
    torch.testing.assert_close(qg.grad, (ds_ref @ k) / math.sqrt(4), rtol=1e-6, atol=1e-7)
    counts = sim.counts()["attention"]["(root)"]
    unmasked = int(finite.sum())
    assert counts["input"]["elements"] == unmasked == counts["probs"]["elements"]
    exact_p = torch.softmax(s_ref, -1)
    assert counts["probs"]["nonzero"] == int((exact_p != 0).sum())
    assert counts["probs"]["underflow"] == int(((exact_p != 0) & (p_ref == 0)).sum())
    assert counts["probs"]["underflow"] > 0  # the test's formats do flush some keys
    assert counts["input"]["saturated"] == int(((shifted < -4) & finite).sum()) > 0


def test_masked_keys_stay_masked_under_a_narrow_input_format():
    """fx3.0 saturates at -4: a masked -inf must not become -4 (a key with weight e^-4)."""
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 1, 5, 4) * 3, torch.randn(1, 1, 5, 4) * 3, torch.randn(1, 1, 5, 4)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[:, 0] = False

    class Core(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    core = Core()
    sim = Simulator(core, {}, attention={"(root)": {"input": FixedPoint(3, 0)}})
    try:
        out = core(q, k, v)
    finally:
        sim.remove()
    expected = torch.softmax(quantize(_shifted(q, k, mask), FixedPoint(3, 0)).masked_fill(~mask, float("-inf")),
                             -1) @ v
    torch.testing.assert_close(out, expected)
    assert sim.counts()["attention"]["(root)"]["input"]["elements"] == 20  # the 5 masked entries left out


def _shifted(q, k, mask):
    s = (q / 2) @ k.transpose(-2, -1)
    s = s.masked_fill(~mask, float("-inf"))
    return (s - s.amax(-1, keepdim=True)).masked_fill(~mask, 0.0)


def test_renormalized_rows_sum_to_one():
    torch.manual_seed(7)
    model = SelfAttention()
    x = torch.randn(2, 16, 8) * 3
    weights = {}
    sim = Simulator(model, {}, attention={"(root)": {"probs": FixedPoint(4, 3)}}, attention_rows="renormalized")
    point = sim.attention["(root)"]
    original = point.round

    def spy(role, t, masked=None):
        q = original(role, t, masked)
        if role == "probs":
            weights["rounded"] = q
        return q
    point.round = spy
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        sim.remove()
    rounded = weights["rounded"]
    assert not torch.allclose(rounded.sum(-1), torch.ones(2, 2, 16))  # rounding broke the rows
    b, n, d = x.shape
    _, _, v = model.qkv(x).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(out, (rounded / rounded.sum(-1, keepdim=True)) @ v)


def test_plan_round_trip_keeps_attention_and_attention_only_entries():
    doc = {
        "lpcli": {"kind": "plan", "version": 1},
        "layers": {
            "qkv": {"weight": "fx8.6", "activation": "fx8.4", "error": "fx8.10", "weight_grad": "fx8.10"},
            "(root)": {"attention": {"input": "fx6.2", "probs": "fx7.6"}},
        },
        "softmax_input": "fx6.2", "softmax_error": "fx5.4", "attention_rows": "renormalized",
    }
    plan = plan_from_document(doc, "p.yaml")
    assert list(plan.layers) == ["qkv"]
    assert plan.attention == {"(root)": {"input": FixedPoint(6, 2), "probs": FixedPoint(7, 6),
                                         "input_error": Float32(), "probs_error": Float32()}}
    again = plan_from_document(plan.document(), "p.yaml")
    assert again.attention == plan.attention and again.attention_rows == "renormalized"
    assert again.document()["layers"]["(root)"] == {"attention": {"input": "fx6.2", "probs": "fx7.6",
                                                                  "input_error": "fp32", "probs_error": "fp32"}}


@pytest.mark.parametrize("bad, field", [
    ({"attention": {"probs": "fx99"}}, "layers.(root).attention.probs"),
    ({"attention": {"scores": "fx8.4"}}, "layers.(root).attention.scores"),
])
def test_bad_attention_entries_name_the_field(bad, field):
    doc = {"lpcli": {"kind": "plan", "version": 1},
           "layers": {"qkv": {"weight": "fx8.6", "activation": "fp32", "error": "fp32", "weight_grad": "fp32"},
                      "(root)": bad},
           "softmax_input": "fp32", "softmax_error": "fp32"}
    with pytest.raises(InputError) as err:
        plan_from_document(doc, "p.yaml")
    assert field in str(err.value)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x).transpose(1, 2).flatten(2).mean(1))


def test_stats_record_attention_by_the_innermost_module():
    torch.manual_seed(8)
    model = Block()
    collector = StatsCollector(model, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(4, 10, 8), torch.randint(0, 3, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        collector.step()
        opt.step()
    with torch.no_grad():
        model(torch.randn(2, 30, 8))  # not training: not recorded
    collector.remove()
    doc = collector.document(3)
    entry = doc["attention"]["attn"]
    assert entry["module"] == "SelfAttention" and entry["keys"] == 10
    for role in ("input", "probs", "input_error", "probs_error"):
        assert entry[role]["rms"] > 0
    assert entry["probs"]["absmax"] <= 1.0
    assert validate_stats(yaml.safe_load(yaml.safe_dump(doc)), "s.yaml")["attention"]["attn"]["keys"] == 10
    doc["attention"]["attn"]["keys"] = 0
    with pytest.raises(InputError, match="attention.attn.keys"):
        validate_stats(doc, "s.yaml")
    # After remove(), attention runs as torch's again.
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


@pytest.mark.parametrize("keys", [16, 64, 256, 1000])
def test_probability_formats_resolve_one_over_n_and_grow_with_n(keys):
    fixed, _ = attention_probs_format(keys, Rules(), "fixed")
    small, _ = attention_probs_format(keys, Rules(), "float")
    # Probabilities around 1/N, as a nearly uniform row holds them: each must come back
    # within an eighth of 1/N (fixed point, a step of at most 1/(4N)) or, as a float, an
    # eighth of itself (2 mantissa bits) or half the smallest subnormal (at most 1/(4N)),
    # and none may flush.
    p = torch.linspace(0.5, 1.5, 101, dtype=torch.float64).float() / keys
    for fmt, bound in ((fixed, torch.full_like(p, 1 / (8 * keys))), (small, (p / 8).clamp(min=small.step / 2))):
        q = quantize(p, fmt)
        assert bool((q > 0).all())
        assert bool(((q - p).abs() <= bound * (1 + 1e-6)).all())
    assert fixed.frac == math.ceil(math.log2(keys)) + 2 and fixed.integer_bits == 1
    assert small.step <= 1 / (2 * keys) and small.max_value >= 1
    # With no margin a step of 1/N sends half a key's range of p to the same value.
    bare, _ = attention_probs_format(keys, Rules(attention_probs_margin=0), "fixed")
    assert quantize(torch.tensor([0.6 / keys, 1.4 / keys]), bare).unique().numel() == 1 or keys & (keys - 1)


def test_probability_widths_grow_with_the_key_count():
    widths = [attention_probs_format(n, Rules(), family)[0].width for family in ("fixed", "float")
              for n in (16, 64, 256)]
    assert widths[0] < widths[1] < widths[2] and widths[3] <= widths[4] <= widths[5] and widths[3] < widths[5]


def test_recommend_attention_gives_every_role_a_reason():
    entry = {"keys": 64, "input": {"absmax": 6.0, "rms": 1.2, "p999": 5.0, "p50": 1.0, "p90": 2.0, "p99": 3.0},
             "probs": {"absmax": 0.3, "rms": 0.02},
             "input_error": {"absmax": 1e-3, "rms": 1e-4, "p999": 8e-4, "p50": 5e-5, "p90": 2e-4, "p99": 5e-4,
                             "log2_hist": {"lowest": -20, "counts": [1, 2, 4, 8, 16, 32, 64, 128, 64, 32, 8]}},
             "probs_error": {}}
    for family in ("fixed", "float"):
        formats, reasons = recommend_attention(entry, Rules(family=family))
        assert set(formats) == set(reasons) == {"input", "probs", "input_error", "probs_error"}
        assert isinstance(formats["probs_error"], Float32)
        assert "64 keys" in reasons["probs"] and "64 keys" in reasons["input"]
        assert quantize(torch.tensor([-5.0]), formats["input"]).item() <= -5.0 + 0.5
    assert recommend_attention(entry, Rules())[0]["probs"] == parse_format("fx9.8")
    # dS: the step from the rms (1e-4 / 2^4: F = 18), not the 1%-underflow rule, which a tail
    # of tiny entries (5% of them near 2^-40, keys with P ~ 0) would push to F = 39 (and a
    # 24-bit cap).
    tail = {**entry["input_error"], "log2_hist": {"lowest": -40, "counts": [50] + [0] * 19 + [100, 200, 300, 300]}}
    assert fixed_tensor_format("error", tail, {"p50": 0.0}, Rules())[0].width == 24
    assert recommend_attention({**entry, "input_error": tail}, Rules())[0]["input_error"].frac == 18
    assert isinstance(recommend_attention(entry, Rules(family="float"))[0]["probs"], FloatFormat)


MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class TokenEncoder(nn.Module):
        """Token ids -> one nn.TransformerEncoderLayer -> mean -> classes; id 0 is padding."""

        def __init__(self, vocab=20, d=16, heads=2, classes=4, length=10):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
            self.encoder = nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            h = self.encoder(self.embed(x) + self.pos, src_key_padding_mask=x == 0)
            return self.head(h.mean(dim=1))
''')


def test_external_transformer_through_the_cli(tmp_path, cli, monkeypatch):
    """analyze -> recommend -> train-check on a model written here, token ids from an npz."""
    (tmp_path / "token_model.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 20, size=(600, 10))
    y = (x == 7).sum(axis=1).clip(0, 3)  # how often token 7 occurs: attention over every position
    x[:, 8:][rng.random((600, 2)) < 0.5] = 0  # padding at the end of some rows
    np.savez(tmp_path / "tokens.npz", x=x, y=y)
    recipe = tmp_path / "tokens.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"import": "token_model:TokenEncoder"},
        "data": {"name": "npz", "path": "tokens.npz", "classes": 4},
        "training": {"optimizer": "adamw", "lr": 0.01, "batch_size": 32, "steps": 60, "analyze_steps": 10,
                     "seed": 0, "weight_decay": 0.0},
    }))
    monkeypatch.setattr(sys, "path", list(sys.path))
    stats, plan = tmp_path / "stats.yaml", tmp_path / "plan.yaml"
    assert cli("analyze", recipe, "-o", stats).exit_code == 0
    assert yaml.safe_load(stats.read_text())["attention"]["encoder.self_attn"]["keys"] == 10
    assert cli("recommend", recipe, "--stats", stats, "-o", plan).exit_code == 0
    doc = yaml.safe_load(plan.read_text())
    attention = doc["layers"]["encoder.self_attn"]["attention"]
    assert set(attention) == {"input", "probs", "input_error", "probs_error"}
    assert attention["probs"] == "fx7.6"  # 10 keys: F = ceil(log2 10) + 2
    assert "10 keys" in doc["reasons"]["encoder.self_attn"]["attention"]["probs"]
    result = cli("train-check", recipe, "--plan", plan, "--json", "--quiet")
    assert result.exit_code in (0, 1, 3), result.stderr
    report = result.json()
    diag = report["attention"]["encoder.self_attn"]
    for key in ("probs_flushed", "input_saturated", "probs_error_underflow", "input_error_underflow"):
        assert set(diag[key]) == {"plain", "kahan"}
        assert all(v is None or 0.0 <= v <= 1.0 for v in diag[key].values())
    assert diag["keys"]["kahan"] == 10
    assert not any("attention in encoder.self_attn" in item for item in report["kept_fp32"])


def test_kept_fp32_lists_attention_roles_left_in_float32():
    model = Block()
    doc = {"lpcli": {"kind": "plan", "version": 1},
           "layers": {name: {"weight": "fx8.6", "activation": "fp32", "error": "fp32", "weight_grad": "fp32"}
                      for name in ("attn.qkv", "head")},
           "softmax_input": "fp32", "softmax_error": "fp32"}
    doc["layers"]["attn"] = {"attention": {"probs": "fx7.6"}}
    plan = plan_from_document(doc, "p.yaml")
    with Simulation(model, plan) as sim:
        model(torch.randn(2, 5, 8))
        kept = sim.kept_fp32()
    assert "attention in attn: input, input_error, probs_error" in kept


def test_unknown_attention_module_is_an_input_error():
    doc = {"lpcli": {"kind": "plan", "version": 1},
           "layers": {"0": {"weight": "fx8.6", "activation": "fp32", "error": "fp32", "weight_grad": "fp32"},
                      "nowhere": {"attention": {"probs": "fx7.6"}}},
           "softmax_input": "fp32", "softmax_error": "fp32"}
    plan = plan_from_document(doc, "p.yaml")
    with pytest.raises(InputError, match="layers.nowhere"):
        Simulation(nn.Sequential(nn.Linear(2, 2)), plan)


class AttentionFailsOnLargeBatches(nn.Module):
    """Digits as 8 tokens of 8 features through SelfAttention; raises, inside the attention
    block, on the test set (more than 100 samples), after its attention ran."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(8, 2)
        self.attn.register_forward_hook(self.check)
        self.head = nn.Linear(64, 10)

    @staticmethod
    def check(module, args, output):
        if len(output) > 100:
            raise ValueError("batch too large for this model")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x.reshape(-1, 8, 8)).transpose(1, 2).flatten(1))


def test_an_exception_inside_simulated_attention_is_one_line_and_leaves_torch_as_it_was(small_recipe, tmp_path,
                                                                                        cli):
    recipe = small_recipe(model={"import": "test_attention:AttentionFailsOnLargeBatches"},
                          training={"lr": 0.05, "batch_size": 32, "steps": 20, "analyze_steps": 3})
    out = tmp_path / "report.json"
    saved = F.scaled_dot_product_attention, F.softmax, F.multi_head_attention_forward
    result = cli("train-check", recipe, "-o", out)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "raised ValueError: batch too large" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    assert (F.scaled_dot_product_attention, F.softmax, F.multi_head_attention_forward) == saved
    assert not torch.overrides._get_current_function_mode_stack()  # no mode left active
