"""Specs traced from torch references (verify.spec_from, check_function(reference=), verify trace)."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

import verify
from examples import references
from tests.conftest import silu_scaled
from tests.test_ops import ROWS
from verify.cli import main
from verify.lower.sympy import in_inputs, prove_equal
from verify.lower.torch import TorchProgram
from verify.trace import proves_equal, trace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_layer_norm_traces_to_a_spec_that_sympy_proves_equal_to_the_hand_written_one():
    bounded = {name: (-10000, 10000) for name in ("x", "w", "b")}
    traced = verify.spec_from(references.layer_norm, torch.randn(3, 8), torch.randn(8), torch.randn(8),
                              sizes={"x": ("m", "n")}, domains=bounded)
    assert "x: Interval(-10000, 10000)[m, n]" in traced.source
    assert proves_equal(traced, verify.load(EXAMPLES / "layer_norm.vspec"))


def test_cross_entropy_traces_with_its_targets_ranging_over_the_classes_and_equals_the_example():
    traced = verify.spec_from(references.cross_entropy, torch.randn(3, 5), torch.tensor([1, 2, 4]),
                              sizes={"z": ("b", "c")})
    assert "t: Integer(0, c)[b]" in traced.source
    assert proves_equal(traced, verify.load(EXAMPLES / "cross_entropy.vspec"))
    # A spec that differs is not proved equal.
    assert not proves_equal(traced, verify.parse("z: Real[b, c]\nt: Integer(0, c)[b]\n"
                                                 "o = sum(logsumexp(z, axis=1) - take(z, t))"))


def test_label_smoothing_folds_the_ignored_targets_outside_the_classes_and_the_spec_checks():
    traced = verify.spec_from(references.smoothed_cross_entropy, torch.randn(3, 5), torch.tensor([1, 2, 4]))
    assert "where" not in traced.source and "1/10 / m" in traced.source
    assert verify.check(traced, seed=0, max_examples=5).points > 0


def test_constants_are_the_exact_rationals_of_their_shortest_repr_and_sizes_stay_symbolic():
    traced = verify.spec_from(references.gelu_tanh, torch.randn(5))
    assert "8943/200000" in traced.source  # 0.044715
    assert "3989422804014327/5000000000000000" in traced.source  # math.sqrt(2 / math.pi), a float64
    assert "x: Real[n]" in traced.source
    wider = verify.spec_from(references.swiglu, torch.randn(3, 8), torch.randn(6, 8), torch.randn(6, 8),
                             torch.randn(8, 6))
    # Dims whose example sizes are equal (8 and 8) are not tied: each is its own symbol.
    assert "x: Real[n, m]" in wider.source and "down: Real[p, k]" in wider.source


def test_an_upcast_is_recorded_and_tells_check_function_the_compute_dtype():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    traced = trace(references.rmsnorm, (x, w))
    assert traced.compute_dtype == torch.float32
    assert "# cast bfloat16 -> float32 at references.py" in traced.text
    assert "h = x.to(torch.float32)" in traced.text


def test_check_function_against_a_reference_passes_a_correct_kernel_and_shows_the_traced_spec_on_a_bug():
    reference = lambda x: x * torch.sigmoid(x)
    result = verify.check_function(silu_scaled(1.0), reference=reference, example_inputs=(torch.randn(4),),
                                   modes=("rev",), seed=0, max_examples=10)
    assert result.points > 0
    with pytest.raises(verify.Mismatch) as caught:
        verify.check_function(silu_scaled(1.01), reference=reference, example_inputs=(torch.randn(4),),
                              modes=("rev",), seed=0, max_examples=10)
    assert caught.value.failure.check == "gradient"
    assert "the spec traced from the reference:" in str(caught.value) and "sigmoid(x)" in str(caught.value)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 6)

    def forward(self, x):
        return torch.tanh(self.proj(x))


def test_a_module_traces_with_its_parameters_as_inputs_named_as_check_function_binds_them():
    module = _Block().double()
    traced = verify.spec_from(module, torch.randn(3, 8, dtype=torch.float64))
    assert "proj_weight: Real[" in traced.source and "proj_bias: Real[" in traced.source
    assert verify.check_function(module, traced, modes=("rev",), seed=0, max_examples=5).points > 0


def _data_dependent(x):
    if x.sum() > 0:
        return x
    return -x


def _unsupported(x):
    return torch.fft.fft(x).real


def _size_dependent(x):
    if x.shape[0] > 4:
        return x * 2
    return x


@pytest.mark.parametrize("fn, says", [
    (_data_dependent, "if x.sum() > 0:"),
    (_unsupported, "aten._fft_r2c"),
    (_size_dependent, "depends on the sizes"),
])
def test_untraceable_code_is_a_spec_error_naming_what_and_where(fn, says):
    inputs = (torch.randn(3, 6),) * len(inspect.signature(fn).parameters)
    with pytest.raises(verify.SpecError) as caught:
        verify.spec_from(fn, *inputs)
    assert says in str(caught.value)
    assert "test_trace.py" in str(caught.value)


def test_example_inputs_that_do_not_match_the_parameters_are_a_spec_error_naming_them():
    with pytest.raises(verify.SpecError, match=r"takes 3 inputs \(x, cos, sin\); 1 example inputs were given"):
        verify.spec_from(references.rotary, torch.randn(3, 8))


def test_a_rotary_embedding_halves_its_last_size_with_floor_division_and_checks_for_odd_sizes_too():
    traced = verify.spec_from(references.rotary, torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8),
                              sizes={"x": ("b", "d")})
    # cos and sin are op names: the inputs get a trailing underscore, and bind by position.
    assert "cos_: Real[b, d]" in traced.source and "x[:, (d // 2):]" in traced.source
    assert verify.check(traced, seed=0, max_examples=5).points > 0
    with pytest.raises(verify.Mismatch):  # a swapped rotation is told apart
        verify.check_function(lambda x, c, s: x * c + torch.cat((x[..., x.shape[-1] // 2:], -x[..., :x.shape[-1] // 2]),
                                                                 dim=-1) * s, traced, seed=0, max_examples=5)


def _in_place(x):
    h = x * 1
    h.mul_(2)
    return h.exp_() + x


def _scalar_constants(x):
    return torch.where(x > torch.tensor(0.5), x, torch.tensor(0.25))


def test_in_place_ops_and_scalar_tensor_constants_trace_as_the_values_torch_computes():
    traced = verify.spec_from(_in_place, torch.randn(4))
    assert verify.check_function(_in_place, traced, seed=0, max_examples=5).points > 0
    assert "exp(" in traced.source
    constants = verify.spec_from(_scalar_constants, torch.randn(4))
    assert "where(x > 1/2, x, 1/4)" in constants.source
    # A write into an element (h[0] = 0) has no spelling: refused at its line.
    def written(x):
        h = x.clone()
        h[0] = 0.0
        return h

    with pytest.raises(verify.SpecError, match="aten.copy"):
        verify.spec_from(written, torch.randn(4))


def test_an_integer_input_with_nothing_to_range_over_asks_for_its_domain():
    with pytest.raises(verify.SpecError, match=r"domains=\{'t': \(low, high\)\}"):
        verify.spec_from(lambda x, t: x * t, torch.randn(3), torch.tensor([1, 2, 3]))


def test_the_trace_command_writes_a_spec_that_checks_and_refuses_untraceable_code_with_exit_2(tmp_path, capsys,
                                                                                             monkeypatch):
    out = tmp_path / "rmsnorm.vspec"
    command = [sys.executable, "-m", "verify", "trace", "examples.references:rmsnorm", "--shape", "x=4,8",
               "--shape", "w=8", "--dtype", "bfloat16", "--sizes", "x=b,n", "-o", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    text = out.read_text()
    assert "x: Real[b, n]" in text and "# cast bfloat16 -> float32" in text
    assert verify.check(verify.load(out), seed=0, max_examples=5).points > 0
    monkeypatch.chdir(ROOT)
    refused = main(["trace", "tests.test_trace:_unsupported", "--shape", "x=6"])
    stderr = capsys.readouterr().err
    assert refused == 2 and "Traceback" not in stderr and "aten._fft_r2c" in stderr


# -- the round trip: each registry op's row, lowered to torch, traced back into a spec ------

# Rows that do not come back, by reason (docs/checking-your-code.md lists them).
REFUSED = {
    # aten ops with no registry spelling: the lowering computes them so.
    "argmax": "gather", "argmin": "gather", "take": "gather", "det": "_linalg_det", "diag": "diag_embed",
    "index": "arange", "inv": "linalg_inv_ex", "one_hot": "all", "trace": "diagonal",
    # torch's convolution checks its window against the input size, which symbolic sizes cannot decide
    "conv1d": "sizes", "conv2d": "sizes",
    # an unsqueeze or view of two or more symbolic sizes: the spec's reshape takes constant sizes
    "avg_pool1d": "reshape", "avg_pool2d": "reshape", "max_pool1d": "reshape", "max_pool2d": "reshape",
    "einsum": "reshape",
    # the batch axis the lowering adds: a broadcast batched matmul, reshapes through it
    "batched matmul": "batch", "clamp": "batch", "dot": "batch", "matmul": "batch", "outer": "batch",
    "pow": "batch", "prod": "batch", "reshape": "batch", "sub": "batch",
    # the lowering's detach().requires_grad_(), which functionalization refuses (a user's detach traces)
    "stop_gradient": "requires_grad_",
}


def round_trip(text: str) -> verify.Spec:
    """``text``'s torch lowering (its batch axis first) traced back into a spec, each input
    named and bounded as in ``text``."""
    spec = verify.parse(text)
    output, names = spec.output, list(spec.inputs)
    program = TorchProgram(spec, {spec.nodes[output]: output})
    symbols = {}
    for name, declared in spec.inputs.items():
        for k, dim in enumerate(declared.shape):
            if not isinstance(dim, int):
                symbols.setdefault(str(dim), (name, k))

    def lowered(*tensors):
        sizes = {s: tensors[names.index(name)].shape[k + 1] for s, (name, k) in symbols.items()}
        return program.run(dict(zip(names, tensors)), sizes, tensors[0].dtype, retain=False)[output]

    lowered.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    example_sizes = {s: 3 + k for k, s in enumerate(symbols)}
    examples, domains = [], {}
    for name, declared in spec.inputs.items():
        shape = (2,) + tuple(d if isinstance(d, int) else example_sizes[str(d)] for d in declared.shape)
        if declared.integer:
            examples.append(torch.zeros(shape, dtype=torch.int64))
            continue
        examples.append(torch.rand(shape, dtype=torch.float64) + 0.5)
        domain = declared.domain
        domains[name] = domain.name if domain.name != "Interval" else (domain.low, domain.high)
    named = {n: ("batch",) + tuple(str(d) for d in spec.inputs[n].shape) for n in names}
    return trace(lowered, examples, sizes=named, domains=domains).spec


def traces_back(op: str) -> bool:
    """Whether sympy proves ``op``'s row equal to its traced lowering, point by point of the batch."""
    original, traced = verify.parse(ROWS[op]), round_trip(ROWS[op])
    theirs = in_inputs(traced, traced.nodes[traced.output])
    mine = in_inputs(original, original.nodes[original.output])
    batch = theirs.indices[0]
    bases = {e.base.label.name: e.base for e in theirs.expr.atoms(sympy.Indexed)}
    renamed = mine.expr.xreplace(dict(zip(mine.indices, theirs.indices[1:])))
    batched = renamed.replace(lambda e: isinstance(e, sympy.Indexed) and e.base.label.name in bases,
                              lambda e: bases[e.base.label.name][(batch, *e.indices)])
    return prove_equal(theirs, batched)


QUICK_ROUND_TRIP = ("softmax", "concat", "where")


@pytest.mark.parametrize("op", [pytest.param(op, marks=[] if op in QUICK_ROUND_TRIP else [pytest.mark.thorough])
                                for op in sorted(ROWS)])
def test_each_registry_op_traces_back_to_its_own_spec_or_is_refused_for_its_listed_reason(op):
    if op in REFUSED:
        with pytest.raises((verify.SpecError, AssertionError)):
            assert traces_back(op)
        return
    assert traces_back(op)


def test_the_round_trip_count_in_the_docs_is_the_registry_less_the_refused_rows():
    page = (ROOT / "docs" / "checking-your-code.md").read_text()
    assert f"{len(ROWS) - len(REFUSED)} of the {len(ROWS)} op rows trace back" in page


def _fuzz_specs(count: int) -> list:
    from hypothesis import HealthCheck, given, settings

    from verify.fuzz import fuzzable_ops, spec_texts

    drawn = []

    @settings(max_examples=count, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(spec_texts(fuzzable_ops()))
    def collect(text):
        drawn.append(text)

    collect()
    return drawn


@pytest.mark.thorough
def test_fuzz_drawn_specs_trace_back_to_a_spec_that_is_proved_or_agrees_with_their_lowering_or_are_refused(
        monkeypatch):
    count = 40
    # A traced spec is never wrong: sympy proves it equal to the drawn one, or (where a sum over
    # the batch axis defeats simplify) torch's lowering, the function traced, agrees with it;
    # or torch fixed a size as it traced, and the spec holds at that size.
    outcomes = {"proved": 0, "agrees": 0, "refused": 0, "specialized": 0}
    for text in _fuzz_specs(count):
        monkeypatch.setitem(ROWS, "drawn", text)
        try:
            proved = traces_back("drawn")
        except verify.SpecError:
            outcomes["refused"] += 1
            continue
        if proved:
            outcomes["proved"] += 1
            continue
        traced = round_trip(text)
        spec = verify.parse(text)
        if any(traced.inputs[name].shape[1:] != declared.shape for name, declared in spec.inputs.items()):
            outcomes["specialized"] += 1  # the lowering fixed a size (reshape(..., shape=-1) reads it)
            continue
        program = TorchProgram(spec, {spec.nodes[spec.output]: spec.output})

        def lowered(*tensors, spec=spec, program=program):
            sizes = {d.name: tensors[k].shape[i + 1] for k, declared in enumerate(spec.inputs.values())
                     for i, d in enumerate(declared.shape) if not isinstance(d, int)}
            return program.run(dict(zip(spec.inputs, tensors)), sizes, tensors[0].dtype, retain=False)[spec.output]

        assert verify.check_function(lowered, traced, modes=("rev",), seed=0, max_examples=5).points > 0
        outcomes["agrees"] += 1
    assert outcomes["proved"] >= count // 3, outcomes


def test_an_overload_outside_the_spelling_is_refused_naming_it_not_a_traceback():
    with pytest.raises(verify.SpecError, match=r"argmax without dim=, or with keepdim=True"):
        verify.spec_from(lambda x: x * x.argmax(-1, keepdim=True), torch.randn(3, 8))
    with pytest.raises(verify.SpecError, match=r"rounding_mode='floor'"):
        verify.spec_from(lambda x: torch.div(x, 2, rounding_mode="floor"), torch.randn(3, 8))
