"""Memory capacity without training (metaplastic.experiments.capacity)."""
import json

import numpy as np
import pytest
import torch

from metaplastic.cli import main
from metaplastic.experiments import capacity as cap


def _pairs(dist="isotropic", trials=4, n=24, K=16, seed=0):
    return cap.make_pairs(dist, trials, n, K, K, 2.0, torch.Generator().manual_seed(seed))


def _numpy_recall(readout):
    """Recall from read-outs ``[trials, N, V]`` against the values, computed with numpy alone."""
    def recall(values):
        o = readout / np.linalg.norm(readout, axis=-1, keepdims=True)
        return float((np.einsum("tnv,tmv->tnm", o, values).argmax(-1) == np.arange(values.shape[1])).mean())
    return recall


@pytest.mark.parametrize("dist", cap.DISTRIBUTIONS)
def test_hebbian_recall_matches_numpy(dist):
    """Mamba2 without decay stores S = Σ v kᵀ: its recall must equal the textbook outer-product memory's."""
    keys, values = _pairs(dist)
    n_grid = [4, 12, 24]
    rec = cap.recall_curve("mamba2", [cap.Setting(decay=1.0)], keys, values, n_grid)[0]
    K_, V_ = keys.numpy(), values.numpy()
    for j, n in enumerate(n_grid):
        S = np.einsum("tnv,tnk->tvk", V_[:, :n], K_[:, :n])
        o = np.einsum("tvk,tnk->tnv", S, K_[:, :n])
        assert rec[j].item() == pytest.approx(_numpy_recall(o)(V_[:, :n]), abs=1e-12)


@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_mesanet_recall_matches_ridge_regression(lam):
    """MesaNet without decay is ridge regression of values on keys: compare with numpy's solve."""
    keys, values = _pairs("anisotropic", n=24, K=16)
    n_grid = [8, 16, 24]
    rec = cap.recall_curve("mesanet", [cap.Setting(decay=1.0, lam=lam)], keys, values, n_grid)[0]
    K_, V_ = keys.numpy(), values.numpy()
    for j, n in enumerate(n_grid):
        Kn, Vn = K_[:, :n], V_[:, :n]
        W = np.linalg.solve(np.einsum("tnk,tnl->tkl", Kn, Kn) + lam * np.eye(16), np.einsum("tnk,tnv->tkv", Kn, Vn))
        o = np.einsum("tnk,tkv->tnv", Kn, W)
        assert rec[j].item() == pytest.approx(_numpy_recall(o)(Vn), abs=1e-12)


def test_anisotropic_keys_have_power_law_channels():
    keys, values = _pairs("anisotropic", trials=64, n=64, K=8)
    assert torch.allclose(keys.norm(dim=-1), torch.ones(()).double())
    assert torch.allclose(values.norm(dim=-1), torch.ones(()).double())
    power = keys.pow(2).mean(dim=(0, 1))
    assert bool((power[:-1] > power[1:]).all()), power  # channel variance decreases with j
    iso, _ = _pairs("isotropic", trials=64, n=64, K=8)
    p_iso = iso.pow(2).mean(dim=(0, 1))
    assert float(p_iso.max() / p_iso.min()) < 1.2


def test_capacity_of():
    assert cap.capacity_of([4, 8, 16, 32], [1.0, 0.95, 0.5, 0.95]) == 8  # the first failure stops it
    assert cap.capacity_of([4, 8], [0.8, 1.0]) == 0
    assert cap.capacity_of([4, 8], [0.9, 0.9]) == 8


def test_capacity_is_monotone_in_state_size():
    """A sanity property: a larger memory (K = V) never holds fewer associations."""
    caps = []
    for dim in (8, 16, 32):
        res = cap.run_capacity(["mamba2"], ["isotropic"], dim=dim, n_grid=(2, 4, 8, 16, 32, 64), trials=8,
                               progress=False)
        caps.append(res["results"]["isotropic"]["mamba2"]["capacity"])
    assert caps == sorted(caps) and caps[-1] > caps[0], caps


def test_twin_is_pinned_to_base_decay():
    res = cap.run_capacity(["mamba2", "meta_mamba2"], ["anisotropic"], dim=8, n_grid=(2, 4, 8), trials=4,
                           progress=False)
    r = res["results"]["anisotropic"]
    assert r["meta_mamba2"]["setting"]["decay"] == r["mamba2"]["setting"]["decay"]
    assert all(g["setting"]["b"] > 0 for g in r["meta_mamba2"]["grid"])


def test_cli_quick_writes_files(tmp_path):
    rc = main(["capacity", "--quick", "--models", "mamba2", "palimpsa", "mesanet", "--trials", "4",
               "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "capacity.json").read_text())
    assert set(result["results"]) == {"isotropic", "anisotropic"}
    for dist in result["results"].values():
        assert set(dist) == {"mamba2", "palimpsa", "mesanet"}
        for r in dist.values():
            assert len(r["N"]) == len(r["recall"]) == len(cap.QUICK_N)
            # the definition written out: the largest N before the first recall below 0.9 (0 if the first is)
            passed = [n for i, n in enumerate(r["N"]) if all(x >= 0.9 for x in r["recall"][:i + 1])]
            assert r["capacity"] == (passed[-1] if passed else 0)
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_quick_all_models(tmp_path):
    assert main(["capacity", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "capacity.json").read_text())
    assert set(result["results"]["isotropic"]) == set(cap.DEFAULT_MODELS)


def test_cli_rejects_unknown_model(tmp_path, capsys):
    assert main(["capacity", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_library_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        cap.run_capacity(["nope"], progress=False)
    with pytest.raises(ValueError, match="unknown key distribution 'gaussian'"):
        cap.run_capacity(["mamba2"], ["gaussian"], progress=False)
    with pytest.raises(ValueError, match="trials must be positive"):
        cap.run_capacity(["mamba2"], trials=0, progress=False)
