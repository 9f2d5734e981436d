"""fewseg's CPU AdamW against torch.optim.AdamW: the same weights to the bit, and checkpoints that move between them."""

import subprocess
import sys

import pytest
import torch

from fewseg.optim import AdamW, adamw
from fewseg.schedule import set_lr


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]


def _train(model: torch.nn.Module, optimizer, steps: range) -> None:
    for step in steps:
        set_lr(optimizer, 1e-2 * (1 + step % 3))  # a schedule changes the rate between steps
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_matches_torch_adamw_to_the_bit_with_groups_betas_and_changing_rates():
    ours, theirs = _model(), _model()
    _train(ours, AdamW(_groups(ours), lr=1e-3, betas=(0.8, 0.99), eps=1e-6), range(40))
    _train(theirs, torch.optim.AdamW(_groups(theirs), lr=1e-3, betas=(0.8, 0.99), eps=1e-6), range(40))
    assert _same(ours, theirs)
    assert not _same(ours, _model())  # it trained


def test_a_parameter_without_gradient_is_left_alone_as_torch_does():
    ours, theirs = _model(), _model()
    for m in (ours, theirs):
        m[2].weight.requires_grad_(False)
    _train(ours, AdamW(ours.parameters(), lr=1e-2), range(5))
    _train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2), range(5))
    assert _same(ours, theirs)
    assert torch.equal(ours[2].weight, _model()[2].weight)


@pytest.mark.parametrize("first, second", [(AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW), (AdamW, AdamW)])
def test_state_saved_by_one_resumes_in_the_other_to_the_same_weights(first, second, tmp_path):
    straight = _model()
    _train(straight, AdamW(_groups(straight), lr=1e-3), range(20))
    resumed = _model()
    opt = first(_groups(resumed), lr=1e-3)
    _train(resumed, opt, range(10))
    torch.save({"model": resumed.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "resume.pt")
    resumed = _model(seed=1)  # a fresh process would build the model anew, then load the checkpoint
    checkpoint = torch.load(tmp_path / "resume.pt", weights_only=False)
    resumed.load_state_dict(checkpoint["model"])
    saved = checkpoint["optimizer"]
    opt = second(_groups(resumed), lr=1e-3)
    opt.load_state_dict(saved)
    _train(resumed, opt, range(10, 20))
    assert _same(resumed, straight)


def test_state_of_other_groups_or_of_amsgrad_is_refused_and_changes_nothing():
    model = _model()
    opt = AdamW(_groups(model), lr=1e-3)
    _train(model, opt, range(2))
    with pytest.raises(ValueError, match="different sizes"):
        AdamW(model.parameters(), lr=1e-3).load_state_dict(opt.state_dict())
    other = torch.optim.AdamW(_groups(model), lr=1e-3, amsgrad=True)
    _train(model, other, range(2))
    set_lr(other, 0.5)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(other.state_dict())
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 2e-2] and len(opt.state) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda m: AdamW(m.named_parameters()), "named parameters"),
        (lambda m: AdamW([*m.parameters(), next(m.parameters())]), "same parameter twice"),
        (lambda m: AdamW(m.parameters(), betas=(0.9, 1.0)), "invalid lr, eps or betas"),
        (lambda m: AdamW([], lr=1e-3), "empty"),
    ],
)
def test_what_torch_refuses_is_refused_when_built(make, error):
    with pytest.raises((TypeError, ValueError), match=error):
        make(_model())


def test_other_devices_get_torchs_own():
    assert type(adamw(_model().parameters(), "cuda", lr=1e-3)) is torch.optim.AdamW  # builds without a GPU


def test_cpu_gets_fewsegs_and_building_it_does_not_import_dynamo():
    assert isinstance(adamw(_model().parameters(), "cpu", lr=1e-3), AdamW)
    code = (
        "import sys, torch\nfrom fewseg.optim import adamw\n"
        "p = torch.nn.Parameter(torch.ones(3)); o = adamw([p], 'cpu', lr=0.1)\n"
        "p.grad = torch.ones(3); o.step(); o.zero_grad()\nprint('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
