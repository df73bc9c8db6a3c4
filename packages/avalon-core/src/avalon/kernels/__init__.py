"""Array-module-generic compute kernels (NumPy on CPU, CuPy on GPU)."""
