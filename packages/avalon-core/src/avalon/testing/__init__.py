"""Test support for Avalon and for third-party backends.

* `avalon.testing.cases`: the primitive test table (`CASES`), one `OpCase` per
  op and configuration, with input specs and PyTorch references.
* `avalon.testing.conformance`: a pytest module that checks a backend against
  the table (eager, jit and grad on the device equal the CPU backend):

      AVALON_TEST_DEVICE=cuda python3 -m pytest --pyargs avalon.testing.conformance

  or, without pytest: `avalon.testing.conformance.run_conformance("cuda")`.
  A device the suite cannot test is reported once: an unknown name is one error,
  an installed backend that is not usable here skips every test with its reason.
* `avalon.testing.random_programs`: seeded random programs (small DAGs of ops
  over random shapes) as Avalon and PyTorch source, and `check_against_torch`,
  which compares avalon.grad and avalon.jit with torch.autograd.
* `avalon.testing.numerical_gradient`: central finite differences in float64.
"""
from .cases import (CASES, CHECKS, DOMAINS, FLOAT, Arg, Bug, OpCase, as_list, case_by_id,  # noqa: F401
                    cases_for, index_domain, make_inputs, resolve_dtype)
from .random_programs import RandomProgram, check_against_torch, random_program  # noqa: F401
from .numerical import numerical_gradient  # noqa: F401
