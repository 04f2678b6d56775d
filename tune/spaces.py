"""Named search spaces for ``tune/run.py --space NAME``: config overrides of the ``tune`` section.

Each space is a list of ``key=value`` overrides applied before the command line's own, so
``--space alpha_lr tune.lrs=[2e-5,5e-5]`` keeps the alpha grid and replaces the lr grid.
The default sweep (no ``--space``) is whatever the config's ``tune`` section says.
"""

from __future__ import annotations

SPACES: dict[str, list[str]] = {
    # The grid: cross-lingual only (0) to monolingual only (1).
    "alpha": ["tune.alphas=[0.0, 0.25, 0.5, 0.75, 1.0]", "tune.search=grid"],
    # The paper reports alpha stable in 0.4-0.6; a finer look around it.
    "alpha_fine": ["tune.alphas=[0.3, 0.4, 0.5, 0.6, 0.7]", "tune.search=grid"],
    "alpha_lr": ["tune.alphas=[0.0, 0.25, 0.5, 0.75, 1.0]", "tune.lrs=[1.0e-5, 3.0e-5, 1.0e-4]",
                 "tune.search=grid"],
    "alpha_lr_tau": ["tune.alphas=[0.0, 0.5, 1.0]", "tune.lrs=[1.0e-5, 3.0e-5, 1.0e-4]",
                     "tune.taus=[0.02, 0.05, 0.1]", "tune.search=grid"],
    # Random search over the box [0, 1] x [1e-5, 1e-4] x [0.02, 0.1] (log scale for lr, tau).
    "random": ["tune.alphas=[0.0, 1.0]", "tune.lrs=[1.0e-5, 1.0e-4]", "tune.taus=[0.02, 0.1]",
               "tune.search=random", "tune.num_samples=12"],
}
