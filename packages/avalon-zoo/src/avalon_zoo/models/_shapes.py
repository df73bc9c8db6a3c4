"""The input check every zoo model runs first: a wrong shape raises avalon.ShapeError
naming the model, the shapes it accepts and the shape it got, at the user's line."""
from __future__ import annotations

import avalon
from avalon.errors import at, user_location


def _fits(shape: tuple, layout: tuple) -> bool:
    return len(shape) == len(layout) and all(want is None or want == got for want, got in zip(layout, shape))


def _describe(layout: tuple) -> str:
    """(None, 1, 28, 28) -> "(N, 1, 28, 28)"; a free size after the batch is "*"."""
    sizes = [str(d) if d is not None else ("N" if i == 0 else "*") for i, d in enumerate(layout)]
    return "(" + ", ".join(sizes) + ")"


def check_input(model, x, *layouts: tuple) -> int:
    """Raise ShapeError unless x's shape fits one of `layouts` (tuples of sizes; None
    matches any size); returns the index of the layout that fits."""
    shape = tuple(x.shape)
    for i, layout in enumerate(layouts):
        if _fits(shape, layout):
            return i
    expected = " or ".join(_describe(layout) for layout in layouts)
    raise avalon.ShapeError(f"{type(model).__name__} expects input of shape {expected}, got {shape}"
                            f"{at(user_location())}")
