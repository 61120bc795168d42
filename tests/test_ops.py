"""Every op of the registry, checked by the tool itself: torch's form against sympy's.

Each op has a row: a correct spec that exercises it, which must pass in float64 and
float32 (no false alarm), and a false claim about a derivative, which must be refuted.
``VERIFY_OP_EXAMPLES`` sets the examples per row (CI runs a few dozen; the figures in the
docs/ops.md come from 1000).
"""

import os

import pytest
import torch

import verify
from verify import engine, findings
from verify.ops import REGISTRY

EXAMPLES = int(os.environ.get("VERIFY_OP_EXAMPLES", "15"))

UNARY_REAL = ["abs", "sign", "square", "exp", "expm1", "sin", "cos", "atan", "sinh", "cosh", "tanh", "asinh",
              "sigmoid", "logsigmoid", "softplus", "relu", "elu", "gelu", "silu", "mish", "erf", "erfc", "sinc"]
UNARY_DOMAIN = {"reciprocal": "Real", "sqrt": "Positive", "rsqrt": "Positive", "log": "Positive",
                "log2": "Positive", "log10": "Positive", "log1p": "Interval(-1, 100)", "tan": "Interval(-1.5, 1.5)",
                "asin": "Interval(-1, 1)", "acos": "Interval(-1, 1)", "acosh": "Interval(1, 100)",
                "atanh": "Interval(-1, 1)", "lgamma": "Positive", "digamma": "Positive"}
ROWS = {}
for op in UNARY_REAL:
    ROWS[op] = f"x: Real[n]\ny = {op}(x)\no = sum(y * y)"
for op, domain in UNARY_DOMAIN.items():
    ROWS[op] = f"x: {domain}[n]\ny = {op}(x)\no = sum(y * y)"
ROWS.update({
    "add": "x: Real[n]\ny: Real[n]\no = sum(x + y)",
    "sub": "x: Real[n]\ny: Real\no = sum((x - y) ** 2)",
    "mul": "x: Real[n]\ny: Real[n]\no = sum(x * y * x)",
    "div": "x: Real[n]\ny: Real[n]\no = sum(x / y)",
    "pow": "x: Positive[n]\ny: Real\nz: Real[n]\no = sum(x ** 3 + x ** (1/2) + 2 ** z + x ** y + z ** 2)",
    "neg": "x: Real[n]\no = sum(-x * x)",
    "pos": "x: Real[n]\ny = x\no = sum(+y * x)",
    "xlogy": "x: Real[n]\ny: Positive[n]\no = sum(xlogy(x, y))",
    "atan2": "y: Real[n]\nx: Real[n]\no = sum(atan2(y, x))",
    "hypot": "a: Real[n]\nb: Real[n]\no = sum(hypot(a, b))",
    "maximum": "a: Real[n]\nb: Real[n]\no = sum(maximum(a, b) * a)",
    # The example point shows torch's forward-mode finding (docs/findings.md).
    "minimum": "a: Real[n] = [108086391056894080]\nb: Real[n] = [4503599627370497]\no = sum(minimum(a, b * b) * a)",
    "where": "x: Real[n]\ny: Real[n]\no = sum(where(x > y, x * y, exp(y / 8)))",
    "less": "x: Real[n]\no = sum(where(x < 0.5, x, 2 * x))",
    "less_equal": "x: Real[n]\no = sum(where(x <= 0, -x, x * x))",
    "greater": "x: Real[n]\no = sum(where(x > 1, x, 0))",
    "greater_equal": "x: Real[n]\no = sum(where(x >= 1, x, 3 * x))",
    "equal": "x: Real[n]\no = sum(where(x == 0, 1, x))",
    "not_equal": "x: Real[n]\no = sum(where(x != 0, x * x, 1))",
    "sum": "A: Real[n, m]\ns = sum(A ** 2, axis=1)\nt = sum(A, axis=0, keepdims=True)\no = sum(s) + sum(t * A)",
    "mean": "A: Real[n, m]\no = mean(mean(A ** 3, axis=-1))",
    "prod": "A: Real[n, m]\no = sum(prod(A, axis=1)) + prod(A)",
    "amax": "A: Real[n, m]\no = sum(amax(A, axis=0)) + amax(A * A)",
    "amin": "A: Real[n, m]\no = sum(amin(A, axis=1, keepdims=True) * A)",
    "logsumexp": "A: Real[n, m]\no = sum(logsumexp(A, axis=1)) + logsumexp(A)",
    "var": "A: Real[n, m]\no = sum(var(A, axis=0)) + var(A)",
    "std": "A: Real[n, m]\no = sum(std(A, axis=1))",
    "norm": "x: Real[n]\nA: Real[n, m]\no = norm(x) + norm(x, p=1) + norm(x, p=inf) + sum(norm(A, axis=0))",
    "cumsum": "A: Real[n, m]\no = sum(cumsum(A, axis=0) ** 2)",
    "cumprod": "x: Real[n]\no = sum(cumprod(x))",
    # The example point shows torch's forward-mode bug (docs/findings.md) in every dtype.
    "logcumsumexp": "x: Real[n] = [1, 46]\no = sum(logcumsumexp(x) * x)",
    "softmax": "A: Real[n, m]\no = sum(softmax(A, axis=1) * A)",
    "log_softmax": "x: Real[n]\nc: Real[n]\no = sum(log_softmax(x) * c)",
    "matmul": "A: Real[n, k]\nB: Real[k, m]\nv: Real[n]\no = sum((A @ B) ** 2) + (v @ A) @ (v @ A) + v @ v",
    "batched matmul": "A: Real[h, 1, n, k]\nB: Real[g, k, m]\nv: Real[k]\no = sum((A @ B) ** 2) + sum(A @ v)",
    "transpose": "A: Real[n, m]\nB: Real[n, m]\no = sum((A.T @ B) ** 2)",
    "dot": "x: Real[n]\ny: Real[n]\no = dot(x, y) * dot(x, x)",
    "outer": "x: Real[n]\ny: Real[m]\nW: Real[n, m]\no = sum(outer(x, y) * W)",
    "trace": "A: Real[n, n]\no = trace(A @ A)",
    "diag": "x: Real[n]\nA: Real[n, n]\no = sum(diag(x) @ A) + sum(diag(A) ** 2)",
    "reshape": "A: Real[n, m]\nB = reshape(A, shape=(m, n))\nf = reshape(A, shape=-1)\no = sum(B.T * A) + sum(f ** 3)",
    "concat": "x: Real[n]\ny: Real[m]\nz = concat(x, y * y, x)\no = sum(z * z * z)",
    "stack": "x: Real[n]\ny: Real[n]\nS = stack(x, y * x, axis=1)\no = sum(S ** 3)",
    "slice": "x: Real[n]\nA: Real[n, m]\no = sum(x[1:] * x[:-1]) + x[0] * x[-1] + sum(A[:, 0] ** 2)",
    "stop_gradient": "x: Real[n]\nw: Real[n]\ny = x + stop_gradient(x * w - x)\no = sum(y * y)",
    "round": "x: Real[n]\no = sum(round(x) * x)",
    "floor": "x: Real[n]\no = sum(floor(x) * x)",
    "ceil": "x: Real[n]\no = sum(ceil(x) * x)",
    "trunc": "x: Real[n]\no = sum(trunc(x) * x)",
    "clamp": "x: Real[n]\nlo: Real\nhi: Real\no = sum(clamp(x, lo, hi) * x) + sum(clamp(x, -1, 1) ** 2)",
    "logical_and": "x: Real[n]\ny: Real[n]\no = sum(where(x > 0 and y < 1, x * y, y))",
    "logical_or": "x: Real[n]\no = sum(where(x < -1 or x > 1, x * x, x))",
    "logical_not": "x: Real[n]\no = sum(where(not x > 0, x * x, x))",
    "take": "z: Real[b, c]\nt: Integer(0, c)[b]\nk: Integer(0, c)[b, m]\no = sum(take(z, t) ** 2) + sum(take(z, k) * z[:, :1])",
    "one_hot": "z: Real[b, c]\nt: Integer(0, c)[b]\no = -sum(one_hot(t, c) * log_softmax(z, axis=1))",
    "index": "E: Real[k, d]\nt: Integer(0, k)[n]\no = sum(E[t] ** 3)",
    "sort": "x: Real[n]\nw: Real[n]\no = sum(sort(x) * w) + sum(sort(x, descending=True) * x)",
    "topk": "x: Real[n]\no = sum(topk(x, 2) ** 2)",
    "argmax": "A: Real[m, n]\no = sum(take(A * A, argmax(A, axis=1)))",
    "argmin": "A: Real[m, n]\nB: Real[m, n]\no = sum(take(B, argmin(A, axis=1)) * A[:, 0])",
    "permute": "A: Real[a, b, c]\nP = permute(A, (2, 0, 1))\no = sum(P ** 3) + sum(P[0] * P[-1])",
    "swapaxes": "A: Real[a, b, c]\nS = swapaxes(A, 0, 2)\no = sum(S ** 3) + sum(S[0])",
    "einsum": "A: Real[b, n, k]\nB: Real[b, k, m]\nw: Real[m]\nC = einsum(\"bnk,bkm->bmn\", A, B)\n"
              "o = sum(einsum(\"bmn,m\", C ** 2, w)) + einsum(\"bnk->\", A)",
    "conv1d": "x: Real[b, c, l]\nw: Real[f, c, k]\no = sum(conv1d(x, w) ** 2) + sum(conv1d(x, w, stride=2, padding=1, dilation=2))",
    "conv2d": "x: Real[1, 2, h, v]\nw: Real[2, 2, k, j]\no = sum(conv2d(x, w, padding=(1, 0)) ** 2)",
    "max_pool1d": "x: Real[c, l]\no = sum(max_pool1d(x, kernel=2) ** 2)",
    "avg_pool1d": "x: Real[c, l]\no = sum(avg_pool1d(x, kernel=3, stride=1) ** 2)",
    "max_pool2d": "x: Real[b, c, h, v]\no = sum(max_pool2d(x, kernel=2) ** 3)",
    "avg_pool2d": "x: Real[b, c, h, v]\no = sum(avg_pool2d(x, kernel=(2, 1)) ** 2)",
    "det": "A: Real[n, n]\no = det(A)",
    "inv": "A: Real[n, n]\nb: Real[n]\no = sum(inv(A) @ b)",
})

# A false claim per row: dropping the inner derivative (2 * y), or a derivative of zero.
FALSE_CLAIMS = {op: "grad(o, x) == 2 * y" for op in [*UNARY_REAL, *UNARY_DOMAIN]}
FALSE_CLAIMS.update({"relu": "grad(o, x) == 2 * x", "sign": "grad(o, x) == 1 + 0 * x",
                     "stop_gradient": "grad(o, x) == 2 * y * w",  # as if the gradient flowed on
                     # as if rounding passed the gradient straight through
                     **{op: f"grad(o, x) == {op}(x) + x" for op in ("round", "floor", "ceil", "trunc")}})
# torch's own inaccuracies found by these rows, kept as findings rather than tolerated, with
# the check that finds them: digamma's backward (trigamma) is off by 5e-10 relative at x = 1
# in float64; logcumsumexp's forward-mode derivative is off by 2.9e-7 at x = [1, 46], and
# minimum's by 1 at its row's example point (docs/findings.md).
# Where torch's own kernels are off, the checks that can see it: atan2's backward and forward
# formulas share their overflowing 1 / (x² + y²), and cumprod's both divide by x, so the first
# one drawn finds it.
BOTH = frozenset({"gradient", "JVP"})
TORCH_FINDINGS = {("digamma", torch.float64): {"gradient"}, ("logcumsumexp", torch.float64): {"JVP"},
                  ("logcumsumexp", torch.float32): {"JVP"}, ("minimum", torch.float64): {"JVP"},
                  ("asinh", torch.float32): {"gradient"}, ("atan2", torch.float64): BOTH,
                  ("atan2", torch.float32): BOTH, ("minimum", torch.float32): {"JVP"},
                  ("cumprod", torch.float64): BOTH}

def torch_finding(op: str, dtype: torch.dtype, check: str) -> bool:
    """Whether ``check`` failing on torch's own ``op`` in ``dtype`` is a recorded finding: one
    the rows reach, or one of ``verify.findings`` (measured by the benchmarks at many points)."""
    return check in TORCH_FINDINGS.get((op, dtype), ()) or findings.recorded(op, dtype, check)

# Each op's rows run in one xdist worker (--dist loadgroup), so that its dtypes share the plan.
OPS = [pytest.param(op, marks=pytest.mark.xdist_group(op)) for op in sorted(ROWS)]


def first_input(spec_text: str) -> str:
    return spec_text.split(":", 1)[0]


def test_every_registry_op_has_a_row():
    assert set(ROWS) - {"batched matmul"} == set(REGISTRY)


# A row where torch's own inaccuracy is found by drawing runs the examples it takes to find it
# (the others' findings are at their example points).
FOUND_BY_DRAWING = {"digamma": EXAMPLES, "asinh": EXAMPLES, "atan2": 2 * EXAMPLES, "cumprod": EXAMPLES}


def _row_marks(op: str, dtype: torch.dtype) -> list:
    """Each op's rows in one worker; the examples a finding by drawing takes; and float32's rows,
    but for its findings, in the thorough profile only (the quick one checks every op in float64,
    and float32 through the other tests)."""
    marks = [pytest.mark.xdist_group(op)]
    if (op, dtype) in TORCH_FINDINGS and op in FOUND_BY_DRAWING:
        marks.append(pytest.mark.examples(FOUND_BY_DRAWING[op]))
    if dtype == torch.float32 and (op, dtype) not in TORCH_FINDINGS:
        marks.append(pytest.mark.thorough)
    return marks


ROWS_BY_DTYPE = [pytest.param(op, dtype, id=f"{op}-{str(dtype)[6:]}", marks=_row_marks(op, dtype))
                 for op in sorted(ROWS) for dtype in (torch.float64, torch.float32)]


@pytest.mark.parametrize("op, dtype", ROWS_BY_DTYPE)
def test_correct_spec_passes(op, dtype):
    if (op, dtype) in TORCH_FINDINGS:
        with pytest.raises(verify.Mismatch) as caught:
            verify.check(ROWS[op], seed=1, dtype=dtype, max_examples=FOUND_BY_DRAWING.get(op, EXAMPLES))
        assert caught.value.failure.check in TORCH_FINDINGS[op, dtype]
        return
    result = verify.check(ROWS[op], seed=1, dtype=dtype, max_examples=EXAMPLES)
    assert result.points > 0


# The quick profile refutes a claim on every op with a claim of its own and on every fourth of
# the rest (each kind of op among them); the thorough profile, on all.
CLAIMED = [pytest.param(op, marks=[pytest.mark.xdist_group(op)] +
                        ([] if op in FALSE_CLAIMS or k % 4 == 0 else [pytest.mark.thorough]))
           for k, op in enumerate(sorted(ROWS))]


@pytest.mark.parametrize("op", CLAIMED)
def test_false_claim_is_refuted(op, monkeypatch):
    # Refuted is the point here, not how small the counterexample.
    monkeypatch.setattr(engine, "SHRINK_SECONDS", 0.0)
    monkeypatch.setattr(engine, "SIMPLIFY_SECONDS", 0.0)
    name = first_input(ROWS[op])
    claim = FALSE_CLAIMS.get(op, f"grad(o, {name}) == 0 * {name}")
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(ROWS[op] + f"\nassert {claim}", seed=2, max_examples=EXAMPLES, modes=("rev",))
    assert caught.value.failure.check in ("claim", "gradient", "value")


def test_readme_op_table_is_generated_from_the_registry():
    from pathlib import Path

    from verify.ops import op_table

    page = (Path(__file__).resolve().parent.parent / "docs" / "ops.md").read_text()
    assert op_table() in page, "regenerate the table in docs/ops.md with verify.ops.op_table()"


def test_torch_finding_minimums_forward_mode_loses_the_selected_tangent():
    # torch's JVP of minimum is other_t + mask * (self_t - other_t): where the other operand's
    # tangent is 2**53 times larger, the selected one is lost to rounding (2 instead of 1 here).
    spec = "a: Real[n] = [108086391056894080]\nb: Real[n] = [4503599627370497]\no = sum(minimum(a, b * b))"
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(spec, seed=0, max_examples=1)
    assert caught.value.failure.check == "JVP"
    verify.check(spec, seed=0, max_examples=1, modes=("rev",))  # its backward is right


@pytest.mark.examples(100)  # the regime is reached by a wide bulk, one example in eight
def test_a_failure_of_torchs_own_op_in_a_recorded_findings_regime_names_the_finding():
    # atan2's backward forms 1 / (x² + y²): at y = 1.34e154 (in a tensor long enough for the
    # vectorized kernel) it overflows, and torch gives 0 for ∂/∂y where 5.6e-308 is right. The
    # check fails, and says that torch is what is off; a function that calls torch.atan2 is
    # told that it may be the same finding.
    spec = ROWS["atan2"]
    with pytest.raises(verify.Mismatch) as caught:
        verify.check(spec, seed=0, max_examples=100, modes=("rev",))
    notes = caught.value.failure.notes
    assert any("recorded finding in torch's own atan2" in note and "torch is off here" in note for note in notes)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda y, x: torch.atan2(y, x).sum(), spec, seed=0, max_examples=100, modes=("rev",))
    assert any(note.startswith("if the function calls torch's atan2 here") for note in caught.value.failure.notes)
    # A bug at ordinary points names no finding.
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(lambda y, x: torch.atan2(x, y).sum(), spec, seed=0, max_examples=5, modes=("rev",))
    assert not any("recorded finding" in note for note in caught.value.failure.notes)


def test_prods_partial_products_that_flush_to_zero_reject_its_own_lowering_and_fail_code_naming_the_finding():
    # The point: torch's prod forms 1e-122 * 5e-123 * 6e-123, which flushes to 0 on the
    # way to the exact product 5.3e-62, and its backward divides that product by each factor.
    # For verify.check that is a step of torch's own lowering leaving the range: the point is
    # rejected. Code (here torch.prod itself) is judged exactly there, and fails, naming the finding.
    spec = "x: Positive[n] = [1e-122, 5e-123, 6e-123, 1.76e305, 1]\no = prod(x)"
    result = verify.check(spec, seed=0, max_examples=1, modes=("rev",))
    assert any(reason.startswith("a step of the value of o leaves float64's range") for reason in result.rejected)
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(torch.prod, spec, seed=0, max_examples=1, modes=("rev",))
    assert caught.value.failure.check == "gradient"
    assert any("recorded finding in torch's own prod" in note for note in caught.value.failure.notes)


def test_rsqrts_backward_cubing_its_result_past_the_range_fails_code_naming_the_finding():
    # torch's rsqrt backward is -0.5 * grad * result³: at x = 4.9e-4 in float16 the cube (92290)
    # overflows where the gradient (-46145) is representable.
    spec = "x: Positive[n] = [0.0004897117614746094, 1]\no = rsqrt(x)"
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(torch.rsqrt, spec, seed=0, max_examples=1, modes=("rev",), dtype=torch.float16)
    assert caught.value.failure.check == "gradient"
    assert any("recorded finding in torch's own rsqrt" in note for note in caught.value.failure.notes)
