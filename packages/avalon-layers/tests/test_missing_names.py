"""A name missing from avalon.nn / avalon.nn.functional / avalon.optim / avalon
suggests the names the user most likely meant (PyTorch spellings with another
case, typos, a name living in a sibling namespace) instead of an alphabetical
excerpt."""
import pytest

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim

# (module, missing name, a suggestion the message must contain)
CASES = [
    (nn, "Relu", "ReLU"),                  # case only
    (nn, "relu", "ReLU"),
    (nn, "Conv2D", "Conv2d"),
    (nn, "batchnorm2d", "BatchNorm2d"),
    (nn, "Linaer", "Linear"),              # a typo
    (nn, "MaxPool2D", "MaxPool2d"),
    (F, "Relu", "relu"),
    (F, "maxpool2d", "max_pool2d"),        # underscores
    (F, "crossentropy", "cross_entropy"),
    (F, "log_sofmax", "log_softmax"),
    (optim, "adam", "Adam"),
    (optim, "SDG", "SGD"),
]


@pytest.mark.parametrize("module, name, expected", CASES, ids=[f"{m.__name__}.{n}" for m, n, _ in CASES])
def test_missing_name_suggests_the_closest_names(module, name, expected):
    with pytest.raises(AttributeError) as info:
        getattr(module, name)
    message = str(info.value)
    assert f"has no attribute {name!r}" in message
    assert "did you mean" in message and expected in message, message


def test_case_insensitive_match_comes_first():
    with pytest.raises(AttributeError, match=r"did you mean ReLU\b"):
        nn.Relu


def test_suggestions_are_few_and_not_an_alphabetical_excerpt():
    with pytest.raises(AttributeError) as info:
        nn.Relu
    message = str(info.value)
    first_alphabetical = sorted(avalon.nn.__dir__())[:3]
    assert not all(name in message for name in first_alphabetical), message
    suggested = message.split("did you mean ", 1)[1].split("?")[0].split(", ")
    assert 1 <= len(suggested) <= 5, suggested


def test_a_name_of_another_namespace_is_pointed_to():
    with pytest.raises(AttributeError, match=r"avalon\.nn\.functional\.cross_entropy"):
        nn.cross_entropy
    with pytest.raises(AttributeError, match=r"avalon\.optim\.Adam"):
        nn.Adam


def test_a_name_with_nothing_close_says_where_to_look():
    with pytest.raises(AttributeError) as info:
        nn.Zzqxv
    message = str(info.value)
    assert "did you mean" not in message
    assert "dir(avalon.nn)" in message and "PORTING.md" in message


def test_top_level_suggests_its_own_functions_too():
    with pytest.raises(AttributeError, match=r"did you mean .*\bgrad\b"):
        avalon.Grad


def test_hasattr_and_getattr_default_still_work():
    assert not hasattr(nn, "Relu")
    assert getattr(F, "Relu", None) is None
    assert nn.ReLU is getattr(nn, "ReLU")


def test_private_names_are_missing_without_suggestions():
    with pytest.raises(AttributeError) as info:
        nn._pytest_probe
    assert str(info.value) == "module 'avalon.nn' has no attribute '_pytest_probe'"
