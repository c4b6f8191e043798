"""Backends: reference (numpy interpreter, the oracle) and llvm (native CPU code)."""
