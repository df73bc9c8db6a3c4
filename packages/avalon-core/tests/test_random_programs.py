"""Differential test: seeded random programs (small DAGs of elementwise ops,
scalar constants, broadcasting, reductions, reshapes, slices, concatenation,
matmul, softmax and where, ending in a scalar loss) compiled by avalon.grad and
avalon.jit give PyTorch's values and gradients: tightly in float64, within
float32 rounding in float32.

A failure prints the program, as Avalon and as PyTorch source, with the seed
and index that rebuild it: `avalon.testing.random_programs.random_program(seed, index)`."""
from __future__ import annotations

import dataclasses
import re

import pytest

from avalon.testing.random_programs import BINARY, REDUCTIONS, UNARY, check_against_torch, random_program

pytest.importorskip("torch")

SEED = 0
FLOAT64_PROGRAMS = range(600)
FLOAT32_PROGRAMS = range(10_000, 10_200)   # other programs than the float64 ones


@pytest.mark.parametrize("index", FLOAT64_PROGRAMS, ids=lambda i: f"program{i}")
def test_random_program_matches_torch_in_float64(index):
    check_against_torch(random_program(SEED, index), "float64")


@pytest.mark.parametrize("index", FLOAT32_PROGRAMS, ids=lambda i: f"program{i}")
def test_random_program_matches_torch_in_float32(index):
    check_against_torch(random_program(SEED, index), "float32")


# -- the generator ----------------------------------------------------------------------------------

def test_a_program_is_rebuilt_identically_from_its_seed_and_index():
    assert random_program(SEED, 7).describe() == random_program(SEED, 7).describe()
    assert random_program(SEED, 7).describe() != random_program(SEED, 8).describe()
    assert random_program(SEED, 7).describe() != random_program(SEED + 1, 7).describe()


def test_the_programs_tested_use_every_op():
    kinds = {line.kind for i in FLOAT64_PROGRAMS for line in random_program(SEED, i).lines}
    wanted = set(UNARY) | set(BINARY) | set(REDUCTIONS) | {
        "clip", "scalar", "reshape", "transpose", "getitem", "concatenate", "stack", "squeeze", "expand_dims",
        "broadcast_to", "matmul", "softmax", "log_softmax", "where", "guard", "loss"}
    assert wanted - kinds == set()


def test_the_programs_tested_include_a_reduction_times_a_chain_of_constants():
    """The shape of `x.mean() * 0.5 / 2`, which once crashed the compiler."""
    chained = [i for i in FLOAT64_PROGRAMS
               if any(re.fullmatch(r"\(.*\) \* -?[\d.]+ / -?[\d.]+", line.avalon)
                      for line in random_program(SEED, i).lines)]
    assert len(chained) >= 20, chained


# -- the checker ------------------------------------------------------------------------------------

def _with_line(program, k, **changes):
    lines = list(program.lines)
    lines[k] = dataclasses.replace(lines[k], **changes)
    return dataclasses.replace(program, lines=lines)


def test_a_wrong_result_fails_and_the_message_shows_the_program_and_its_seed():
    program = random_program(SEED, 3)
    loss = program.lines[-1]
    wrong = _with_line(program, len(program.lines) - 1, torch=f"({loss.torch}) * 1.001")
    with pytest.raises(AssertionError) as info:
        check_against_torch(wrong, "float64")
    message = str(info.value)
    assert "loss value" in message and f"seed={SEED} index=3" in message
    assert f"random_program({SEED}, 3)" in message
    assert all(f"{line.target} = {line.avalon}" in message for line in program.lines)


def test_a_crash_fails_with_the_program_and_the_error():
    program = random_program(SEED, 3)
    broken = _with_line(program, 0, avalon=f"avalon.no_such_op({program.input_names[0]})")
    with pytest.raises(AssertionError) as info:
        check_against_torch(broken, "float64")
    message = str(info.value)
    assert "AttributeError" in message and "no_such_op" in message and f"seed={SEED} index=3" in message
