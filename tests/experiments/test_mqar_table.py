"""The text of ``metaplastic mqar``'s table and plot title: seeds counted in words, no spread for one seed (then
labelled a smoke test), converged runs read as ``k of n``."""
from metaplastic.experiments import mqar


def result(accuracies, converged="0/2", smoke=False):
    """A result as :func:`mqar.run_mqar` returns it, one model, one setting with the given per-seed accuracies."""
    n = len(accuracies)
    mean = sum(accuracies) / n
    std = (sum((a - mean) ** 2 for a in accuracies) / (n - 1)) ** 0.5 if n > 1 else 0.0
    cfg = {"name": "quick", "seeds": list(range(n)), "smoke": smoke, "converged_loss": 0.5, "chance_loss": 2.77,
           "filler": "random", "d_model": 16, "state_budget": 64}
    setting = {"seq_len": 32, "pairs": 4, "trained": True, "accuracy": accuracies, "mean": mean, "std": std}
    model = {"accounting": "matched floats", "state_floats": 64, "memory": {"H": 2, "K": 4, "V": 8},
             "parameters": 1234, "best_lr": 3e-3, "converged": converged, "settings": [setting]}
    return {"config": cfg, "results": {"mamba2": model}}


def test_one_seed_has_no_spread_and_is_a_smoke_test():
    table = mqar.summary_table(result([0.25]))
    assert "±" not in table
    assert "| 0.250 |" in table
    assert table.startswith("**Smoke test (one seed: no spread)")
    assert "1 seed (" in table and "1 seeds" not in table
    assert "| 0 of 2 |" in table and "converged runs" in table
    title = mqar._title(result([0.25]))
    assert title.startswith("SMOKE TEST") and "1 seed, no spread" in title and "±" not in title


def test_several_seeds_show_mean_and_spread():
    table = mqar.summary_table(result([0.25, 0.75, 0.5], converged="2/3"))
    assert "| 0.500 ± 0.250 |" in table
    assert "3 seeds (" in table and "Smoke test" not in table
    assert "| 2 of 3 |" in table
    assert "3 seeds, mean ± std" in mqar._title(result([0.25, 0.75, 0.5]))
    assert mqar.summary_table(result([0.25, 0.75], smoke=True)).startswith("**Smoke test: checks")
