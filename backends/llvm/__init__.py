"""The CPU backend: kernels as LLVM IR through llvmlite."""
