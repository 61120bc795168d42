"""verify: check torch's autograd against sympy's exact derivatives, on Hypothesis-drawn inputs.

>>> import verify
>>> verify.check("x: Real[n]\\no = sum(exp(x))").points > 0
True
"""

from .api import check, check_function, load
from .errors import Mismatch, SpecError, Unchecked, Unsupported, VerifyError
from .ir import Spec
from .report import Result
from .spec import parse

__all__ = ["Mismatch", "Result", "Spec", "SpecError", "Unchecked", "Unsupported", "VerifyError", "check",
           "check_function", "load", "parse"]
