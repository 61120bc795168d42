"""Lowerings of the IR: to sympy in index notation (the oracle) and to torch (under test)."""
