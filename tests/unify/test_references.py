"""The reference scan against implementations nobody here wrote (docs/references.md#reference-functions-on-a-cpu).

The fla naive functions and transformers' references compute in float32 (they cast their inputs), so a
correct float64 scan differs from them by ~1e-7 relative; 1e-6 is the bound that float32 imposes here.
"""
import pytest
import torch

import metaplastic
from metaplastic.oracles import ORACLES, scan_kwargs

from helpers import assert_close

TOL = 1e-6
# (B, T, H, K, V): T = 1, K != V, odd sizes K = 5 / V = 3, H > 1
SHAPES = [(1, 1, 1, 4, 4), (2, 1, 3, 5, 3), (2, 9, 3, 5, 3), (1, 16, 2, 3, 7), (2, 11, 2, 6, 6)]


def _cases():
    for oracle in ORACLES:
        for shape in SHAPES:
            if oracle.needs_square and shape[3] != shape[4]:
                continue
            for init in (False, True):
                yield pytest.param(oracle, shape, init, id=f"{oracle.model}-{oracle.requires}-{shape}-init{int(init)}")


@pytest.mark.parametrize("oracle,shape,init", list(_cases()))
def test_scan_matches_independent_reference(oracle, shape, init):
    if not oracle.available():
        pytest.skip(f"{oracle.requires} not installed")
    spec = metaplastic.registry[oracle.model]
    B, T, H, K, V = shape
    x = oracle.inputs(B, T, H, K, V, seed=sum(shape), initial_state=init)
    ref_out, ref_state = oracle.reference(x)
    res = metaplastic.scan(spec.objective, **scan_kwargs(x), scale=spec.scale_for(K), output_final_state=True)
    assert res.output.dtype == torch.float64
    assert_close(res.output, ref_out, rtol=TOL)
    for key, val in ref_state.items():
        assert res.final_state[key].shape == val.shape
        assert_close(res.final_state[key], val, rtol=TOL)


def test_every_point_and_full_entry_has_an_oracle():
    """Each non-metaplastic entry must be covered by at least one independent reference."""
    covered = {o.model for o in ORACLES}
    for name, spec in metaplastic.registry.items():
        if spec.objective.posterior != "diagonal":
            assert name in covered, name
