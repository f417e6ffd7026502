"""Presets that mirror the papers' experiments (SPEC §3), at full and at a CPU budget.

``full`` is the paper's protocol (needs a GPU and the dataset on disk); ``small`` runs the same
comparison on data that is here (Fashion-MNIST) in minutes on 2 CPU cores: the full protocol with
the few settings that change.  Recipes only fill in ``psiopt compare`` arguments; any flag given
on the command line wins.
"""


def _recipe(claim: str, full: dict, **small) -> dict:
    return {"claim": claim, "full": full, "small": {**full, **small}}


_CPU = {"dataset": "fashion-mnist", "milestones": None, "gamma": None}

RECIPES = {
    "yi-fig1": _recipe(
        "Yi Fig. 1: with an unbalanced init, SGD trains poorly and PSI-SGD is unaffected",
        dict(dataset="mnist", model="mlp-bn", optimizers="sgd,psi-sgd", epochs=20,
             init="unbalanced"),
        dataset="fashion-mnist", epochs=3),
    "yi-fig4": _recipe(
        "Yi Fig. 4: gradient norm falls faster for PSI-SGD(M) and SGDG than SGD/Adam",
        dict(dataset="toy-regression", model="toy-elu", optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm",
             epochs=100, batch_size=100),
        epochs=30),
    "yi-table1": _recipe(
        "Yi Table 1: PSI-SGD(M) > SGDG > SGD > Adam on CIFAR ResNets",
        dict(dataset="cifar10", model="resnet20", optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm",
             epochs=200, milestones="60,120,160", gamma=0.2),
        **_CPU, epochs=2, subset=10000),
    "badrinarayanan-table2": _recipe(
        "Badrinarayanan Table 2: test error UN <= B-SGD on ArchBN (2 and 4 layers)",
        dict(dataset="mnist", model="archbn2", optimizers="un-sgd,b-sgd", epochs=50),
        dataset="fashion-mnist", epochs=5),
    "roburin-table2": _recipe(
        "Roburin Table 2: Adam < Adam-S < Adam-SRT ≈ SGD-M",
        dict(dataset="cifar10", model="resnet20", optimizers="adam,adams,adamsrt,sgd",
             epochs=405, milestones="135,225,315", gamma=0.1),
        **_CPU, epochs=2, subset=10000),
}
