"""AdamW for the CPU training jobs, without ``torch.optim``'s start-up cost.

Building the first ``torch.optim.Optimizer`` in a process imports ``torch._dynamo`` (its methods are wrapped to
disable compilation): 1.1-1.7 s on a 2-core Xeon once fewseg and the model are loaded (``bench/optim_bench.py``),
paid by each of the demo's nine training jobs (base training and two prompt phases per novel class). On CPU torch
runs AdamW one tensor at a time (``torch.optim.adam._single_tensor_adam``); :class:`AdamW` does the same arithmetic
in the same order, so it trains the same weights to the bit (``tests/test_optim.py`` checks it against
``torch.optim.AdamW``), and its ``state_dict`` has torch's layout, so a checkpoint written by either resumes in the
other. On a GPU :func:`adamw` returns torch's own, whose multi-tensor kernels matter there and whose start-up is
negligible next to a GPU job.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# What torch's AdamW stores in each parameter group besides lr, betas, eps and weight_decay: written so that torch
# can load this optimizer's state, ignored when loading torch's (this class does only their default).
_TORCH_GROUP_DEFAULTS = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
    "fused": None, "decoupled_weight_decay": True,
}  # fmt: skip


class AdamW:
    """Decoupled-weight-decay Adam over dense real tensors, bit-identical to ``torch.optim.AdamW`` on CPU.

    Takes parameters or parameter groups (dicts with ``params`` and any of ``lr``, ``betas``, ``eps``,
    ``weight_decay``) like torch's; ``param_groups[i]["lr"]`` may be changed between steps (the schedules do).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        groups = list(params)
        if not groups:
            raise ValueError("AdamW got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": float(lr), "betas": tuple(betas), "eps": float(eps), "weight_decay": float(weight_decay)}
        self.param_groups: list[dict[str, Any]] = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        params = self._params()
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("AdamW takes tensors or groups of tensors (not named parameters)")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("AdamW got the same parameter twice")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            if group["lr"] < 0 or group["eps"] < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
                raise ValueError(
                    f"AdamW: invalid lr, eps or betas in a group: {group['lr']}, {group['eps']}, {group['betas']}"
                )
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return state

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, in torch's order of operations."""
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise ValueError("fewseg's AdamW takes dense real tensors only")
                grad, state = p.grad, self._state_of(p)
                state["step"] += 1
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                step_size = lr / (1 - beta1**step)
                denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: per-parameter state keyed by the parameter's index over all groups."""
        index = {p: i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**_TORCH_GROUP_DEFAULTS, **group, "params": list(range(start, start + n))})
            start += n
        # The tensors themselves, as torch returns them: torch.save copies them, and a clone would double the memory.
        state = {index[p]: dict(s) for p, s in self.state.items() if p in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this class's or torch.optim.AdamW's ``state_dict``; the groups must hold as many parameters."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match these parameter groups (different sizes)")
        if any(old.get("amsgrad") or old.get("maximize") for old in saved):
            raise ValueError("optimizer state uses amsgrad or maximize, which fewseg's AdamW does not do")
        for group, old in zip(self.param_groups, saved, strict=True):
            for key in ("lr", "betas", "eps", "weight_decay"):
                if key in old:
                    group[key] = tuple(old[key]) if key == "betas" else old[key]
        ids = [i for g in saved for i in g["params"]]
        self.state = {}
        for i, p in zip(ids, self._params(), strict=True):
            if i in state_dict["state"]:
                s = state_dict["state"][i]
                self.state[p] = {
                    "step": torch.as_tensor(s["step"], dtype=torch.float32).detach().clone().cpu(),
                    "exp_avg": s["exp_avg"].detach().to(p.device, p.dtype).clone(),
                    "exp_avg_sq": s["exp_avg_sq"].detach().to(p.device, p.dtype).clone(),
                }


Optimizer = AdamW | torch.optim.Optimizer


def adamw(params: Iterable[torch.Tensor] | Iterable[dict], device: torch.device | str, **settings: Any) -> Optimizer:
    """AdamW for parameters on ``device``: :class:`AdamW` on CPU, ``torch.optim.AdamW`` elsewhere."""
    if torch.device(device).type == "cpu":
        return AdamW(params, **settings)
    return torch.optim.AdamW(params, **settings)
