"""Tensor programs (the second "real code" issue): batched matmul, axes, einsum, convolution,
pooling, slices in the size symbols and larger sizes, against torch's own functions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import verify
from verify import oracle
from verify import plan as planning
from verify.strategies import Example
from verify.tolerance import allowed_error, precision

DTYPES = [torch.float64, torch.float32]
pytestmark = pytest.mark.one_dtype  # the quick profile runs each case in one of them

PROGRAMS = {
    "batched matmul and swapaxes": (
        "A: Real[b, n, k]\nB: Real[b, n, k]\no = sum((A @ swapaxes(B, 1, 2)) ** 2)",
        lambda A, B: ((A @ B.transpose(1, 2)) ** 2).sum()),
    "einsum": ("A: Real[b, n, k]\nw: Real[k]\no = einsum(\"bnk,k->bn\", A, w) ** 2",
               lambda A, w: torch.einsum("bnk,k->bn", A, w) ** 2),
    "conv2d with padding": ("x: Real[1, 2, h, v]\nw: Real[3, 2, k, j]\no = conv2d(x, w, padding=1)",
                            lambda x, w: F.conv2d(x, w, padding=1)),
    "grouped conv1d": ("x: Real[b, 4, l]\nw: Real[6, 2, k]\no = conv1d(x, w, groups=2, padding=1, stride=2)",
                       lambda x, w: F.conv1d(x, w, groups=2, padding=1, stride=2)),
    "max_pool1d": ("x: Real[c, l]\no = max_pool1d(x, kernel=3, stride=2)",
                   lambda x: F.max_pool1d(x.unsqueeze(0), 3, 2).squeeze(0)),
    "slices in the sizes": ("x: Real[n]\no = sum(x[1:n-1] ** 2) + sum(x[::2] * x[::2])",
                            lambda x: (x[1:-1] ** 2).sum() + (x[::2] * x[::2]).sum()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_tensor_program_matches_torch(name, dtype):
    spec, fn = PROGRAMS[name]
    assert verify.check_function(fn, spec, dtype=dtype, seed=0, max_examples=10, modes=("rev",)).points > 0


def test_a_slice_off_by_one_is_caught():
    spec, _ = PROGRAMS["slices in the sizes"]
    with pytest.raises(verify.Mismatch):
        verify.check_function(lambda x: (x[1:] ** 2).sum() + (x[::2] * x[::2]).sum(), spec, seed=0, max_examples=20)


def test_a_slice_that_needs_a_large_size_is_drawn_and_one_no_size_fits_is_a_spec_error():
    assert verify.check("x: Real[n]\no = sum(x[8:] ** 2)", seed=0, max_examples=10).points > 0
    with pytest.raises(verify.SpecError, match="no size n up to 64"):
        verify.check("x: Real[n]\no = sum(x[70:] ** 2)", max_examples=1)


@pytest.mark.examples(100)  # large sizes are drawn in one example of five
@pytest.mark.shrinks
def test_large_sizes_are_drawn_and_a_bug_past_the_usual_sizes_shrinks_to_its_smallest_size():
    def wrong_past_twenty(x):  # a kernel whose path for longer rows scales the result
        return torch.tanh(x) * (1.5 if x.shape[-1] >= 20 else 1.0)

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(wrong_past_twenty, "x: Real[n]\no = tanh(x)", seed=0, max_examples=100)
    assert caught.value.failure.sizes == {"n": 20}


@pytest.mark.parametrize("text, message", [
    ("A: Real[n, k]\no = sum(einsum(\"ij,\", A))", "einsum's subscripts"),
    ("A: Real[n, k]\no = sum(einsum(\"ijk\", A))", "has 3 letters"),
    ("A: Real[n, k]\nB: Real[m, k]\no = sum(einsum(\"ij,ij->i\", A, B))", "einsum's i is n in one operand and m"),
    ("A: Real[n, k, m]\no = sum(permute(A, (0, 1)))", "permute takes an order of all 3 axes"),
    ("x: Real[1, 2, l]\nw: Real[3, 4, k]\no = sum(conv1d(x, w))", "x's channels"),
    ("x: Real[n]\no = sum(x[::0])", "step is a positive integer"),
    ("x: Real[n]\no = sum(x[:x])", "a slice bound is an integer or an expression in the size symbols"),
    ("x: Real[n]\no = sum(x[:n // 0])", "or n // 2"),
    ("x: Real[n]\no = sum(x[:n // n])", "or n // 2"),
])
def test_tensor_programs_misused_are_spec_errors(text, message):
    with pytest.raises(verify.SpecError, match=message):
        verify.check(text, max_examples=1)


def test_a_slice_at_half_a_size_rounds_down_for_odd_sizes_as_python_does():
    spec = "x: Real[n]\nfront = x[:n // 2]\nback = x[n // 2:]\no = sum(front * front) - sum(back)"
    assert verify.check(spec, seed=0, max_examples=5, sizes={"n": 5}).points > 0
    # Code that splits at (n + 1) // 2 computes another function at odd n.
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: (x[:(x.shape[0] + 1) // 2] ** 2).sum() - x[(x.shape[0] + 1) // 2:].sum(),
                              spec, seed=0, max_examples=5, sizes={"n": 5})
    assert caught.value.failure.check in ("value", "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_matmul_off_by_more_than_its_rounding_is_caught(dtype):
    # The error bound of a sum of products (A @ B in index notation) comes from einsum, the
    # product never formed: it stays the formed one's, so a scaling bug of 2^8 roundings (a
    # two-term dot product is allowed a few dozen) still shows, in every dtype.
    u = torch.finfo(dtype).eps / 2

    def scaled(A, B):
        return (A @ B) * (1 + 2**8 * u)

    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(scaled, "A: Real[n, k]\nB: Real[k, m]\nC = A @ B", dtype=dtype, seed=0,
                              modes=("rev",), sizes={"k": 2})
    assert caught.value.failure.check in ("value", "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_exact_pass_bounds_a_matmul_as_formed_and_a_scaling_bug_exceeds_it(dtype):
    # The exact pass contracts A @ B by einsum on balls, with each product's rounding and the
    # sum's added as the formed sum would, in the dtype a matmul kernel computes in: torch's own
    # matmul is within the allowance, and one scaled by 8 roundings of the dtype is not.
    spec = verify.parse("A: Real[n, k]\nB: Real[k, m]\nC = A @ B")
    rng = np.random.default_rng(0)
    a, b = (torch.tensor(rng.uniform(0.5, 2.0, size=shape), dtype=dtype) for shape in ((3, 2), (2, 4)))
    point = Example({"n": 3, "k": 2, "m": 4}, {"A": a.double().numpy()[None], "B": b.double().numpy()[None]},
                    np.ones((1, 3, 4)))
    reference, bound = oracle.exact_point(planning.plan(spec), point, precision(dtype), 1, False).side.values["C"]
    allowed = allowed_error(bound, precision(dtype), reference)[0]
    correct = (a @ b).double().numpy()
    scaled = correct * (1 + 8 * torch.finfo(dtype).eps / 2)
    assert np.all(np.abs(correct - reference[0]) <= allowed)
    assert np.any(np.abs(scaled - reference[0]) > allowed)
