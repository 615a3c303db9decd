"""Muon for the recurrent weight matrices, AdamW for the rest, as one optimiser the Trainer and schedulers drive."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from charlm.precision import cpu_has_bf16


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the 2-D matrices of the hidden layers (the recurrent layers' input and recurrent
    weights), torch.optim.AdamW on every other parameter (the layers named in `adamw_layers`: embedding and
    decoder; biases), as Muon's authors use it. Muon scales its orthogonalised update to AdamW's size (`match_rms_adamw`), so one `lr`
    and one schedule serve both: the two optimisers' parameter groups are this optimiser's groups.

    `params` are (name, parameter) pairs: `module.named_parameters()`, as charlm's LightningModule passes.
    """

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], lr: float = 2e-3, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.99), momentum: float = 0.95,
                 adamw_layers: tuple[str, ...] = ("embed", "decoder")):
        named = list(params)
        if not all(isinstance(item, tuple) and len(item) == 2 for item in named):
            raise TypeError("MuonAdamW takes (name, parameter) pairs: pass model.named_parameters()")
        is_matrix = [p.ndim == 2 and not any(layer in name.split(".") for layer in adamw_layers) for name, p in named]
        matrices = [p for (_, p), m in zip(named, is_matrix) if m]
        others = [p for (_, p), m in zip(named, is_matrix) if not m]
        if not matrices:
            raise ValueError(f"MuonAdamW found no 2-D parameter outside the layers {list(adamw_layers)}")
        on_cpu_without_bf16 = matrices[0].device.type == "cpu" and not cpu_has_bf16()
        muon = Float32Muon if on_cpu_without_bf16 else torch.optim.Muon
        self.parts = [muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                       adjust_lr_fn="match_rms_adamw")]
        if others:
            self.parts.append(torch.optim.AdamW(others, lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        super().__init__([p for _, p in named], {"lr": lr})
        self.param_groups = [group for part in self.parts for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, saved in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)


class Float32Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (its momentum, Newton-Schulz coefficients and `match_rms_adamw` lr scale;
    the same state), orthogonalised in float32. Why not torch's own on such CPUs: it runs Newton-Schulz in
    bf16, which a CPU without bf16 units emulates: five iterations on a 2 x 200 LSTM's 800 x 200 matrix
    take 0.34 s in bf16 against 0.019 s in float32 on an AMD EPYC (AVX2), many times the rest of the step."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str = "match_rms_adamw"):
        if adjust_lr_fn != "match_rms_adamw":
            raise ValueError("Float32Muon scales its update as match_rms_adamw only")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            a, b, c = group["ns_coefficients"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                x = (p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf).float()
                tall = x.size(0) > x.size(1)
                x = x.T if tall else x
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x.T if tall else x, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[:2])))
        return loss


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (the global L2 norm, the same result), cheaper on CPU.

    Why not torch's own: on CPU its vector_norm is about half as fast as BLAS dot products, and it
    multiplies every gradient even when the norm is within max_norm. Here the norm comes from dot products
    and is read on the host (free on CPU) to skip the multiply when nothing is clipped: at the course's size
    0.35 -> 0.13 ms of a ~7 ms step (`python bench/throughput.py --tricks` measures it). On other devices,
    or for gradients not all float32, torch's own.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads or any(g.device.type != "cpu" or g.dtype != torch.float32 or g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    flat = [g.reshape(-1) for g in grads]
    norm = torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()
    coef = max_norm / (norm.item() + 1e-6)  # torch's epsilon
    if not coef >= 1.0:  # NaN and inf norms too, as torch's clip_grad_norm_ scales by them
        torch._foreach_mul_(grads, coef)
    return norm
