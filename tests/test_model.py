"""The network and the LightningModule: carried state, truncated gradients, learning, schedule."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from charlm.module import LanguageModel
from charlm.nets import LSTMLM, detach
from charlm.schedules import ZarembaDecay


def test_shapes_and_uniform_init():
    net = LSTMLM(50, hidden_size=16, num_layers=2, dropout=0.2, init_range=0.1)
    logits, (h, c) = net(torch.zeros(3, 7, dtype=torch.long))
    assert logits.shape == (3, 7, 50) and [t.shape for t in (*h, *c)] == [(1, 3, 16)] * 4
    assert all(p.abs().max() <= 0.1 for p in net.parameters())


def test_carried_state_changes_the_next_windows_loss():
    torch.manual_seed(0)
    net = LSTMLM(10, 16, 2, 0.0).eval()
    x = torch.randint(0, 10, (2, 8))
    y = torch.randint(0, 10, (2, 8))
    _, state = net(torch.randint(0, 10, (2, 8)))
    fresh = F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten())
    carried = F.cross_entropy(net(x, state)[0].flatten(0, 1), y.flatten())
    assert not torch.isclose(fresh, carried)


def test_detach_stops_the_gradient_at_the_window_boundary():
    torch.manual_seed(0)
    net = LSTMLM(10, 8, 1, 0.0)
    emb = net.embed.weight
    _, state = net(torch.tensor([[1, 2, 3]]))  # window 1 uses symbols 1..3
    logits, _ = net(torch.tensor([[4, 5]]), detach(state))
    logits.sum().backward()
    assert emb.grad[1:4].abs().sum() == 0  # no gradient flows back into window 1
    assert emb.grad[4:6].abs().sum() > 0
    net.zero_grad()
    logits, _ = net(torch.tensor([[4, 5]]), state)  # without detach it would
    logits.sum().backward()
    assert emb.grad[1:4].abs().sum() > 0


def test_zaremba_schedule_keeps_lr_then_divides_every_epoch():
    f = ZarembaDecay(max_epoch=4, decay=2)
    assert [f(e) for e in range(7)] == [1, 1, 1, 1, 1, 0.5, 0.25]
    assert all(ZarembaDecay(4, 2)(e) == 1 for e in range(2))  # the course's 2 epochs never decay


def test_tiny_model_overfits_a_tiny_text():
    torch.manual_seed(0)
    text = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1] * 16)
    model = LanguageModel(LSTMLM(5, hidden_size=32, num_layers=1, dropout=0.0), list("abcde"),
                          optimizer=partial(torch.optim.Adam, lr=0.01))
    opt = model.configure_optimizers()
    x, y = text[:-1].view(1, -1), text[1:].view(1, -1)
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * math.log(5)


def test_split_nll_is_weighted_by_symbols_not_a_mean_of_window_means():
    from charlm.module import TokenNLL

    metric = TokenNLL()
    metric.update(torch.tensor(1.0), 30)  # a full window
    metric.update(torch.tensor(2.0), 10)  # the last, shorter window
    assert metric.compute().item() == pytest.approx(1.25)


def test_a_one_cycle_laid_over_fewer_steps_takes_effect_at_the_next_step():
    from charlm.schedules import OneCycle, one_cycle, set_length, zaremba

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = one_cycle(opt, total_steps=100, anneal_strategy="linear")["scheduler"]
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(OneCycle(100, anneal_strategy="linear")(50))
    assert set_length(sched, 51)  # the step about to be taken is the last one: it trains at the final rate
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 1000)
    assert not set_length(zaremba(opt, total_steps=100)["scheduler"], 10)  # an epoch schedule keeps its shape
