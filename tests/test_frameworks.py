"""psiopt's optimizers inside PyTorch Lightning's and Hugging Face's training loops (README, "Use
psiopt's groups with your optimizer"): the framework steps psiopt's optimizer (its scheduler and
gradient clipping included), and the rule that ran is psiopt's: Arora's projected SGD holds the
norm of the LayerNorm-fed weight (group "tensor") where a plain SGD step moves it.  timm cannot be
imported here (torchvision's compiled ops fail with this torch build), so its factory is not run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import psiopt


class Net(nn.Module):
    """Linear → LayerNorm (the linear weight is invariant as a whole tensor) → head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.ReLU(),
                                  nn.Linear(16, 3))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def data(n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_lightning_configure_optimizers():
    pl = pytest.importorskip("pytorch_lightning")
    x, y = data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def training_step(self, batch, _):
            return self.net(*batch)["loss"]

        def configure_optimizers(self):  # the README's lines
            opt = psiopt.create_optimizer(self.net, "psgd", (x[:4], y[:4]), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    module = Module()
    w = module.net.body[0].weight
    before = w.detach().clone()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert isinstance(opt, psiopt.ProjectedSGD)
    assert [g["lr"] for g in opt.param_groups if g["grouping"] == "tensor"] == [0.025]  # 2 epochs
    assert not torch.equal(w, before)
    torch.testing.assert_close(w.norm(), before.norm(), rtol=1e-5, atol=0)


def test_hugging_face_trainer_optimizers(tmp_path):
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    x, y = data()
    model = Net()
    w = model.body[0].weight
    before = w.detach().clone()
    opt = psiopt.create_optimizer(model, "psgd", {"x": x[:4], "labels": y[:4]}, lr=0.1)  # README
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None),
                                   train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)])
    trainer.train()
    assert trainer.optimizer.optimizer is opt  # accelerate's wrapper around psiopt's
    assert opt.param_groups[0]["lr"] == 0.0  # Trainer's default linear decay reached it
    assert not torch.equal(w, before)
    torch.testing.assert_close(w.norm(), before.norm(), rtol=1e-5, atol=0)
