"""Every op row of tests/test_ops.py through the exact pass (arb balls), at drawn points:
integer-producing ops (argmax, argmin, sort, topk, take) among them, it raises nothing but
its own signals. The quick profile runs the integer-producing rows, each in one dtype; the
thorough one, all, in both."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_ops import ROWS
from verify import balls, strategies
from verify.oracle import exact_point
from verify.plan import plan
from verify.spec import parse
from verify.tolerance import precision

INTEGER_PRODUCING = ("argmax", "argmin", "sort", "topk", "take")
POINTS_PER_EXAMPLE = 3
pytestmark = pytest.mark.one_dtype  # the quick profile runs each row in float64 or in float32


@pytest.mark.parametrize("op", [pytest.param(op, marks=() if op in INTEGER_PRODUCING else pytest.mark.thorough)
                                for op in sorted(ROWS)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_an_op_row_runs_through_the_exact_pass_without_an_internal_error(op, dtype):
    spec = parse(ROWS[op])
    judged = []

    @settings(max_examples=4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        example = data.draw(strategies.examples(spec, dtype, tangents=True))
        prepared = plan(spec, example.sizes)
        for index in range(min(example.batch, POINTS_PER_EXAMPLE)):
            point = example.at(np.arange(example.batch) == index)
            try:
                exact = exact_point(prepared, point, precision(dtype), order=1, forward=True, one_sided=True)
            except balls.Beyond:  # beyond arb's exponent range: the engine counts it as unjudged
                continue
            judged.append(exact is not None)

    run()
    assert any(judged)
