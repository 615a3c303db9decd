"""One LSTM layer, forward and backward: oneDNN's fused kernel (what nn.LSTM and the project run on CPU)
against a hand-written layer in torch ops (one input projection for all steps, one matrix product a step
each way, the weight gradients as three large products at the end).

    python bench/lstm_layer.py                    # the course's layer: 10 steps x batch 20, 200 units
    python bench/lstm_layer.py 100 64 200         # steps, batch, units
    python bench/lstm_layer.py --verbose          # oneDNN's own primitive times for one call of each way

Both run on the same weights and inputs (checked against each other first) and alternate, several rounds,
with the project's allocator setting (cpu.keep_freed_memory); the figure is microseconds per forward +
backward. --verbose prints oneDNN's log of one forward and one
backward (primitive, implementation, milliseconds): what the kernel itself takes, against the whole
op timed here, the rest being PyTorch's glue around it (descriptors, buffers, weight layouts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from charlm.train import keep_freed_memory


class HandLSTM(torch.autograd.Function):
    """A time-major LSTM layer with PyTorch's gate order (i, f, g, o) and a hand-written backward."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        gates = torch.addmm(b_ih + b_hh, x.reshape(steps * batch, -1), w_ih.t()).view(steps, batch, 4, hidden)
        hs, cs = x.new_empty(steps + 1, batch, hidden), x.new_empty(steps + 1, batch, hidden)
        tanh_c = x.new_empty(steps, batch, hidden)
        hs[0], cs[0] = h0, c0
        w_hh_t = w_hh.t()
        for t in range(steps):
            g = gates[t]
            g.view(batch, -1).addmm_(hs[t], w_hh_t)
            g[:, :2].sigmoid_()
            g[:, 2].tanh_()
            g[:, 3].sigmoid_()
            torch.mul(g[:, 1], cs[t], out=cs[t + 1]).addcmul_(g[:, 0], g[:, 2])
            torch.mul(g[:, 3], torch.tanh(cs[t + 1], out=tanh_c[t]), out=hs[t + 1])
        ctx.save_for_backward(x, w_ih, w_hh, gates, hs, cs, tanh_c)
        return hs[1:], hs[steps], cs[steps]

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, gates, hs, cs, tanh_c = ctx.saved_tensors
        steps, batch, _ = x.shape
        i, f, g, o = gates.unbind(2)
        # each step's factors at once, so that a step of the recurrence is one product and four multiplies
        dc_dh = o * (1 - tanh_c * tanh_c)
        dgates = torch.empty_like(gates)
        torch.mul(o * (1 - o), tanh_c, out=dgates[:, :, 3])  # times dh, in place, gives d(o's input)
        ifg = torch.stack((g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)), dim=2)  # times dc
        dh = d_out[-1] if d_hn is None else d_out[-1] + d_hn
        dc_next = d_cn  # the cell gradient carried back, already multiplied by the next step's forget gate
        for t in range(steps - 1, -1, -1):
            if t < steps - 1:
                dh = torch.addmm(d_out[t], dgates[t + 1].view(batch, -1), w_hh)
            dc = dh * dc_dh[t] if dc_next is None else torch.addcmul(dc_next, dh, dc_dh[t])
            dgates[t, :, 3].mul_(dh)
            torch.mul(dc.unsqueeze(1), ifg[t], out=dgates[t, :, :3])
            dc_next = dc * f[t]
        flat = dgates.view(steps * batch, -1)
        dx = torch.mm(flat, w_ih).view_as(x)
        dh0 = torch.mm(dgates[0].view(batch, -1), w_hh)
        db = flat.sum(0)
        return (dx, dh0, dc_next, torch.mm(flat.t(), x.reshape(steps * batch, -1)),
                torch.mm(flat.t(), hs[:-1].reshape(steps * batch, -1)), db, db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sizes", type=int, nargs="*", default=[10, 20, 200], help="steps batch units")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="forward + backward calls timed per round")
    parser.add_argument("--verbose", action="store_true", help="oneDNN's log of one call of each way")
    args = parser.parse_args()
    # as the project trains: without it, whichever layer runs second faults in the pages the first one's
    # temporaries left the heap with (oneDNN's layer measured 2.6 ms here, 3.7-4.2 ms after the hand one)
    keep_freed_memory()
    steps, batch, units = args.sizes
    torch.manual_seed(0)
    weights = torch.nn.LSTM(units, units).all_weights[0]
    x = torch.randn(steps, batch, units, requires_grad=True)
    h0, c0 = torch.randn(batch, units) * 0.1, torch.randn(batch, units) * 0.1
    d_out = torch.randn(steps, batch, units)

    def onednn() -> torch.Tensor:
        out = torch.lstm(x, (h0[None], c0[None]), weights, True, 1, 0.0, True, False, False)[0]
        out.backward(d_out)
        return out

    def hand() -> torch.Tensor:
        out = HandLSTM.apply(x, h0, c0, *weights)[0]
        out.backward(d_out)
        return out

    ways = {"onednn": onednn, "hand": hand}
    results = {}
    for name, fn in ways.items():
        for p in (x, *weights):
            p.grad = None
        results[name] = [fn().detach(), x.grad.clone(), *(w.grad.clone() for w in weights)]
    error = max((a - b).abs().max().item() for a, b in zip(*results.values()))
    print(f"{steps} steps x batch {batch} x {units} units: largest difference, output and gradients: {error:.1e}")
    if args.verbose:
        for name, fn in ways.items():
            fn()  # warm
            print(f"--- {name}: one forward + backward under ONEDNN_VERBOSE", flush=True)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        return
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.rounds):
        for name, fn in list(ways.items())[::1 if r % 2 == 0 else -1]:  # each way first in every other round
            for _ in range(10):
                fn()
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    print("  ".join(f"{k} {statistics.median(v):,.0f} us" for k, v in times.items())
          + f"   hand / onednn {statistics.median(h / o for h, o in zip(times['hand'], times['onednn'])):.2f}")


if __name__ == "__main__":
    main()
