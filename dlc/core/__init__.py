"""The core every later stage builds on: dtypes and shapes, diagnostics, the primitive
op set, the graph IR and its builder and printer, and the kernel IR. It imports nothing
from the language, the passes, the backends or the driver."""
