"""GRULM and MogrifierLM: the networks' contract, the Mogrifier as the paper defines it, LSTMLM's dropout options."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from charlm import nets
from charlm.nets import GRULM, MogrifierLM
from charlm.nets.mogrifier import MogrifierLSTMLayer, mogrify
from conftest import ROOT

V = 13
NETS = {"gru": GRULM, "mogrifier": MogrifierLM, "mogrifier_full": lambda *a, **k: MogrifierLM(*a, rank=0, **k)}


def make(kind: str, *args, seed: int = 0, **options):
    torch.manual_seed(seed)
    return NETS[kind](V, *args, **options)


def layers(net):
    return net.gru if isinstance(net, GRULM) else net.layers


def layer_input(net, x: torch.Tensor, k: int = 0) -> torch.Tensor:
    """What layer k reads (time, batch, width) in one forward pass of x."""
    seen = []
    hook = layers(net)[k].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    net(x)
    hook.remove()
    return seen[0]


def leaves(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [*state["h"], *state["c"]]


# --- the contract -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", NETS)
def test_shapes_of_forward_outputs_and_step_and_parameters_within_init_range(kind):
    net = make(kind, 16, 3, init_range=0.05)
    x = torch.randint(0, V, (4, 7))
    logits, state, (raw, dropped) = net.train()(x, outputs=True)
    assert logits.shape == (4, 7, V) and raw.shape == dropped.shape == (7, 4, 16)
    assert [t.shape for t in leaves(state)] == [(1, 4, 16)] * len(leaves(state))
    step_logits, step_state = net.eval().step(x[:, 0], state)
    assert step_logits.shape == (4, V) and [t.shape for t in leaves(step_state)] == [t.shape for t in leaves(state)]
    names = [n for n, _ in net.named_parameters()]
    assert names[0] == "embed.weight" and names[-2:] == ["decoder.weight", "decoder.bias"]
    assert all(p.abs().max() <= 0.05 for p in net.parameters())


def test_the_states_are_a_tuple_per_layer_for_the_gru_and_a_dict_for_the_mogrifier():
    x = torch.randint(0, V, (2, 3))
    _, state = make("gru", 8, 3)(x)
    assert type(state) is tuple and len(state) == 3 and all(isinstance(h, torch.Tensor) for h in state)
    _, state = make("mogrifier", 8, 3)(x)
    assert set(state) == {"h", "c"} and all(type(v) is tuple and len(v) == 3 for v in state.values())
    detached = nets.detach(state)
    assert set(detached) == {"h", "c"} and not any(t.requires_grad for t in leaves(detached))


@pytest.mark.parametrize("kind", NETS)
def test_step_gives_forwards_numbers_on_one_step_from_any_state(kind):
    net = make(kind, 16, 2).eval()
    x = torch.randint(0, V, (3, 5))
    with torch.no_grad():
        _, state = net(x)
        for start in (None, state):
            logits, after = net(x[:, :1], start)
            step_logits, step_after = net.step(x[:, 0], start)
            torch.testing.assert_close(step_logits, logits[:, 0])
            for a, b in zip(leaves(step_after), leaves(after)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", NETS)
def test_carrying_the_state_across_two_calls_is_one_call_over_both(kind):
    net = make(kind, 16, 2).eval()
    x = torch.randint(0, V, (3, 9))
    with torch.no_grad():
        whole, state = net(x)
        first, mid = net(x[:, :4])
        second, end = net(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for a, b in zip(leaves(end), leaves(state)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["gru", "mogrifier"])
def test_tied_weights_share_the_embedding_and_size_the_last_layer_to_it(kind):
    net = make(kind, 32, 2, embedding_size=8, tie_weights=True)
    assert net.decoder.weight is net.embed.weight
    assert [layer.hidden_size for layer in layers(net)] == [32, 8] and layers(net)[0].input_size == 8
    logits, _ = net(torch.randint(0, V, (2, 4)))
    logits.sum().backward()
    assert logits.shape == (2, 4, V) and net.embed.weight.grad is not None


@pytest.mark.parametrize("kind", ["gru", "mogrifier"])
def test_every_parameter_learns(kind):
    net = make(kind, 8, 2, dropout=0.3, locked_dropout=True, dropout_embedding=0.1, weight_drop=0.3).train()
    logits, _, (raw, dropped) = net(torch.randint(0, V, (3, 6)), outputs=True)
    (logits.sum() + dropped.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# --- LSTMLM's dropout options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gru", "mogrifier"])
def test_locked_masks_are_shared_by_a_windows_steps_and_the_others_are_not(kind):
    x = torch.randint(0, V, (3, 9))
    for locked in (True, False):
        net = make(kind, 32, 2, dropout=0.5, locked_dropout=locked).train()
        for k in (0, 1):
            dropped = layer_input(net, x, k) == 0
            assert bool((dropped == dropped[:1]).all()) == locked and 0.3 < dropped.float().mean() < 0.7


@pytest.mark.parametrize("kind", ["gru", "mogrifier"])
def test_nothing_is_dropped_in_evaluation(kind):
    net = make(kind, 16, 2, dropout=0.5, locked_dropout=True, dropout_embedding=0.3, weight_drop=0.5)
    plain = type(net)(V, 16, 2, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = torch.randint(0, V, (3, 6))
    torch.testing.assert_close(net.eval()(x)[0], plain.eval()(x)[0])
    assert not torch.allclose(net.train()(x)[0], plain.train()(x)[0])
    _, _, (raw, dropped) = net.eval()(x, outputs=True)
    assert torch.equal(raw, dropped)


@pytest.mark.parametrize("kind", ["gru", "mogrifier"])
def test_weight_drop_drops_the_hidden_to_hidden_product_in_training_only(kind):
    net = make(kind, 16, 2, dropout=0.0, weight_drop=0.5)
    plain = type(net)(V, 16, 2, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = torch.randint(0, V, (3, 5))
    # From the zero state, the first step's hidden-to-hidden product is zero whatever the weights: the same.
    torch.testing.assert_close(net.train()(x[:, :1])[0], plain(x[:, :1])[0])
    logits, _ = net(x)
    assert not torch.allclose(logits[:, 1:], plain(x)[0][:, 1:])
    logits.sum().backward()
    hh = layers(net)[0].weight_hh if kind == "mogrifier" else layers(net)[0].weight_hh_l0
    assert 0.3 < (hh.grad == 0).float().mean() < 0.7 and isinstance(hh, torch.nn.Parameter)
    torch.testing.assert_close(net.eval()(x)[0], plain.eval()(x)[0])


# --- the Mogrifier, as the paper defines it -------------------------------------------------------------------------

def lstm_by_cells(net: MogrifierLM, x: torch.Tensor, state=None):
    """The network's numbers with its layers as plain LSTMs, step by step through torch.lstm_cell."""
    out = net.embed.weight[x.t()]
    hs, cs = [], []
    for k, layer in enumerate(net.layers):
        h, c = (torch.zeros(x.size(0), layer.hidden_size),) * 2 if state is None else (state["h"][k][0], state["c"][k][0])
        steps = []
        for t in range(x.size(1)):
            h, c = torch.lstm_cell(out[t], (h, c), layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh)
            steps.append(h)
        out = torch.stack(steps)
        hs.append(h[None])
        cs.append(c[None])
    return net.decoder(out).transpose(0, 1), {"h": tuple(hs), "c": tuple(cs)}


def test_zero_rounds_is_torchs_lstm_on_the_same_weights_over_steps_layers_and_a_carried_state():
    net = make("mogrifier", 16, 3, rounds=0, embedding_size=8).eval()
    assert not any(len(layer.rounds) for layer in net.layers)
    x = torch.randint(0, V, (3, 6))
    with torch.no_grad():
        logits, state = net(x[:, :4])
        logits, state = net(x[:, 4:], state)
        expected, expected_state = lstm_by_cells(net, x[:, :4])
        expected, expected_state = lstm_by_cells(net, x[:, 4:], expected_state)
        torch.testing.assert_close(logits, expected)
        for a, b in zip(leaves(state), leaves(expected_state)):
            torch.testing.assert_close(a, b)
        lstm = torch.nn.LSTM(8, 16)  # the gate layout is torch's: nn.LSTM reads the same weights alike
        lstm.load_state_dict({f"{k}_l0": v for k, v in net.layers[0].state_dict().items()})
        torch.testing.assert_close(lstm(net.embed.weight[x.t()])[0], layer_input(net, x, 1))


def round_matrix(r) -> torch.Tensor:
    return r.left @ r.right if hasattr(r, "left") else r.weight


def zero_matrices_and_set_biases(layer: MogrifierLSTMLayer, biases) -> None:
    with torch.no_grad():
        for r, b in zip(layer.rounds, biases):
            for p in r.parameters():
                p.zero_()
            r.bias.fill_(b)


@pytest.mark.parametrize("rank", [0, 3])
def test_the_gates_are_twice_a_sigmoid_each_round_its_own(rank):
    torch.manual_seed(0)
    layer = MogrifierLSTMLayer(6, 5, rounds=4, rank=rank)
    for p in layer.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x, h = torch.randn(2, 6), torch.randn(2, 5)
    zero_matrices_and_set_biases(layer, [0.0] * 4)
    gated_x, gated_h = mogrify(x, h, [r.factors() for r in layer.rounds])
    torch.testing.assert_close((gated_x, gated_h), (x, h))  # 2 sigmoid(0) = 1: the identity
    biases = [0.3, -1.2, 2.0, 0.7]
    zero_matrices_and_set_biases(layer, biases)
    gated_x, gated_h = mogrify(x, h, [r.factors() for r in layer.rounds])
    s = [2 * 1 / (1 + math.exp(-b)) for b in biases]
    torch.testing.assert_close(gated_x, x * s[0] * s[2])  # rounds 1 and 3 gate x
    torch.testing.assert_close(gated_h, h * s[1] * s[3])  # rounds 2 and 4 gate h
    # and the cell is the LSTM on the gated pair, from the ungated c
    c = torch.randn(2, 5)
    _, h_out, c_out = layer(x[None], h, c)
    expected = torch.lstm_cell(gated_x, (gated_h, c), layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh)
    torch.testing.assert_close((h_out, c_out), expected)


@pytest.mark.parametrize("rank", [0, 3])
def test_rounds_gate_x_first_then_alternate_each_reading_the_latest_other(rank):
    torch.manual_seed(1)
    layer = MogrifierLSTMLayer(6, 5, rounds=5, rank=rank)
    for p in layer.parameters():
        torch.nn.init.uniform_(p, -0.8, 0.8)
    x, h = torch.randn(2, 6), torch.randn(2, 5)
    factors = [r.factors() for r in layer.rounds]
    one_x, one_h = mogrify(x, h, factors[:1])
    assert torch.equal(one_h, h) and not torch.allclose(one_x, x)  # rounds=1 changes x only
    two_x, two_h = mogrify(x, h, factors[:2])
    assert torch.equal(two_x, one_x) and not torch.allclose(two_h, h)  # rounds=2 changes both
    # x^i = 2 sig(Q^i h^{i-1} + b) * x^{i-2} (odd i), h^i = 2 sig(R^i x^{i-1} + b) * h^{i-2} (even i)
    ex, eh = x, h
    for i, r in enumerate(layer.rounds, start=1):
        if i % 2:
            ex = 2 * torch.sigmoid(eh @ round_matrix(r).T + r.bias) * ex
        else:
            eh = 2 * torch.sigmoid(ex @ round_matrix(r).T + r.bias) * eh
    torch.testing.assert_close(mogrify(x, h, factors), (ex, eh))


def test_each_round_has_its_own_matrix_full_or_low_rank():
    def count(net):
        return sum(p.numel() for layer in net.layers for p in layer.rounds.parameters())

    x_size, h_size = 8, 16  # round 1 maps h to a gate over x, round 2 x to one over h, ...
    full = [count(MogrifierLM(V, h_size, 1, embedding_size=x_size, rounds=r, rank=0)) for r in range(5)]
    assert full == [0, 136, 280, 416, 560]  # 16*8+8, then + 8*16+16, ...
    low = MogrifierLM(V, h_size, 1, embedding_size=x_size, rounds=4, rank=3)
    assert count(low) == 2 * (3 * (8 + 16) + 8) + 2 * (3 * (8 + 16) + 16)
    rounds = low.layers[0].rounds
    assert (rounds[0].left.shape, rounds[0].right.shape) == ((x_size, 3), (3, h_size))  # Q = Q_left Q_right
    assert (rounds[1].left.shape, rounds[1].right.shape) == ((h_size, 3), (3, x_size))  # R = R_left R_right
    params = [p for r in rounds for p in r.parameters()]
    assert len({id(p) for p in params}) == len(params) == 12  # nothing shared between rounds


# --- the configs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("gru", GRULM), ("mogrifier", MogrifierLM)])
def test_the_model_configs_name_every_option_at_its_default(name, cls):
    import inspect

    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    assert nets.locate(spec["_target_"]) is cls
    assert isinstance(nets.build(spec, V), cls)
    spec.pop("_target_")
    assert spec == {k: p.default for k, p in inspect.signature(cls).parameters.items() if k != "vocab_size"}
