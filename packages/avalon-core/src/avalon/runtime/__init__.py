"""Running compiled code: what executes a compiled graph, as opposed to the
passes that analyse and transform it (avalon.passes) and the code generator
that writes it (avalon.codegen).

- `native`: C sources built into shared objects with the system compiler,
  cached on disk by a hash of source, compiler and flags, loaded with ctypes.
- `threads`: a compiled step on several cores (batch shards, independent parts, BLAS threads, autotuning).
"""
