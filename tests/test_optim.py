"""MuonAdamW: which parameters each part takes, one schedule for both, its state through a checkpoint; the
CPU gradient clipping."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from charlm.module import LanguageModel
from charlm.nets import LSTMLM
from charlm.optim import Float32Muon, MuonAdamW, clip_grad_norm
from charlm.schedules import one_cycle


def model():
    torch.manual_seed(0)
    return LanguageModel(LSTMLM(8, hidden_size=16, num_layers=2, dropout=0.0), list("abcdefgh"),
                         optimizer=partial(MuonAdamW, lr=0.03))


def train(m, steps: int):
    opt = m.configure_optimizers()
    sched = one_cycle(opt, total_steps=100, pct_start=0.3, div_factor=25)["scheduler"]
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3, 2, 1] * 4).view(2, -1)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(m(x[:, :-1])[0].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return opt, losses


def test_lstm_matrices_go_to_muon_and_the_rest_to_adamw():
    m = model()
    opt = m.configure_optimizers()
    muon, adamw = opt.parts
    names = {id(p): n for n, p in m.named_parameters()}
    assert isinstance(muon, (torch.optim.Muon, Float32Muon)) and isinstance(adamw, torch.optim.AdamW)
    assert sorted(names[id(p)] for p in muon.param_groups[0]["params"]) == sorted(
        n for n, p in m.named_parameters() if n.startswith("net.lstm.") and ".weight" in n)
    assert {names[id(p)] for p in adamw.param_groups[0]["params"]} >= {"net.embed.weight", "net.decoder.weight",
                                                                       "net.lstm.0.bias_ih_l0"}


def test_one_schedule_drives_both_parts_and_the_model_learns():
    opt, _ = train(model(), 15)
    lrs = [part.param_groups[0]["lr"] for part in opt.parts]
    assert lrs[0] == lrs[1] and 0.003 < lrs[0] < 0.03  # warming up: between the cycle's start and its peak
    _, losses = train(model(), 100)
    assert losses[-1] < 0.5 * losses[0]


def test_state_round_trips_and_resumes_identically():
    m1 = model()
    opt1, _ = train(m1, 5)
    m2 = model()
    m2.load_state_dict(m1.state_dict())
    opt2 = m2.configure_optimizers()
    opt2.load_state_dict(opt1.state_dict())
    for a, b in zip(opt1.parts, opt2.parts):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(
            torch.equal(sa[k][f], sb[k][f]) for k in sa for f in sa[k] if torch.is_tensor(sa[k][f]))


def test_float32_muon_steps_as_torch_muon_does_and_shares_its_state():
    """Float32Muon (Muon on CPUs without bf16) gives torch.optim.Muon's update, up to torch's bf16 rounding,
    and either loads the other's state, so a checkpoint moves between such machines."""
    torch.manual_seed(0)
    weights = [torch.randn(40, 10), torch.randn(10, 30)]
    params = {name: [w.clone().requires_grad_() for w in weights] for name in ("torch", "fp32")}
    opts = {"torch": torch.optim.Muon(params["torch"], lr=0.01, adjust_lr_fn="match_rms_adamw"),
            "fp32": Float32Muon(params["fp32"], lr=0.01)}
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g.clone()
            opt.step()
    for ours, theirs, start in zip(params["fp32"], params["torch"], weights):
        moved = (theirs - start).norm()
        assert (ours - theirs).norm() < 0.05 * moved  # bf16 keeps ~3 significant digits
    for src, dst in (("torch", "fp32"), ("fp32", "torch")):
        opt = type(opts[dst])([w.clone().requires_grad_() for w in weights], lr=0.01, adjust_lr_fn="match_rms_adamw")
        opt.load_state_dict(opts[src].state_dict())
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()  # takes the other's momentum buffers and group settings


def test_unnamed_parameters_or_no_matrix_are_refused():
    net = torch.nn.LSTM(4, 4)
    with pytest.raises(TypeError, match="named_parameters"):
        MuonAdamW(net.parameters())
    with pytest.raises(ValueError, match="no 2-D parameter"):
        MuonAdamW(torch.nn.Embedding(3, 3).named_parameters(prefix="embed"))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_cpu_gradient_clipping_matches_torch(max_norm):
    """charlm.optim.clip_grad_norm (the module's clipping) gives torch's norm and clipped gradients."""
    torch.manual_seed(0)
    nets = [LSTMLM(11, 16, 2, dropout=0.0) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randint(0, 11, (3, 5))
    for net in nets:
        net(x)[0].pow(2).mean().backward()
    norm = clip_grad_norm(nets[0].parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm)
    torch.testing.assert_close(norm, expected)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_cpu_gradient_clipping_passes_a_non_finite_norm_on():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not torch.isfinite(clip_grad_norm([p], 1.0))
    assert not torch.isfinite(p.grad).all()  # as torch's: the divergence check then stops the run
