"""AWD-LSTM's regularisers: each does what it must in training, nothing in evaluation, and gradients flow."""

import pytest
import torch
from hydra.utils import instantiate

from charlm.data import BPTTWindows, WindowLoader
from charlm.module import LanguageModel
from charlm.nets import LSTMLM
from charlm.nets.dropout import dropout_masks
from conftest import compose_config


def layer_input(net: LSTMLM, x: torch.Tensor, k: int = 0) -> torch.Tensor:
    """What layer k of `net` reads in one forward pass of x."""
    seen = []
    hook = net.lstm[k].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    net(x)
    hook.remove()
    return seen[0]


def test_locked_dropout_keeps_one_mask_over_a_windows_time_steps():
    x = torch.randint(0, 11, (3, 9))
    for locked in (True, False):
        torch.manual_seed(0)
        net = LSTMLM(11, 32, 2, dropout=0.5, locked_dropout=locked).train()
        dropped = layer_input(net, x) == 0  # (time, batch, width)
        same_over_time = bool((dropped == dropped[:1]).all())
        assert same_over_time == locked and 0.3 < dropped.float().mean() < 0.7
    torch.manual_seed(1)
    assert not torch.equal(layer_input(net, x), layer_input(net, x))  # a new mask each window


def test_embedding_dropout_drops_whole_symbols():
    torch.manual_seed(0)
    net = LSTMLM(40, 16, 1, dropout=0.0, dropout_embedding=0.5).train()
    x = torch.randint(0, 40, (4, 50))
    seen = layer_input(net, x)
    rows = seen.transpose(0, 1).reshape(-1, 16)  # (batch x time, width)
    for symbol in x.unique():
        vectors = rows[x.flatten() == symbol]
        expected = net.embed.weight[symbol].detach()
        assert all(torch.equal(v, vectors[0]) for v in vectors)  # every occurrence alike
        assert torch.equal(vectors[0], torch.zeros(16)) or torch.allclose(vectors[0], 2 * expected, rtol=1e-4)
    dropped = sum(bool((rows[x.flatten() == s] == 0).all()) for s in x.unique())
    assert 0 < dropped < len(x.unique())


def test_weight_drop_drops_recurrent_weights_in_training_only_and_leaves_the_module_as_it_was():
    torch.manual_seed(0)
    net = LSTMLM(11, 16, 2, dropout=0.0, weight_drop=0.5)
    plain = LSTMLM(11, 16, 2, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randint(0, 11, (3, 8))
    logits, _ = net.train()(x)
    assert not torch.allclose(logits, plain.train()(x)[0])
    logits.sum().backward()
    grad = net.lstm[0].weight_hh_l0.grad
    assert 0.3 < (grad == 0).float().mean() < 0.7  # dropped connections get no gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.lstm[0].weight_hh_l0, torch.nn.Parameter)
    torch.testing.assert_close(net.eval()(x)[0], plain.eval()(x)[0])


def test_nothing_is_dropped_in_evaluation_and_places_take_their_own_rates():
    torch.manual_seed(0)
    options = dict(dropout=0.3, dropout_input=0.1, dropout_hidden=0.6, dropout_output=0.0, locked_dropout=True,
                   dropout_embedding=0.2, weight_drop=0.4)
    net, plain = LSTMLM(11, 64, 2, **options), LSTMLM(11, 64, 2, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = torch.randint(0, 11, (4, 12))
    torch.testing.assert_close(net.eval()(x)[0], plain.eval()(x)[0])
    assert (net.p_input, net.p_hidden, net.p_output) == (0.1, 0.6, 0.0)
    masks = net.train()._masks(x.t().shape)
    assert set(masks) == {"embedding", 0, 1, ("weight", 0), ("weight", 1)}  # no output mask at rate 0
    assert masks[1].shape == (1, 4, 64) and masks["embedding"].shape == (11, 1)
    assert (masks[1] == 0).float().mean() > (masks[0] == 0).float().mean()


def test_tied_weights_share_the_embedding_and_size_the_last_layer_to_it():
    net = LSTMLM(30, 64, 3, embedding_size=16, tie_weights=True)
    assert net.decoder.weight is net.embed.weight
    assert [layer.hidden_size for layer in net.lstm] == [64, 64, 16] and net.lstm[0].input_size == 16
    logits, (hs, cs) = net(torch.randint(0, 30, (2, 5)))
    assert logits.shape == (2, 5, 30) and [h.shape[-1] for h in hs] == [64, 64, 16]
    logits.sum().backward()
    assert net.embed.weight.grad is not None
    untied = LSTMLM(30, 64, 2, embedding_size=16)
    assert untied.decoder.weight.shape == (30, 64) and untied.lstm[0].input_size == 16


def test_masks_drawn_together_are_the_masks_drawn_one_by_one():
    like = torch.ones(1)
    torch.manual_seed(3)
    together = dropout_masks(like, [(10, 6, 8), (4, 3), (7,)], [0.2, 0.5, 0.3])
    torch.manual_seed(3)
    apart = [dropout_masks(like, [shape], [p])[0] for shape, p in [((10, 6, 8), 0.2), ((4, 3), 0.5), ((7,), 0.3)]]
    assert all(torch.equal(a, b) for a, b in zip(together, apart))


@pytest.mark.parametrize("alpha, beta", [(2.0, 0.0), (0.0, 1.0), (2.0, 1.0)])
def test_ar_and_tar_add_their_penalties_to_the_training_loss_only(alpha, beta):
    model = LanguageModel(LSTMLM(8, hidden_size=16, dropout=0.3), list("abcdefgh"), ar_alpha=alpha, tar_beta=beta)
    batch = (torch.randint(0, 8, (4, 10)), torch.randint(0, 8, (4, 10)))
    torch.manual_seed(0)
    nll, _, penalty = model._nll(batch, None, penalty=True)
    torch.manual_seed(0)
    _, _, (raw, dropped) = model.net(batch[0], None, outputs=True)
    expected = alpha * dropped.pow(2).mean() + beta * (raw[1:] - raw[:-1]).pow(2).mean()
    torch.testing.assert_close(penalty, expected)
    torch.manual_seed(0)
    assert model.training_step(batch, 0).item() == pytest.approx((nll + penalty).item(), rel=1e-6)


def test_variable_length_windows_cover_each_epoch_in_the_same_count_and_repeat_with_the_seed():
    streams = torch.arange(20 * 4001).view(4, -1) % 50
    fixed = BPTTWindows(streams, 40)
    windows = BPTTWindows(streams, 40, variable_length=True, seed=7)
    lengths = [y.size(1) for _, y in (windows[i] for i in range(len(windows)))]
    assert len(windows) == len(fixed) and sum(lengths) == streams.size(1) - 1
    assert len(set(lengths)) > 10 and min(lengths) >= 5 and max(lengths) <= 40 * 1.1 + 40
    assert sum(n < 30 for n in lengths) > 0  # the seq_len / 2 draws
    again = BPTTWindows(streams, 40, variable_length=True, seed=7)
    assert again.ends == windows.ends
    windows.set_epoch(1)
    assert windows.ends != again.ends and len(windows) == len(fixed)
    loader = WindowLoader(again)  # two passes are epochs 0 and 1; a restored loader continues in its epoch
    first, second = [y.size(1) for _, y in loader], [y.size(1) for _, y in loader]
    assert first == lengths and second != first
    restored = WindowLoader(BPTTWindows(streams, 40, variable_length=True, seed=7))
    restored.load_state_dict({"position": 5, "epoch": 1})
    assert [y.size(1) for _, y in restored] == second[5:]


def test_a_windows_learning_rate_is_scaled_by_its_length_for_its_step_only():
    model = LanguageModel(LSTMLM(4, hidden_size=8), list("abcd"), seq_len=10)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.5)

    def closure():  # Lightning's: the forward and backward of a window of 15 steps
        model.window_len = 15
        weight.grad = torch.ones(1)
        return torch.zeros(())

    model.optimizer_step(0, 0, optimizer, closure)
    assert weight.item() == pytest.approx(-0.75)  # stepped at 0.5 x 15 / 10
    assert optimizer.param_groups[0]["lr"] == 0.5  # and no longer


def test_awd_lstm_char_composes_to_the_recipe():
    cfg = compose_config("experiment=awd_lstm_char")
    m, d = cfg.model, cfg.data
    assert (m.num_layers, m.hidden_size, m.embedding_size, m.tie_weights) == (3, 1000, 200, True)
    assert (d.seq_len, d.batch_size, d.test_batch_size, d.variable_length) == (150, 128, 1, True)
    assert (m.dropout_output, m.dropout_hidden, m.dropout_input, m.dropout_embedding, m.weight_drop) == (
        0.1, 0.25, 0.1, 0.0, 0.5)
    assert m.locked_dropout and (cfg.loss.ar_alpha, cfg.loss.tar_beta) == (0.0, 0.0)
    assert cfg.optimizer._target_ == "torch.optim.Adam" and (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        0.002, 1.2e-6)
    assert list(cfg.scheduler.milestones) == [300, 400] and cfg.scheduler.gamma == 0.1
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (500, 0.25)
    net = instantiate(cfg.model, vocab_size=50)
    assert net.decoder.weight is net.embed.weight
