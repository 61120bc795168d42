"""The engine end to end: agreement, rejections, shrunk counterexamples and blame."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import verify
from verify import engine, strategies
from verify.report import CHECKED

from .conftest import ExpIgnoringGradOutput, TanhWithWrongBackward

BACKPROP = "x: Real[n] = [2, 4]\ny = x**2\no = 1/2 * sum(y)\nassert grad(o, x) == x\n"
MLP = "W: Real[m, n]\nx: Real[n]\nb: Real[m]\na = W @ x + b\nh = tanh(a)\no = mean(h**2)\n"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backprop_example_agrees_and_its_claim_is_proved_for_all_n(dtype):
    result = verify.check(BACKPROP, seed=0, dtype=dtype)
    assert result.points > 100
    # x**2 is defined everywhere: the only points left out are those beyond the dtype's range.
    assert all(any(word in reason for word in ("overflow", "underflows")) for reason in result.rejected)
    (claim,) = result.claims
    assert claim.status == "proved for all n"


@pytest.mark.shrinks
def test_false_claim_is_refuted_with_a_shrunk_counterexample():
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(BACKPROP.replace("== x", "== 2 * x"), seed=0)
    failure = caught.value.failure
    assert failure.check == "claim"
    assert failure.sizes == {"n": 1}
    assert failure.inputs["x"].shape == (1,)
    assert failure.reference[0] == failure.inputs["x"][0]
    assert failure.actual[0] == 2 * failure.inputs["x"][0]
    assert failure.inputs["x"][0] in (1.0, -1.0)
    # Shrinking took float64's sure verdicts; the shrunk failure is then decided exactly.
    assert any(note.startswith("decided by the exact pass") for note in failure.notes)
    report = str(caught.value)
    for fragment in ["claim:      grad(o, x) == 2 * x", "symbolic:   ∂o/∂x[i] = x[i]", "input:      x = [",
                     "Mismatched elements: 1 / 1", "reproduce:  verify.check(spec, seed=0)"]:
        assert fragment in report


def test_a_counterexample_is_never_made_less_simple():
    # Hypothesis shrinks this seed's failure to x = 1; -1, tried after 1, fails as well.
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(BACKPROP.replace("== x", "== 2 * x"), seed=1, max_examples=20)
    assert caught.value.failure.inputs["x"].tolist() == [1.0]


@pytest.mark.parametrize("spec", [
    MLP,
    "x: Real[n]\nA: Real[n, n]\ny = sin(x) * exp(x / n)\no = A.T @ y\n",
    "A: Positive[n, m]\ns = sum(log(A), axis=0)\no = sum(sqrt(s**2 + 1)) / m\n",
    "a: Real\nb: Positive\nc = a * b + cos(a)\no = c ** 3 - 2 / b\nassert grad(o, b) == 3*c**2*a + 2/b**2\n",
    "A: Real[n, k]\nB: Real[k, m]\no = sum((A @ B) ** 2, axis=(0, 1))\n",
    "v: Real[n]\nB: Real[n, m]\nu = v @ B\no = u @ u\n",
    "x: Real[n]\ny = x\no = sum(y * x - x)\n",
    # A product of constants and sizes only (∂o/∂x = pi * n): its bound is a scalar.
    "x: Real[n]\no = sum(x * pi * n)\n",
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correct_specs_pass_in_float64_and_float32(spec, dtype):
    result = verify.check(spec, seed=1, dtype=dtype, max_examples=60)
    assert result.points > 0
    assert all(claim.status.startswith("proved") for claim in result.claims)


# A failing batch is no megabytes-long repr in Hypothesis's warning either.
@pytest.mark.filterwarnings("error::hypothesis.errors.HypothesisWarning")
def test_wrong_backward_is_blamed_on_the_node_that_computed_it(plant_torch_form):
    plant_torch_form("tanh", TanhWithWrongBackward.apply)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(MLP, seed=2)
    failure = caught.value.failure
    assert failure.check == "gradient"
    assert failure.subject == "∂o/∂a"  # ∂o/∂h still agrees, so tanh's backward is to blame
    assert "the backward of h (line 5: h = tanh(a)) into a is to blame" in failure.blame
    assert "(1 - h[i]**2)" in failure.formula  # tanh's derivative read from its saved result, as torch's backward does


def test_backward_that_ignores_its_incoming_gradient_is_caught_through_a_random_cotangent(plant_torch_form):
    plant_torch_form("exp", ExpIgnoringGradOutput.apply)
    # Even under sum(), where backward(1) would hide it, the scalar output's cotangent varies.
    for text in ("x: Real[n]\no = sum(exp(x))", "x: Real[n]\no = exp(x)"):
        with pytest.raises(verify.Mismatch) as caught:
            verify.check(text, seed=3, modes=("rev",))
        assert caught.value.failure.subject == "∂o/∂x"
        assert "cotangent" in caught.value.failure.inputs


def test_points_outside_the_domain_are_rejected_and_counted_not_failed():
    result = verify.check("x: Real[n]\ny: Real[n]\no = sum(log(x - y))", seed=4)
    assert result.points > 0
    assert any("outside the domain of log: x > 0" in reason for reason in result.rejected)
    assert result.rejected_points > 0


def test_overflow_of_the_dtype_is_rejected_not_failed():
    result = verify.check("x: Real\no = exp(x)", seed=5, dtype=torch.float32)
    assert any("overflows float32" in reason for reason in result.rejected)


def test_the_example_point_is_always_checked(plant_torch_form):
    def sin_wrong_at_seven_and_a_quarter(x):
        return torch.where(x == 7.25, torch.zeros_like(x), torch.sin(x))

    plant_torch_form("sin", sin_wrong_at_seven_and_a_quarter)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n] = [1, 7.25]\no = sum(sin(x))", seed=6, max_examples=5)
    assert caught.value.failure.check == "value"
    assert "at the example point" in str(caught.value)


def test_same_seed_same_run():
    first = verify.check(MLP, seed=7, max_examples=20)
    second = verify.check(MLP, seed=7, max_examples=20)
    assert (first.points, first.examples) == (second.points, second.examples)


def test_claim_about_an_intermediate_is_proved():
    result = verify.check("x: Real[n]\ny = exp(x)\no = sum(y**2)\nassert grad(o, y) == 2 * exp(x)", seed=8)
    assert result.claims[0].status == "proved for all n"


def test_claim_sympy_cannot_prove_is_checked_numerically():
    # tanh(x/2)' = 1/(1 + cosh x) holds, but simplify does not find it.
    spec = "x: Real[n]\no = sum(tanh(x/2))\nassert grad(o, x) == 1/(1 + (exp(x) + exp(-x))/2)"
    result = verify.check(spec, seed=9)
    assert result.claims[0].status == f"{CHECKED} (sympy's simplify did not reduce the difference to 0)"
    assert result.points > 0


def test_spec_error_from_check():
    with pytest.raises(verify.SpecError):
        verify.check("x: Real\no = y")


LAYER_NORM = """\
x: Real[n] = [3809866450507239, 0, 7619732901014476, 3809866450507239, 3809866450507239, 3809866450507239]
w: Real[n] = [1, 0, 0, 0, 0, 0]
c = x - mean(x)
s = sqrt(mean(c * c) + 1/100000)
o = sum(c / s * w)
"""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_normalization_passes_also_where_centering_cancels_exactly(dtype):
    # At the example point c[0] is 0 in exact arithmetic and about 0.5 in torch's float64:
    # products of two such factors need the second-order term of the error bound.
    result = verify.check(LAYER_NORM, seed=3, dtype=dtype, max_examples=50)
    assert result.points > 0


@pytest.mark.parametrize("text", ["x: Real = 1\no = (x + 2**60) - 2**60", "x: Real\no = x + x + x + x + x - 5 * x"])
def test_rounding_in_torchs_order_is_no_false_alarm(text):
    # sympy simplifies both outputs before any numbers are seen (to x, and to 0); torch
    # computes step by step, and the tolerance follows its steps.
    assert verify.check(text, seed=3, max_examples=200).points > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_derivative_in_another_form_than_sympys_is_no_false_alarm(dtype):
    # At a constant A and constant tangent, sympy's JVP of var is a sum of products of two
    # exact zeros; torch's sum(t * (A - mean(A))) keeps the rounding of mean(A).
    constant = "[" + ", ".join(["[0.1, 0.1, 0.1]"] * 2) + "]"
    result = verify.check(f"A: Real[n, m] = {constant}\no = sum(var(A, axis=0)) + var(A)", max_examples=5,
                          seed=0, dtype=dtype)
    assert result.points > 0


def test_sizes_fix_a_size_symbol_and_a_bug_is_found_at_that_size():
    spec = "x: Real[n]\no = 1/2 * sum(sin(x)**2 * exp(x))"
    result = verify.check(spec, sizes={"n": 1000}, seed=0, max_examples=10)
    assert result.points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: 0.5 * (torch.sin(x) ** 2 * torch.exp(x)).sum() * (1 + 1e-3 * (x.numel() > 500)),
                              spec, sizes={"n": 1000}, seed=0, max_examples=10)
    assert caught.value.failure.sizes == {"n": 1000}
    assert "sizes={'n': 1000}" in str(caught.value)


def test_a_concrete_dim_of_a_million_elements_is_drawn_by_numpy_not_element_by_element():
    result = verify.check("x: Positive[1000000]\no = sum(log(x))", seed=0, max_examples=2, modes=("rev",))
    assert result.points > 0


@pytest.mark.parametrize("sizes, message", [({"m": 3}, "'m' is not a size symbol"), ({"n": 0}, "positive int")])
def test_bad_sizes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        verify.check("x: Real[n]\no = sum(x)", sizes=sizes)


def test_a_proof_past_its_time_budget_leaves_the_claim_checked_numerically(monkeypatch):
    import verify.lower.sympy as lowering

    spec = "x: Real[n]\no = sum(sin(x)**2) / 2\nassert grad(o, x) == sin(2 * x) / 2\n"
    assert verify.check(spec, seed=0, max_examples=5).claims[0].status == "proved for all n"
    monkeypatch.setattr(lowering, "PROOF_SECONDS", 1e-6)
    result = verify.check(spec + "# the same claim, planned again\n", seed=0, max_examples=5)
    assert result.claims[0].status == f"{CHECKED} (sympy's simplify ran past its 1e-06 s)"


def test_a_false_claim_is_refuted_at_a_sample_before_sympy_tries_to_prove_it(monkeypatch):
    import verify.lower.sympy as lowering

    def no_proof(expr, **options):
        raise AssertionError("the prover ran")

    monkeypatch.setattr(lowering.sympy, "simplify", no_proof)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check("x: Real[n]\no = sum(sin(x)**2) / 2\nassert grad(o, x) == sin(x)\n", seed=0, max_examples=5)
    assert caught.value.failure.check == "claim"


def test_a_claim_true_on_a_domain_the_sample_lies_outside_is_still_proved():
    # The sample's values are positive; on x < 0, sqrt(x**2) is -x and the claim holds.
    spec = "x: Interval(-3, -1)[n]\ny = sqrt(x**2)\no = sum(y)\nassert grad(o, x) == -1 + 0 * x"
    assert verify.check(spec, seed=0, max_examples=3).claims[0].status == "proved for all n"


def test_a_spec_and_the_same_spec_with_claims_share_their_derivation_and_each_keeps_its_claims():
    from verify.plan import plan

    statements = "x: Real[n]\n# squares\ny = x**2\no = sum(y) / 2  # halved\n"
    plain = plan(verify.parse(statements))
    claimed = plan(verify.parse(statements + "assert grad(\n    o, x) == x\nassert grad(o, x) == 2 * x\n"))
    other = plan(verify.parse(statements.replace("/ 2", "/ 3")))
    assert claimed.adjoints["x"] is plain.adjoints["x"] and other.adjoints["x"] is not plain.adjoints["x"]
    assert [c.proved for c in claimed.claims] == [True, False] and plain.claims == []


@pytest.mark.examples(100000)
def test_a_time_budget_stops_drawing_examples_and_the_result_says_so():
    result = verify.check("x: Real[n]\ny = sin(x)", seed=0, max_examples=100000, time_budget=0.5)
    assert result.budget_spent == 0.5 and 1 <= result.examples < 100000 and result.points > 0
    assert f"{result.examples} example(s), as many as the time budget of 0.5 s allowed" in str(result)
    unbounded = verify.check("x: Real[n]\ny = sin(x)", seed=0, max_examples=5)
    assert unbounded.budget_spent is None and "time budget" not in str(unbounded)


@pytest.mark.shrinks
def test_a_failure_found_within_the_time_budget_is_still_shrunk():
    # The budget is spent before the first example ends; the failure it found is shrunk all the same.
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: 2 * x, "x: Real[n]\ny = x", seed=0, time_budget=1e-6)
    assert caught.value.failure.sizes == {"n": 1} and caught.value.failure.inputs["x"].tolist() == [0.0]


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_a_time_budget_that_is_no_positive_number_of_seconds_is_refused(budget):
    with pytest.raises(ValueError, match="time_budget must be a positive number of seconds"):
        verify.check("x: Real\ny = x", time_budget=budget)


def test_shrinking_stops_after_its_time_and_reports_the_smallest_failure_found(monkeypatch):
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(BACKPROP.replace("== x", "== 2 * x"), seed=0)
    assert caught.value.failure.check == "claim"  # still a real failure, confirmed by the exact pass
    assert any(note.startswith("decided by the exact pass") for note in caught.value.failure.notes)
    assert "shrinking stopped after 0 s: this is the smallest failure found by then" in str(caught.value)


def test_sizes_given_past_the_memory_bound_are_a_spec_error_and_drawn_ones_are_halved_to_fit():
    with pytest.raises(verify.SpecError, match=r"at n = 10000, the spec's tensors hold 100010001 elements per point"):
        verify.check("x: Real[n]\no = sum(outer(x, x))", sizes={"n": 10000}, max_examples=1)
    spec = verify.parse("x: Real[n, 1024, 1024]\ny = 2 * x\no = sum(y)")  # 2^21 elements per n
    assert strategies._within_memory(spec, {"n": 8}, fixed={}) == {"n": 2}
    result = verify.check(spec, max_examples=2, seed=0)
    assert result.points > 0



@pytest.mark.examples(10)  # this process draws as the other does: users' batches
def test_the_same_seed_draws_the_same_whatever_local_modules_are_loaded(tmp_path):
    # Hypothesis would mix literal constants of loaded local modules into its draws: this
    # process has loaded the suite's, and the other one loads magic's instead.
    (tmp_path / "magic.py").write_text("THRESHOLDS = [20.0, 123.456, -7.5, 0.001, 4096, 777]\n")
    spec = "x: Real[n]\no = sum(softplus(x) * x)"
    script = (f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport magic\nimport verify\n"
              f"result = verify.check({spec!r}, seed=0, max_examples=10)\n"
              "print(result.points, sorted(result.rejected.items()))\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = verify.check(spec, seed=0, max_examples=10)
    assert completed.stdout == f"{result.points} {sorted(result.rejected.items())}\n" and result.points > 0



def test_the_wide_bulks_of_one_example_in_eight_reach_the_decades_where_exp_overflows():
    # exp overflows past 11, 88 and 709 (half types, float32, float64): half the wide bulks are
    # scaled to reach there, a fifth of all bulks (with scales spread over float64's 600
    # decades, 5 bulks of 148 did).
    from hypothesis import given, settings

    spec = verify.parse("x: Real[n]\ny = exp(x)")
    largest = []

    @settings(max_examples=200, derandomize=True, database=None)
    @given(strategies.examples(spec, torch.float64))
    def draw(example):
        if example.batch > strategies.MAX_BATCH:  # past the few points drawn one by one: the bulk
            largest.append(float(np.abs(example.inputs["x"][strategies.MAX_BATCH:]).max()))

    with strategies.draws_by_seed_alone():  # as the engine draws
        draw()
    assert sum(100 <= m <= 1e5 for m in largest) >= len(largest) / 10


@pytest.mark.examples(10)
def test_the_examples_counted_are_those_asked_for_not_the_example_point_besides():
    assert verify.check(BACKPROP, seed=0, max_examples=10).examples == 10


def test_a_relative_difference_from_a_reference_of_zero_is_not_a_huge_number():
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda x: torch.tanh(x) + 1e-3, "x: Real[n]\ny = tanh(x)", seed=0, max_examples=5)
    assert "Greatest relative difference: — at index (0,) (reference 0)" in str(caught.value)
