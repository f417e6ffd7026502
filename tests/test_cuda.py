"""On a machine with a GPU: every optimizer steps on CUDA without a host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``).  Skipped here (no GPU); the meta-device detector of
``tests/test_optimizer_matrix.py`` checks the same property on any machine."""

import pytest
import torch
import torch.nn.functional as F

import psiopt
from test_compile import net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", psiopt.list_optimizers())
def test_step_on_cuda_has_no_host_synchronisation(name):
    model = net().cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    opt = psiopt.create_optimizer(model, name, x)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())
