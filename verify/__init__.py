"""verify: check torch's autograd against sympy's exact derivatives, on Hypothesis-drawn inputs.

>>> import verify
>>> verify.check("x: Real[n]\\no = sum(exp(x))").points > 0
True

The names below load on first use, so that ``import verify`` (as the pytest plugin does in
every test session) costs nothing until a spec is checked.
"""

from importlib import import_module as _import_module

_HOMES = {
    "check": ".api", "check_function": ".api", "load": ".api",
    "Inconclusive": ".errors", "Mismatch": ".errors", "SpecError": ".errors", "Unchecked": ".errors",
    "Unsupported": ".errors",
    "VerifyError": ".errors",
    "Spec": ".ir", "Result": ".report", "parse": ".spec", "spec_from": ".trace",
}

__all__ = ["Inconclusive", "Mismatch", "Result", "Spec", "SpecError", "Unchecked", "Unsupported", "VerifyError",
           "check", "check_function", "load", "parse", "spec_from"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'verify' has no attribute {name!r}")
    value = getattr(_import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
