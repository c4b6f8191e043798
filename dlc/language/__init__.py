"""The .dln language: syntax (Lark grammar -> AST), the frontend that type-checks a
program and builds its graph, the built-in layers (composites of primitives), and the
train block's vocabulary. Imports only dlc.core."""
