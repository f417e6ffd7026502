"""Presets that mirror the papers' experiments (SPEC §3), at full and at a CPU budget.

``full`` is the paper's protocol (needs a GPU and the dataset on disk); ``small`` runs the same
comparison on data that is here (Fashion-MNIST) in minutes on 2 CPU cores.  Recipes only fill in
``psiopt compare`` arguments; any flag given on the command line wins.
"""

RECIPES = {
    "yi-fig1": {
        "claim": "Yi Fig. 1: with an unbalanced init, SGD trains poorly and PSI-SGD is unaffected",
        "full": dict(dataset="mnist", model="mlp-bn", optimizers="sgd,psi-sgd", epochs=20,
                     init="unbalanced"),
        "small": dict(dataset="fashion-mnist", model="mlp-bn", optimizers="sgd,psi-sgd",
                      epochs=3, init="unbalanced"),
    },
    "yi-fig4": {
        "claim": "Yi Fig. 4: gradient norm falls faster for PSI-SGD(M) and SGDG than SGD/Adam",
        "full": dict(dataset="toy-regression", model="toy-elu",
                     optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm", epochs=100, batch_size=100),
        "small": dict(dataset="toy-regression", model="toy-elu",
                      optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm", epochs=30, batch_size=100),
    },
    "yi-table1": {
        "claim": "Yi Table 1: PSI-SGD(M) > SGDG > SGD > Adam on CIFAR ResNets",
        "full": dict(dataset="cifar10", model="resnet20", optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm",
                     epochs=200, milestones="60,120,160", gamma=0.2),
        "small": dict(dataset="fashion-mnist", model="resnet20",
                      optimizers="sgd,adam,sgdg,psi-sgd,psi-sgdm", epochs=2, subset=10000),
    },
    "badrinarayanan-table2": {
        "claim": "Badrinarayanan Table 2: test error UN <= B-SGD on ArchBN (2 and 4 layers)",
        "full": dict(dataset="mnist", model="archbn2", optimizers="un-sgd,b-sgd", epochs=50),
        "small": dict(dataset="fashion-mnist", model="archbn2", optimizers="un-sgd,b-sgd", epochs=5),
    },
    "roburin-table2": {
        "claim": "Roburin Table 2: Adam < Adam-S < Adam-SRT ≈ SGD-M",
        "full": dict(dataset="cifar10", model="resnet20", optimizers="adam,adams,adamsrt,sgd",
                     epochs=405, milestones="135,225,315", gamma=0.1),
        "small": dict(dataset="fashion-mnist", model="resnet20",
                      optimizers="adam,adams,adamsrt,sgd", epochs=2, subset=10000),
    },
}
