"""KahanSGD against a float64 NumPy reference of the documented algorithm and rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpcli import kernels
from lpcli.formats import FixedPoint, parse_format
from lpcli.optim import KahanSGD, compensation_format
from lpcli.recommend import Rules, compensation_rule
from lpcli.stats import TensorSummary

from conftest import assert_diagnostics_change_no_bit, assert_same_run, run_optimizer


def q_fixed(v: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """Nearest-even fixed point in float64 (np.round rounds half to even); one zero, +0."""
    scaled = np.round(v.astype(np.float64) * 2.0**fmt.frac)
    clipped = np.clip(scaled, -(2 ** (fmt.width - 1)), 2 ** (fmt.width - 1) - 1) + 0.0
    return (clipped / 2.0**fmt.frac).astype(np.float32)


def f32(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).astype(np.float32)


def reference_run(w0, grads, lr, momentum, decay, wf, cf, kahan, nesterov=False, mf=None):
    """Each operation in float64, rounded to float32 as the float32 implementation does.

    The documented order: decay and Nesterov are a multiply then an add (two roundings);
    the momentum buffer starts at zero and is rounded onto ``mf`` after its multiply and
    after its add; a fixed-point compensation leaves ``y`` and ``t - w`` in float32.
    """
    qm = (lambda v: v) if mf is None else (lambda v: q_fixed(v, mf))
    w = q_fixed(w0, wf)
    c = np.zeros_like(w)
    buf = np.zeros_like(w)
    m32 = np.float64(np.float32(momentum))
    for g in grads:
        d = g if decay == 0 else f32(g.astype(np.float64) + f32(w * np.float64(np.float32(decay))))
        if momentum:
            buf = qm(f32(qm(f32(buf * m32)).astype(np.float64) + d))
            d = f32(d.astype(np.float64) + f32(buf * m32)) if nesterov else buf
        u = f32(d.astype(np.float64) * np.float64(np.float32(-lr)))
        if kahan:
            y = f32(u.astype(np.float64) - c)
            t = q_fixed(f32(w.astype(np.float64) + y), wf)
            c = q_fixed(f32(f32(t.astype(np.float64) - w) - y), cf)
            w = t
        else:
            w = q_fixed(f32(w.astype(np.float64) + u), wf)
    return w, c


@pytest.mark.parametrize("kahan", [True, False])
@pytest.mark.parametrize("momentum,decay,nesterov,mf", [
    (0.0, 0.0, False, None), (0.9, 0.0, False, None), (0.9, 1e-3, False, None),
    (0.9, 1e-3, True, None), (0.9, 0.0, False, "fx12.8"), (0.9, 1e-3, True, "fx10.7"),
])
@pytest.mark.parametrize("fmt", ["fx8.7", "fx12.10", "fx6.3"])
@pytest.mark.parametrize("foreach", [None, False])  # the C step (where built) and the per-tensor torch step
def test_fixed_point_trajectory_matches_float64_reference(kahan, momentum, decay, nesterov, mf, fmt, foreach):
    rng = np.random.default_rng(7)
    w0 = rng.normal(0, 0.3, size=(64, 33)).astype(np.float32)
    grads = [rng.normal(0, 0.05, size=w0.shape).astype(np.float32) for _ in range(200)]
    wf = parse_format(fmt)
    mfmt = None if mf is None else parse_format(mf)
    lr = 0.01
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = KahanSGD([p], lr=lr, momentum=momentum, weight_decay=decay, weight_format=wf, kahan=kahan,
                   nesterov=nesterov, momentum_format=mf, foreach=foreach)
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
    ref_w, ref_c = reference_run(w0, grads, lr, momentum, decay, wf, compensation_format(wf), kahan, nesterov, mfmt)
    assert np.array_equal(p.detach().numpy().view(np.int32), ref_w.view(np.int32))
    if kahan:
        assert np.array_equal(opt.state[p]["compensation"].numpy(), ref_c)


def test_compensation_format_covers_one_weight_lsb():
    wf = FixedPoint(8, 7)
    cf = compensation_format(wf)
    assert cf.width == wf.width
    assert cf.max_value < wf.step <= -cf.min_value
    assert compensation_format(parse_format("bf16")) == parse_format("bf16")


def test_small_updates_lost_by_plain_sgd_and_kept_by_kahan():
    wf = FixedPoint(8, 6)  # step 1/64; every update 1e-3 is below half a step
    grads = torch.full((100,), -0.1)
    results = {}
    for kahan in (False, True):
        p = torch.nn.Parameter(torch.zeros(100))
        opt = KahanSGD([p], lr=0.01, weight_format=wf, kahan=kahan)
        for _ in range(400):
            p.grad = grads.clone()
            opt.step()
        results[kahan] = (p.detach().clone(), opt.diagnostics()[0])
    plain_w, plain_d = results[False]
    kahan_w, kahan_d = results[True]
    assert torch.all(plain_w == 0)
    assert plain_d["lost_updates"] == 1.0 and plain_d["lost_mass"] == pytest.approx(1.0)
    # 400 updates of 1e-3 = 0.4: Kahan lands within one weight step of it.
    assert torch.all((kahan_w - 0.4).abs() <= wf.step)
    assert kahan_d["lost_mass"] < 0.05
    assert 0.9 < kahan_d["lost_updates"] < 1.0  # most single steps change nothing, yet nothing is lost


def test_fp32_format_matches_torch_sgd():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours = KahanSGD([a], lr=0.1, momentum=0.9, weight_decay=0.01, weight_format="fp32", kahan=False)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(20):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_weights_rounded_onto_format_at_start_and_saturation_counted():
    p = torch.nn.Parameter(torch.tensor([0.3, 5.0, -7.0, 0.01]))
    opt = KahanSGD([p], lr=0.1, weight_format="fx4.2")  # range [-2, 1.75], step 0.25
    assert p.detach().tolist() == [0.25, 1.75, -2.0, 0.0]
    assert opt.initial_saturated == 2


def test_rejects_bad_hyperparameters():
    p = torch.nn.Parameter(torch.zeros(2))
    for kwargs in ({"lr": 0.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "weight_decay": -1.0},
                   {"lr": 0.1, "nesterov": True}, {"lr": 0.1, "mode": "exact"},
                   {"lr": 0.1, "mode": "plain", "kahan": True}):
        with pytest.raises(ValueError):
            KahanSGD([p], **kwargs)


def test_block_formats_are_refused_for_optimizer_state():
    from lpcli import KahanAdamW

    p = torch.nn.Parameter(torch.zeros(64))
    for make in (lambda: KahanSGD([p], lr=0.1, momentum=0.9, momentum_format="mxfp6-e3m2"),
                 lambda: KahanAdamW([p], lr=0.1, moment_formats=("fp16", "mxfp8-e5m2"))):
        with pytest.raises(ValueError, match="block \\(MX\\) format: block formats apply to the operands"):
            make()


# --- torch-optimi ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Parameter `foreach` is deprecated")
@pytest.mark.parametrize("foreach", [True, False, None])
@pytest.mark.parametrize("momentum", [0.0, 0.875])
def test_bf16_kahan_bit_identical_to_torch_optimi(momentum, foreach):
    """optimi's SGD(kahan_sum=True) on bf16 parameters, 200 steps, against ours on float32
    tensors held on the bf16 grid. Our float-format Kahan step rounds y = u - c and t - w to
    the compensation format, which is optimi's operation order with c = -kahan_comp (see
    lpcli/optim.py). lr and momentum are bf16-exact: PyTorch rounds the scalar of an in-place
    bf16 op to bf16 first, so other values would compare two different learning rates.
    optimi's momentum buffer is bf16 (m = m * momentum, then m + g, each rounded): ours with
    momentum_format bf16. Weight decay is left out: optimi adds it to the bf16 gradient in
    place (one more bf16 rounding of g) where ours keeps g + w * decay in float32."""
    optimi = pytest.importorskip("optimi")
    gen = torch.Generator().manual_seed(1)
    w0 = (torch.randn(64, 47, generator=gen) * 0.5).bfloat16()
    theirs = torch.nn.Parameter(w0.clone())
    ours = torch.nn.Parameter(w0.float())
    ref = optimi.SGD([theirs], lr=0.0625, momentum=momentum, kahan_sum=True, foreach=bool(foreach))
    opt = KahanSGD([ours], lr=0.0625, momentum=momentum, weight_format="bf16", foreach=foreach,
                   momentum_format="bf16" if momentum else None)
    for _ in range(200):
        g = (torch.randn(64, 47, generator=gen) * 0.01).bfloat16()
        theirs.grad, ours.grad = g.clone(), g.float()
        ref.step()
        opt.step()
    assert torch.equal(theirs.detach().float(), ours.detach())
    assert torch.equal(-ref.state[theirs]["kahan_comp"].float(), opt.state[ours]["compensation"])
    if momentum:
        assert torch.equal(ref.state[theirs]["exp_avg"].float(), opt.state[ours]["momentum_buffer"])
    # not a vacuous match: most single steps change nothing, yet the run moved the weights
    assert not torch.equal(ours.detach(), w0.float())


# --- paths, modes, state --------------------------------------------------------------------

FORMATS = ["fx10.6", "bf16", "fp32", "dfx8", "e4m3"]
SHAPES = [(40, 130), (7,), (3, 50, 31), (1,)]  # two take the compiled step


def _run(fmt, mode, steps=30, foreach=True, momentum_format=None, split=None, **kwargs):
    """Several tensors, momentum + Nesterov + decay; returns params, optimizer."""
    options = dict(lr=0.01, momentum=0.9, weight_decay=1e-3, nesterov=True, weight_format=fmt, mode=mode,
                   momentum_format=momentum_format, seed=5, foreach=foreach) | kwargs
    return run_optimizer(lambda ps: KahanSGD(ps, **options), SHAPES, steps, split)




@pytest.mark.parametrize("mode", ["kahan", "plain", "stochastic"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_foreach_and_per_tensor_paths_are_bit_identical(fmt, mode):
    mf = {"fx10.6": "fx12.8", "bf16": "bf16", "dfx8": "dfx10"}.get(fmt)
    assert_same_run(_run(fmt, mode, foreach=True, momentum_format=mf),
                    _run(fmt, mode, foreach=False, momentum_format=mf))


NATIVE_FORMATS = ["fx10.6", "fx24.20", "bf16", "fp16", "fp8-e4m3", "e5m22", "e8m3", "fp32"]


@pytest.mark.parametrize("momentum_format", [None, "fx12.8", "bf16"])
@pytest.mark.parametrize("mode", ["kahan", "plain"])
@pytest.mark.parametrize("fmt", NATIVE_FORMATS)
def test_c_step_and_per_tensor_step_are_bit_identical(fmt, mode, momentum_format):
    if kernels._kernels is None:
        pytest.skip("the C kernels are not built")
    assert_same_run(_run(fmt, mode, foreach=None, momentum_format=momentum_format),
          _run(fmt, mode, foreach=False, momentum_format=momentum_format))


@pytest.mark.parametrize("options", [{}, {"nesterov": False}, {"weight_decay": 0.0},
                                     {"momentum": 0.0, "nesterov": False}, {"diagnostics": False},
                                     {"comp_format": "fx10.14"}])
def test_c_step_covers_each_option(options):
    if kernels._kernels is None:
        pytest.skip("the C kernels are not built")
    assert_same_run(_run("fx10.6", "kahan", foreach=None, **options), _run("fx10.6", "kahan", foreach=False, **options))


def test_c_step_in_pieces_on_several_threads(monkeypatch):
    if kernels._kernels is None:
        pytest.skip("the C kernels are not built")
    whole = _run("bf16", "kahan", foreach=None, momentum_format="bf16")
    monkeypatch.setattr(kernels, "_PIECE", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pieces = _run("bf16", "kahan", foreach=None, momentum_format="bf16")
    finally:
        torch.set_num_threads(threads)
    assert_same_run(whole, pieces)


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
@pytest.mark.parametrize("fmt", ["fx10.6", "bf16"])
def test_resume_from_state_dict_is_bit_identical(fmt, mode):
    mf = "fx12.8" if fmt == "fx10.6" else "bf16"
    assert_same_run(_run(fmt, mode, momentum_format=mf), _run(fmt, mode, momentum_format=mf, split=13))


def test_stochastic_rounding_keeps_small_updates_in_expectation_and_is_seeded():
    wf = FixedPoint(8, 6)  # step 1/64; updates of 1e-3 are lost by nearest rounding
    finals = []
    for seed in (0, 0, 1):
        p = torch.nn.Parameter(torch.zeros(2000))
        opt = KahanSGD([p], lr=0.01, weight_format=wf, mode="stochastic", seed=seed)
        for _ in range(400):
            p.grad = torch.full((2000,), -0.1)
            opt.step()
        finals.append(p.detach().clone())
    assert torch.equal(finals[0], finals[1]) and not torch.equal(finals[0], finals[2])
    assert finals[0].mean().item() == pytest.approx(0.4, abs=0.01)  # unbiased
    assert finals[0].std().item() > wf.step  # but noisy


def test_diagnostics_can_be_turned_off_and_report_last_step():
    p = torch.nn.Parameter(torch.zeros(100))
    q = torch.nn.Parameter(torch.zeros(100))
    off = KahanSGD([p], lr=0.01, weight_format="fx8.6", diagnostics=False)
    on = KahanSGD([q], lr=0.01, weight_format="fx8.6")
    assert_diagnostics_change_no_bit(off, on, p, q)
    d = on.diagnostics()[0]
    assert d["lost_updates_step"] in (0.0, 1.0) and 0 < d["lost_updates"] < 1


@pytest.mark.slow
@pytest.mark.parametrize("fmt,mf", [("fx10.6", "fx12.8"), ("bf16", "bf16")])
def test_compiled_step_matches_eager(fmt, mf):
    pytest.importorskip("torch._inductor")
    assert_same_run(_run(fmt, "kahan", momentum_format=mf), _run(fmt, "kahan", momentum_format=mf, compile=True))
    assert_same_run(_run(fmt, "plain", momentum_format=mf), _run(fmt, "plain", momentum_format=mf, compile=True))


def test_compensation_sized_from_the_updates_keeps_what_the_weight_width_drops():
    """fx7.7 weights, 2000 steps of small updates (log-normal, around 0.2 steps of the
    weight-width compensation fx7.13, all pushing one way): that compensation rounds a third
    of their sum away; one sized from the updates (lpcli.recommend.compensation_rule) loses
    what a float32 compensation does. (A constant update of 0.4 of its steps never moves the
    weight at all: the worst case, below.)"""
    wf = FixedPoint(7, 7)
    narrow = compensation_format(wf)
    generator = torch.Generator().manual_seed(0)
    updates = (0.2 * narrow.step * torch.exp(torch.randn(2000, 64, generator=generator))).float()
    summary = TensorSummary(torch.Generator().manual_seed(0))
    summary.add(updates)
    sized, why = compensation_rule(wf, summary.result(), Rules())
    assert narrow == FixedPoint(7, 13) and sized.frac > narrow.frac and "of non-zero updates" in why
    assert sized.max_value < wf.step <= -sized.min_value  # its range is still one weight LSB
    lost = {}
    for comp in (narrow, sized, parse_format("fp32")):
        p = torch.nn.Parameter(torch.zeros(64))
        opt = KahanSGD([p], lr=1.0, weight_format=wf, comp_format=comp)
        for step in range(2000):
            p.grad = -updates[step]
            opt.step()
        lost[str(comp)] = opt.diagnostics()[0]["lost_mass"]
    assert lost[str(narrow)] > 0.3
    assert lost[str(sized)] <= lost["fp32"] + 0.005 < 0.05
    p = torch.nn.Parameter(torch.zeros(64))
    opt = KahanSGD([p], lr=1.0, weight_format=wf, comp_format=narrow)
    for _ in range(2000):
        p.grad = torch.full((64,), -0.4 * narrow.step)
        opt.step()
    assert not p.detach().any() and opt.diagnostics()[0]["lost_mass"] == 1.0


@pytest.mark.parametrize("share", [0.01, 0.05])
def test_compensation_step_drops_at_most_the_stated_share_of_updates(share):
    rng = np.random.default_rng(3)
    updates = torch.from_numpy(np.exp(rng.normal(-9, 2, 20000))).float()  # log-normal |u|, 7 binades wide
    summary = TensorSummary(torch.Generator().manual_seed(0))
    summary.add(updates)
    wf = FixedPoint(8, 7)
    comp, _ = compensation_rule(wf, summary.result(), Rules(underflow=share))
    below = float((updates < comp.step / 2).float().mean())
    coarser = float((updates < comp.step).float().mean())  # one fraction bit fewer
    assert below <= share < coarser


def test_weights_that_round_to_zero_at_the_start_are_counted():
    torch.manual_seed(0)
    w = torch.randn(1000) * 0.1
    expected = float(((w != 0) & (w.abs() < 0.125)).float().mean())  # fx4.2: step 1/4, half a step 1/8
    opt = KahanSGD([torch.nn.Parameter(w.clone())], lr=0.1, weight_format="fx4.2")
    assert opt.diagnostics()[0]["weights_flushed_at_start"] == pytest.approx(expected) and expected > 0.7


def test_the_compensation_counts_what_it_drops_and_what_it_clips():
    """fx7.7 weights, constant updates of 0.4 steps of the weight-width compensation fx7.13:
    every residue rounds to zero there, none in a compensation sized for them. Weights at
    the top of fx4.2 pushed further up: the residue exceeds the compensation's range of one
    LSB at every step. Every path counts the same (tests above compare the diagnostics)."""
    wf = FixedPoint(7, 7)
    narrow = compensation_format(wf)
    u = 0.4 * narrow.step
    shares = {}
    for comp in (narrow, compensation_format(wf, narrow.frac + 3)):
        p = torch.nn.Parameter(torch.zeros(16))
        opt = KahanSGD([p], lr=1.0, weight_format=wf, comp_format=comp)
        for _ in range(50):
            p.grad = torch.full((16,), -u)
            opt.step()
        shares[comp] = (opt.diagnostics()[0]["compensation_dropped"], opt.diagnostics()[0]["compensation_saturated"])
    assert shares[narrow] == (1.0, 0.0)
    assert shares[compensation_format(wf, narrow.frac + 3)] == (0.0, 0.0)
    p = torch.nn.Parameter(torch.full((8,), 1.75))
    opt = KahanSGD([p], lr=1.0, weight_format="fx4.2", foreach=False)
    for _ in range(5):
        p.grad = torch.full((8,), -0.3)
        opt.step()
    assert opt.diagnostics()[0]["compensation_saturated"] == 1.0 and float(p.detach()[0]) == 1.75
    plain = KahanSGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0, weight_format="fx4.2", mode="plain")
    assert plain.diagnostics()[0]["compensation_dropped"] is None


def test_the_path_is_chosen_once_per_group_and_again_when_a_setting_changes(monkeypatch):
    from lpcli.store import LowPrecisionOptimizer

    chosen = []
    original = LowPrecisionOptimizer._choose_backend

    def spy(self, group, device):
        chosen.append(group["name"])
        return original(self, group, device)

    monkeypatch.setattr(LowPrecisionOptimizer, "_choose_backend", spy)
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    opt = KahanSGD([{"params": [a], "name": "a"}, {"params": [b], "name": "b"}], lr=0.01, weight_format="fx8.6")
    for step in range(6):
        a.grad, b.grad = torch.randn(50), torch.randn(50)
        if step == 3:
            opt.param_groups[0]["lr"] = 0.001  # a schedule: the path stays
        if step == 4:
            opt.param_groups[1]["mode"] = "stochastic"  # the C step cannot round stochastically
        opt.step()
    assert chosen == ["a", "b", "b"]
    assert opt._backends[id(opt.param_groups[1])][1] == "per-tensor"
