"""Presets that mirror the papers' experiments (SPEC §3), at full and at a CPU budget.

``full`` is the paper's protocol (needs a GPU, ``--device cuda``, and the dataset on disk);
``small`` runs the same comparison on data that is here (Fashion-MNIST) within an hour on 2 CPU
cores, one thread per run:
the full protocol with the few settings that change (the small MLPs run their full epoch count;
the ResNets train 10 epochs on the first 10 000 images, with the lr drops at the same fractions
of training).  Recipes only fill in ``psiopt compare``
arguments; any flag given on the command line wins.  A recipe with ``variants`` runs the
comparison once per variant (e.g. balanced and unbalanced initialisation), each in its own
subdirectory.  Recipes leave the device, ``--amp`` and ``--channels-last`` to the command line
(``--channels-last`` suits the conv-net recipes, resnet20 and arora-vgg, on a GPU; a recipe
whose model has no 4-D conv weight refuses it, as ``train`` does).
"""


def _recipe(claim: str, full: dict, variants: dict | None = None, select: dict | None = None,
            **small) -> dict:
    """``select``: the paper's lr selection per budget (``{"full": ..., "small": ...}``), each
    ``dict(lrs, epochs, subset, validation)``: every optimizer at every lr of the grid, constant
    lr, trained on ``subset`` samples and evaluated on the last ``validation`` training samples;
    the main runs then use each optimizer's best lr (see ``psiopt compare``)."""
    return {"claim": claim, "full": full, "small": {**full, **small}, "variants": variants or {},
            "select": select or {}}


def _study(claim: str, study: str, full: dict, **small) -> dict:
    """A recipe run by :func:`psiopt.experiments.studies.run_study` instead of ``compare``."""
    return {"claim": claim, "study": study, "full": full, "small": {**full, **small}}


_CPU = {"dataset": "fashion-mnist", "epochs": 10, "subset": 10000, "milestones": "3,6,8"}
_BADRINARAYANAN_LRS = dict(lrs=[1e-2, 1e-3, 1e-4, 1e-5], epochs=50, subset=1000, validation=500)
_ROBURIN_LRS = [1e-4, 1e-3, 1e-2, 1e-1]


def _arora_arms(lrs) -> dict:
    """Arora App. D: for each invariant lr, SGD and PSGD (per channel) with BN, PSGD projecting
    each weight as a whole ("tensor", as the paper does), and SGD on the net without BN (where
    the lr applies to every parameter: nothing is invariant), and SGD and PSGD with the exactly
    invariant BatchNorm of Arora's eq. (8) (``--exact-norms``)."""
    arms = {}
    for lr in lrs:
        arms[f"lr{lr:g}-bn"] = {"invariant_lr": lr, "optimizers": "sgd,psgd"}
        arms[f"lr{lr:g}-bn-tensor"] = {"invariant_lr": lr, "optimizers": "psgd", "grouping": "tensor"}
        arms[f"lr{lr:g}-no-bn"] = {"lr": lr, "optimizers": "sgd", "model_kwarg": ["batch_norm=false"]}
        # BatchNorm with eps·‖w‖² (Arora eq. 8): exactly invariant, the paper's own smoothed BN
        arms[f"lr{lr:g}-bn-exact"] = {"invariant_lr": lr, "optimizers": "sgd,psgd", "exact_norms": True}
    return arms


#: issue 25: AdamW (on psiopt.optimizer_groups, wrapped in the policy that does nothing), AdamW
#: with each norm policy, Muon, Muon + fixed, and two of psiopt's paper optimizers
_POLICY_OPTIMIZERS = "adamw+free,adamw+fixed,adamw+unit,adamw+equilibrium,psi-sgdm,adams"
#: torch.optim.Muon takes 2-D weights only: ResNet-20's are 4-D convolutions and the classifier
_POLICY_VARIANTS = {"vit-qk": {"model": "vit-qk",
                               "optimizers": _POLICY_OPTIMIZERS + ",muon,muon+fixed"},
                    "resnet20": {"model": "resnet20", "optimizers": _POLICY_OPTIMIZERS}}

RECIPES = {
    "norm-policies": _recipe(
        "issue 25: a norm policy on AdamW (fixed, unit, equilibrium) or Muon (fixed) trains as well "
        "as or better than the plain rule (Hyperball/MuonH, REQ), on a QK-norm ViT and ResNet-20; "
        "beside psiopt's PSI-SGDM and Adam-S",
        dict(dataset="cifar10", optimizers=_POLICY_OPTIMIZERS, epochs=100, milestones="50,75",
             gamma=0.1, seeds=3),
        _POLICY_VARIANTS,
        # one core, well under an hour (about 30 minutes on a core of its own): 3 epochs on
        # 3 000 images, lr ×0.1 before the last
        dataset="fashion-mnist", epochs=3, subset=3000, milestones="2", seeds=2),
    "yi-fig1": _recipe(
        "Yi Fig. 1: with an unbalanced init, SGD trains poorly and PSI-SGD is unaffected",
        dict(dataset="mnist", model="mlp-bn", optimizers="sgd,psi-sgd,psi-sgdm", epochs=20,
             seeds=3),
        {"balanced": {"init": "default"}, "unbalanced": {"init": "unbalanced"},
         # BatchNorm eps 1e-20: the ×1e-4 rows stay scale-invariant (exactly equivalent networks)
         "balanced-exact": {"init": "default", "model_kwarg": ["eps=1e-20"]},
         "unbalanced-exact": {"init": "unbalanced", "model_kwarg": ["eps=1e-20"]},
         # default eps, in layers that scale it with the rows (eps·‖w‖², Arora eq. 8)
         "balanced-exact-layers": {"init": "default", "exact_norms": True},
         "unbalanced-exact-layers": {"init": "unbalanced", "exact_norms": True}},
        dataset="fashion-mnist"),
    "yi-fig4": _recipe(
        "Yi Fig. 4: full-batch gradient norm falls faster for PSI-SGD(M) and SGDG than SGD/Adam",
        dict(dataset="toy-regression", model="toy-elu", optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm",
             epochs=1000, batch_size=1000, seeds=3),  # full batch: one epoch = one iteration
        {"paper-lr": {}, **{f"lr{lr:g}": {"lr": lr} for lr in (0.3, 0.1, 0.03, 0.01)}}),
    "yi-table1": _recipe(
        "Yi Table 1: PSI-SGD(M) > SGDG > SGD > Adam on CIFAR ResNets",
        dict(dataset="cifar10", model="resnet20", optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm",
             epochs=200, milestones="60,120,160", gamma=0.2),
        **_CPU),
    "yi-table2": _recipe(
        "Yi Table 2: with L2, PSI-SGD(M) >= SGD > SGDG > Adam (ResNet-20 CIFAR-10: PSI-SGDM 92.70, "
        "PSI-SGD 92.49, SGD 92.35, SGDG 91.99, Adam 90.89)",
        dict(dataset="cifar10", model="resnet20", optimizers="sgd,adam", epochs=200,
             milestones="60,120,160", gamma=0.2, weight_decay=5e-4),
        {"sgd-adam": {"invariant_weight_decay": 5e-4},  # L2 on every weight
         "psi": {"optimizers": "psi-sgd,psi-sgdm", "invariant_weight_decay": 5e-4,
                 "set": ["fixed_norm=false"]},  # Yi's coupled L2 runs eq. 10-11 literally
         "sgdg": {"optimizers": "sgdg"}},  # rows on the sphere: L2 on the other weights only
        **_CPU),
    "badrinarayanan-table2": _recipe(
        "Badrinarayanan Table 2: test error UN <= B-SGD on ArchBN (2 and 4 layers)",
        dict(dataset="mnist", optimizers="un-sgd,b-sgd", epochs=50, seeds=3),
        {"archbn2": {"model": "archbn2"}, "archbn4": {"model": "archbn4"}},
        # §4: base lr from 10^-p, p = 2..5, by the validation error of 50 epochs at a constant lr
        # on 1000 training images, 500 held out (once per model, seed 0; the paper: every run)
        select={"full": _BADRINARAYANAN_LRS, "small": _BADRINARAYANAN_LRS},
        dataset="fashion-mnist"),
    "roburin-table2": _recipe(
        "Roburin Table 2: Adam < Adam-S < Adam-SRT ≈ SGD-M",
        dict(dataset="cifar10", model="resnet20",
             optimizers="sgd,adam,adamw,adamg,adams,adamsrt,sgdmrt",
             epochs=405, milestones="135,225,315", gamma=0.1, seeds=5),
        # App. E.1: lr from {1e-4, 1e-3, 1e-2, 1e-1} (their λ and β2 grids are not searched)
        select={"full": dict(lrs=_ROBURIN_LRS, epochs=405, subset=None, validation=5000,
                             milestones="135,225,315"),
                "small": dict(lrs=_ROBURIN_LRS, epochs=4, subset=5000, validation=1000)},
        **{**_CPU, "seeds": 2}),
    "roburin-thm4": _study(
        "Roburin Thm. 4: SGD+L2 and AdamG* follow the same directions (to second order)",
        "thm4", dict(dataset="cifar10", model="resnet20", lrs=[0.01, 0.1], decays=[5e-4, 5e-3],
                     bn_eps=[None, 1e-12], steps=20000, subset=None),
        dataset="fashion-mnist", model="mlp-bn", decays=[1e-3, 1e-2], steps=2000, subset=10000),
    "effective-lr": _study(
        "Roburin Table 1 / Arora: the effective lr of invariant layers is η/‖w‖² for SGD and as "
        "Theorem 2 says for SGD-M, Adam, Adam-SRT (with momentum ~1/(1−ρ) more per step)",
        "effective_lr", dict(dataset="cifar10", model="resnet20",
                             optimizers=["sgd:momentum=0", "sgd", "sgdmrt", "adam", "adams",
                                         "adamsrt", "psi-sgd"],
                             steps=5000, subset=None),
        dataset="fashion-mnist", model="mlp-bn", steps=2000, subset=10000),
    "arora-lr-sweep": _recipe(
        "Arora App. D: with BN, plain SGD trains at every invariant lr (1e-2…1e2, others 0.1); "
        "projected SGD and the net without BN stall or diverge at large lr",
        dict(dataset="cifar10", model="arora-vgg", optimizers="sgd", epochs=100, momentum=0.0,
             lr=0.1, milestones="50", gamma=0.1),
        _arora_arms([1e-2, 1e-1, 1.0, 10.0, 100.0]),
        dataset="fashion-mnist", epochs=3, subset=5000, milestones=None),
}
