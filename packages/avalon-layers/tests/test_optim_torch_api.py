"""Optimizers take PyTorch's constructor (parameters or parameter groups),
step from the gradient avalon.grad returned, expose param_groups, and save and
load state in torch's format, including a torch optimizer's own state_dict,
so a run resumes step for step.  Adadelta, Adamax, NAdam and RAdam follow
torch's update rules."""
import copy

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim
from avalon import tree

RTOL, ATOL = 1e-5, 1e-6


class Net(nn.Module):
    def __init__(self, dtype=np.float32):
        super().__init__()
        self.body = nn.Linear(5, 4, dtype=dtype)
        self.head = nn.Linear(4, 3, dtype=dtype)

    def forward(self, x):
        return self.head(avalon.tanh(self.body(x)))


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


def _data(rng, dtype=np.float32):
    return rng.standard_normal((8, 5)).astype(dtype), rng.standard_normal((8, 3)).astype(dtype)


def _torch_params(model):
    return [torch.tensor(np.array(p), requires_grad=True) for p in model.parameters()]


def _feed(tparams, grads):
    for t, g in zip(tparams, grads):
        t.grad = None if g is None else torch.tensor(np.array(g))


def _assert_same(params, tparams, where, rtol=RTOL, atol=ATOL):
    for i, (p, t) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=rtol, atol=atol, err_msg=f"param {i} {where}")


def _grads_of(g_model):
    return [g for _, g in g_model.named_parameters()]


# -- the constructor and the step from avalon.grad's gradient ------------------------------------------------

CONFIGS = [
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1)),
    ("Adamax", dict()),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)),
    ("NAdam", dict()),
    ("NAdam", dict(lr=0.01, momentum_decay=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict()),
    ("RAdam", dict(lr=0.01, betas=(0.5, 0.7), weight_decay=0.1)),
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
]


def _ids(c):
    return c[0] + "(" + ",".join(f"{k}={v}" for k, v in c[1].items()) + ")"


def _torch_opt(name, params, kwargs):
    extra = {} if name in ("Adagrad",) else {"foreach": False}
    return getattr(torch.optim, name)(params, **kwargs, **extra)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_torch_constructor_and_step_from_the_gradient_match_torch(name, kwargs):
    """The first lines of a PyTorch program, ported: opt = X(model.parameters(), ...);
    loss, grads = avalon.grad(...); opt.step(grads[0])."""
    rng = np.random.default_rng(0)
    model = Net()
    tparams = _torch_params(model)
    opt, topt = getattr(optim, name)(model.parameters(), **kwargs), _torch_opt(name, tparams, kwargs)
    arrays = model.parameters()
    for step in range(6):
        opt.zero_grad()
        _, grads = avalon.grad(_loss, model, *_data(rng))
        opt.step(grads[0])
        _feed(tparams, _grads_of(grads[0]))
        topt.step()
        _assert_same(model.parameters(), tparams, f"after step {step + 1}")
    assert all(a is b for a, b in zip(arrays, model.parameters()))  # in place
    assert opt.update_fn.traces == 1


@pytest.mark.parametrize("name, kwargs", [c for c in CONFIGS if c[0] in ("Adadelta", "Adamax", "NAdam", "RAdam")],
                         ids=[_ids(c) for c in CONFIGS if c[0] in ("Adadelta", "Adamax", "NAdam", "RAdam")])
def test_new_optimizers_without_parameters_match_torch_in_float64(name, kwargs):
    rng = np.random.default_rng(1)
    model = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    tparams = [torch.tensor(model["w"].copy()), torch.tensor(model["b"].copy())]
    opt, topt = getattr(optim, name)(**kwargs), _torch_opt(name, tparams, kwargs)
    for step in range(8):  # RAdam switches to its rectified update at step 6 with the default betas
        g = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
        opt.step(model, g)
        _feed(tparams, [g["w"], g["b"]])
        topt.step()
        _assert_same([model["w"], model["b"]], tparams, f"after step {step + 1}", rtol=1e-10, atol=1e-12)


def test_parameter_groups_have_their_own_options_and_param_groups_is_writable():
    rng = np.random.default_rng(2)
    model = Net()
    tparams = _torch_params(model)
    opt = optim.SGD([{"params": model.body.parameters()}, {"params": model.head.parameters(), "lr": 1e-3}],
                    lr=0.1, momentum=0.9)
    topt = torch.optim.SGD([{"params": tparams[:2]}, {"params": tparams[2:], "lr": 1e-3}], lr=0.1, momentum=0.9,
                           foreach=False)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1e-3]
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["params"][0] is model.head.weight
    for step in range(5):
        if step == 2:  # a change takes effect at the next step, as user code and schedulers do in torch
            for o in (opt, topt):
                o.param_groups[0]["lr"] = 0.05
                o.param_groups[1]["momentum"] = 0.5
        _, grads = avalon.grad(_loss, model, *_data(rng))
        opt.step(grads[0])
        _feed(tparams, _grads_of(grads[0]))
        topt.step()
        _assert_same(model.parameters(), tparams, f"after step {step + 1}")
    assert opt.lr == 0.05  # opt.lr is the first group's


def test_add_param_group_and_frozen_parameters():
    rng = np.random.default_rng(3)
    model = Net()
    head_before = [p.copy() for p in model.head.parameters()]
    tparams = _torch_params(model)
    opt = optim.Adam(model.body.parameters(), lr=0.01)
    topt = torch.optim.Adam(tparams[:2], lr=0.01, foreach=False)
    _, grads = avalon.grad(_loss, model, *_data(rng))
    opt.step(grads[0])  # the head is not the optimizer's: left alone
    _feed(tparams[:2], _grads_of(grads[0])[:2])
    topt.step()
    for p, b in zip(model.head.parameters(), head_before):
        np.testing.assert_array_equal(p, b)
    opt.add_param_group({"params": model.head.parameters(), "lr": 0.1, "betas": (0.5, 0.6)})
    topt.add_param_group({"params": tparams[2:], "lr": 0.1, "betas": (0.5, 0.6)})
    assert opt.param_groups[1]["eps"] == 1e-8  # the constructor's defaults fill the rest
    for _ in range(3):
        _, grads = avalon.grad(_loss, model, *_data(rng))
        opt.step(grads[0])
        _feed(tparams, _grads_of(grads[0]))
        topt.step()
    _assert_same(model.parameters(), tparams, "after add_param_group")
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model.body.weight]})
    assert len(opt.param_groups) == 2


def test_params_lists_changed_in_place_are_followed_with_their_state():
    rng = np.random.default_rng(14)
    a, b, c = (rng.standard_normal(2) for _ in range(3))
    ta, tb, tc = (torch.tensor(x.copy()) for x in (a, b, c))
    opt, topt = optim.Adam([a, b], lr=0.1), torch.optim.Adam([ta, tb], lr=0.1, foreach=False)
    for step in range(4):
        if step == 2:  # as torch allows: the first parameter leaves, a new one joins
            opt.param_groups[0]["params"][:] = [b, c]
            topt.param_groups[0]["params"][:] = [tb, tc]
        g = [rng.standard_normal(2), rng.standard_normal(2)]
        opt.step(g)
        _feed(topt.param_groups[0]["params"], g)
        topt.step()
    _assert_same([a, b, c], [ta, tb, tc], "after the change", rtol=1e-12, atol=1e-12)
    assert sorted(opt.state) == [0, 1] and opt.state[0]["step"] == 4 and opt.state[1]["step"] == 2
    opt.param_groups[0]["params"].append(b)
    with pytest.raises(ValueError, match="more than once"):
        opt.step([g[0], g[1], g[1]])


def test_plain_arrays_pair_positionally():
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((5, 2)).astype(np.float32)
    tw, tb = torch.tensor(w.copy(), requires_grad=True), torch.tensor(b.copy(), requires_grad=True)
    opt, topt = optim.Adam([w, b], lr=0.1), torch.optim.Adam([tw, tb], lr=0.1, foreach=False)

    def f(w, b):
        return avalon.sum(avalon.tanh(avalon.linear(x, w, b)))

    for _ in range(3):
        _, (gw, gb) = avalon.grad(f, w, b)
        opt.step((gw, gb))
        _feed([tw, tb], [gw, gb])
        topt.step()
    _assert_same([w, b], [tw, tb], "positional")
    with pytest.raises(ValueError, match="got 1 gradients for 2 parameters"):
        opt.step((gw,))
    with pytest.raises(avalon.ShapeError, match=r"parameter 1 has shape \(2,\) but the parameter has shape \(3,\)"):
        opt.step((gw, gb[:2]))


def test_none_gradients_are_skipped_and_their_state_left_untouched():
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal(3), rng.standard_normal(2)
    tw, tb = torch.tensor(w.copy()), torch.tensor(b.copy())
    opt, topt = optim.Adam([w, b], lr=0.1), torch.optim.Adam([tw, tb], lr=0.1, foreach=False)
    for step in range(4):
        gw, gb = rng.standard_normal(3), (rng.standard_normal(2) if step % 2 == 0 else None)
        opt.step([gw, gb])
        _feed([tw, tb], [gw, gb])
        topt.step()
    _assert_same([w, b], [tw, tb], "with None gradients", rtol=1e-12, atol=1e-12)
    assert opt.state[0]["step"] == 4 and opt.state[1]["step"] == 2


def test_tied_parameters_are_updated_once_with_the_summed_gradient():
    class Tied(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.a = nn.Parameter(w)
            self.b = self.a

        def forward(self, x):
            return avalon.sum(x * self.a) + avalon.sum(x * x * self.b)

    rng = np.random.default_rng(6)
    w = rng.standard_normal(3)
    model, t = Tied(w), torch.tensor(w.copy(), requires_grad=True)
    opt, topt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD([t], lr=0.1, momentum=0.9)
    assert len(opt.param_groups[0]["params"]) == 1
    for _ in range(3):
        x = rng.standard_normal(3)
        _, grads = avalon.grad(lambda m, x: m(x), model, x)
        opt.step(grads[0])
        topt.zero_grad()
        (torch.sum(torch.tensor(x) * t) + torch.sum(torch.tensor(x) ** 2 * t)).backward()
        topt.step()
    np.testing.assert_allclose(model.a, t.detach().numpy(), rtol=1e-12)
    assert model.a is model.b is w


def test_gradients_that_cannot_be_paired_are_refused_clearly():
    rng = np.random.default_rng(7)
    model, other = Net(), Net()
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = [p.copy() for p in model.parameters()]
    _, grads = avalon.grad(_loss, other, *_data(rng))
    with pytest.raises(ValueError, match="none of the arrays of the Net these gradients were taken of is a parameter"):
        opt.step(grads[0])
    _, grads = avalon.grad(_loss, model, *_data(rng))
    with pytest.raises(ValueError, match=r"the whole tuple avalon.grad returns .*opt.step\(grads\[0\]\)"):
        opt.step(grads)
    with pytest.raises(ValueError, match="cannot tell which parameters this dict holds the gradients of"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match=r"step\(\) needs the gradients.*no loss.backward\(\)"):
        opt.step()
    with pytest.raises(ValueError, match=r"created without parameters.*; pass the model too"):
        optim.SGD(lr=0.1).step(grads[0])
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p, b)


def test_the_model_and_gradient_form_still_works_with_parameters_given():
    rng = np.random.default_rng(8)
    model = Net()
    tparams = _torch_params(model)
    opt, topt = optim.AdamW(model.parameters(), lr=0.05), torch.optim.AdamW(tparams, lr=0.05, foreach=False)
    for _ in range(2):
        _, (g, _, _) = avalon.grad(_loss, model, *_data(rng))
        opt.step(model, g)
        _feed(tparams, _grads_of(g))
        topt.step()
    _assert_same(model.parameters(), tparams, "model, grads form")


@pytest.mark.parametrize("make, error, words", [
    (lambda m: optim.SGD(m), TypeError, "should be an iterable of arrays or dicts, but got Net (pass model.parameters"),
    (lambda m: optim.SGD(m.body.weight), TypeError, "but got ndarray"),
    (lambda m: optim.Adam([]), ValueError, "empty parameter list"),
    (lambda m: optim.Adam([1.0, 2.0]), TypeError, "can only optimize arrays, but one of the params is float"),
    (lambda m: optim.Adam(["w"]), TypeError, "can only optimize arrays, but one of the params is str"),
    (lambda m: optim.Adam([np.arange(3)]), ValueError, "int64 array"),
    (lambda m: optim.Adam(set()), TypeError, "ordered collections"),
    (lambda m: optim.Adam([{"params": m.parameters(), "momentum": 0.9}]), ValueError, "unknown option 'momentum'"),
    (lambda m: optim.Adam([{"params": m.parameters(), "lr": -1}]), ValueError, "Invalid lr (learning rate): -1"),
    (lambda m: optim.Adam(lr=m.parameters()), ValueError, "the parameters come first"),
], ids=lambda v: None if callable(v) or isinstance(v, type) else v[:30])
def test_bad_parameters_are_refused(make, error, words):
    with pytest.raises(error) as err:
        make(Net())
    assert words in str(err.value)


def test_old_positional_form_still_takes_lr_first():
    opt = optim.SGD(0.1, 0.9)
    assert (opt.lr, opt.momentum) == (0.1, 0.9)
    assert opt.param_groups[0]["params"] == []
    # the form without parameters keeps its own order (nesterov before weight_decay); torch's form has torch's
    old = optim.SGD(0.1, 0.9, 0.0, True, 0.01)
    assert (old.nesterov, old.weight_decay) == (True, 0.01)
    new = optim.SGD([np.zeros(2)], 0.1, 0.9, 0.0, 0.01, True)
    assert (new.nesterov, new.weight_decay) == (True, 0.01)
    assert optim.Adam(0.01, (0.8, 0.9)).betas == (0.8, 0.9)


# -- state_dict in torch's format, and a torch optimizer's own state ---------------------------------------------------

def test_state_dict_is_in_torchs_format():
    rng = np.random.default_rng(9)
    model = Net()
    opt = optim.Adam([{"params": model.body.parameters()}, {"params": model.head.parameters(), "lr": 0.1}], lr=0.01)
    _, grads = avalon.grad(_loss, model, *_data(rng))
    opt.step(grads[0])
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][1]["lr"] == 0.1 and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert sorted(sd["state"][2]) == ["exp_avg", "exp_avg_sq", "step"] and sd["state"][2]["step"] == 1
    assert sd["state"][2]["exp_avg"].shape == (3, 4)
    # a torch optimizer over the same parameters takes it
    tparams = _torch_params(model)
    topt = torch.optim.Adam([{"params": tparams[:2]}, {"params": tparams[2:], "lr": 0.1}], lr=0.01)
    topt.load_state_dict({"state": {k: {n: torch.tensor(np.asarray(v, np.float32)) for n, v in st.items()}
                                    for k, st in sd["state"].items()},
                          "param_groups": [{**g, **{k: v for k, v in topt.param_groups[i].items()
                                                    if k not in g and k != "params"}}
                                           for i, g in enumerate(sd["param_groups"])]})
    # and our own dict round-trips into a fresh optimizer, continuing identically
    resumed = optim.Adam([{"params": model.body.parameters()}, {"params": model.head.parameters()}])
    resumed.load_state_dict(copy.deepcopy(sd))
    assert resumed.param_groups[1]["lr"] == 0.1
    twin = copy.deepcopy(model)
    _, grads = avalon.grad(_loss, model, *_data(rng))
    g_twin = copy.deepcopy(_grads_of(grads[0]))
    opt.step(grads[0])
    resumed_twin = optim.Adam([{"params": twin.body.parameters()}, {"params": twin.head.parameters()}])
    resumed_twin.load_state_dict(copy.deepcopy(sd))
    resumed_twin.step(g_twin)
    for a, b in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(a, b)


RESUME = [c for c in CONFIGS if c[0] != "Adagrad"] + [("Adagrad", dict(lr=0.1, initial_accumulator_value=0.1))]


@pytest.mark.parametrize("name, kwargs", RESUME, ids=[_ids(c) for c in RESUME])
def test_a_torch_optimizer_state_resumes_step_for_step(name, kwargs):
    """Run torch 3 steps, load its state_dict into Avalon's optimizer built over the
    same model, continue 3 steps in both."""
    rng = np.random.default_rng(10)
    model = Net()
    tparams = _torch_params(model)
    topt = _torch_opt(name, [{"params": tparams[:2]}, {"params": tparams[2:], "lr": 0.02}], kwargs)
    grads = [[rng.standard_normal(tuple(t.shape)).astype(np.float32) for t in tparams] for _ in range(6)]
    for g in grads[:3]:
        _feed(tparams, g)
        topt.step()
    for p, t in zip(model.parameters(), tparams):
        p[...] = t.detach().numpy()
    opt = getattr(optim, name)([{"params": model.body.parameters()}, {"params": model.head.parameters()}])
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[1]["lr"] == 0.02
    for step, g in enumerate(grads[3:]):
        opt.step(g)
        _feed(tparams, g)
        topt.step()
        _assert_same(model.parameters(), tparams, f"after resumed step {step + 1}")


def _three_torch_steps(tparams):
    topt = torch.optim.Adam(tparams, lr=0.01, foreach=False)
    for _ in range(3):
        _feed(tparams, [torch.ones(t.shape).numpy() for t in tparams])
        topt.step()
    return topt.state_dict()


def test_nadam_state_dict_has_torchs_mu_product_per_group():
    rng = np.random.default_rng(13)
    w, b = rng.standard_normal(3), rng.standard_normal(2)
    tw, tb = torch.tensor(w.copy()), torch.tensor(b.copy())

    def groups(p, q):
        return [{"params": [p]}, {"params": [q], "betas": (0.5, 0.9), "momentum_decay": 0.1}]

    opt, topt = optim.NAdam(groups(w, b)), torch.optim.NAdam(groups(tw, tb), foreach=False)
    for _ in range(3):
        g = [rng.standard_normal(3), rng.standard_normal(2)]
        opt.step(g)
        _feed([tw, tb], g)
        topt.step()
    ours, theirs = opt.state_dict()["state"], topt.state_dict()["state"]
    for i in (0, 1):
        assert ours[i]["mu_product"] == theirs[i]["mu_product"].item()
        assert ours[i]["step"] == theirs[i]["step"].item() == 3


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd["param_groups"][0]["params"].pop(), "has 3 parameters but this optimizer's has 4"),
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 parameter groups"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(7)), r"state 'exp_avg' of parameter 1 has shape (7,)"),
    (lambda sd: sd["param_groups"][0].update(nonsense=1), "unknown option 'nonsense'"),
    (lambda sd: sd["param_groups"][0].update(maximize=True), "maximize=True"),
    (lambda sd: sd["param_groups"][0].update(decoupled_weight_decay=True), "decoupled_weight_decay=True"),
    (lambda sd: sd["param_groups"][0].update(eps=-1.0), "Invalid epsilon value: -1.0"),
    (lambda sd: sd["state"][0].update(mystery=torch.zeros(1)), "unknown entry 'mystery'"),
    (lambda sd: sd["param_groups"][0].pop("lr"), "has no 'lr'"),
])
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(edit, words):
    model = Net()
    sd = _three_torch_steps(_torch_params(model))
    opt = optim.Adam(model.parameters(), lr=0.5)
    _, grads = avalon.grad(_loss, model, *_data(np.random.default_rng(11)))
    opt.step(grads[0])
    before = copy.deepcopy(opt.state_dict())
    edit(sd)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    assert words in str(err.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for n, v in st.items():
            np.testing.assert_array_equal(after["state"][k][n], v)


def test_a_state_saved_before_an_option_existed_takes_its_default():
    model = Net()
    sd = _three_torch_steps(_torch_params(model))
    del sd["param_groups"][0]["amsgrad"]  # as an older torch would have saved it
    opt = optim.Adam(model.parameters(), lr=0.5, amsgrad=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["amsgrad"] is False and opt.param_groups[0]["lr"] == 0.01


def test_a_torch_state_of_another_optimizer_is_refused():
    model = Net()
    sd = _three_torch_steps(_torch_params(model))
    with pytest.raises(ValueError, match="unknown option 'betas'"):
        optim.SGD(model.parameters(), lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.Adam(lr=0.1).load_state_dict(sd)


# -- checking arguments as torch does -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, words", [
    ("Adadelta", dict(rho=1.5), "Invalid rho value: 1.5"),
    ("Adadelta", dict(lr=-1.0), "Invalid lr (learning rate): -1.0"),
    ("Adadelta", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("Adamax", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
    ("Adamax", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ("NAdam", dict(momentum_decay=-0.1), "Invalid momentum_decay value: -0.1"),
    ("NAdam", dict(betas=(-0.1, 0.9)), "Invalid beta parameter at index 0: -0.1"),
    ("RAdam", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
])
def test_new_optimizers_refuse_bad_arguments_as_torch_does(name, kwargs, words):
    with pytest.raises(ValueError) as err:
        getattr(optim, name)(Net().parameters(), **kwargs)
    assert words in str(err.value)
    with pytest.raises(ValueError, match="Invalid"):
        getattr(torch.optim, name)([torch.zeros(1, requires_grad=True)], **kwargs)


_README_CHECK = """
print(float(loss) < 0.5, float(abs(w).sum()) > 0)
"""  # after the README's code: the loop trained, w moved


def test_the_readmes_training_loops_run(tmp_path):
    """README: the PyTorch-style loop (parameters at construction, zero_grad,
    clip_grad_norm_, step(grads[0]), a scheduler) and the positional example."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    loop = next(b for b in blocks if "opt.zero_grad()" in b)
    positional = next(b for b in blocks if "opt.step((gw, gb))" in b)
    code = "\n".join([blocks[0], loop, positional]) + _README_CHECK
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["True", "True"], r.stdout


def test_the_torch_format_state_saves_and_loads_with_avalon_save(tmp_path):
    model = Net()
    opt = optim.Adam([{"params": model.body.parameters()}, {"params": model.head.parameters(), "lr": 0.1}],
                     lr=0.01, amsgrad=True)
    optim.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # adds its keys to the groups
    _, grads = avalon.grad(_loss, model, *_data(np.random.default_rng(12)))
    opt.step(grads[0])
    avalon.save(opt.state_dict(), tmp_path / "opt.npz")
    resumed = optim.Adam([{"params": model.body.parameters()}, {"params": model.head.parameters()}])
    resumed.load_state_dict(avalon.load(tmp_path / "opt.npz"))
    for a, b in zip(resumed.param_groups, opt.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}
        assert all(x is y for x, y in zip(a["params"], b["params"]))
    for k, st in opt.state.items():
        assert resumed.state[k]["step"] == st["step"] == 1
        np.testing.assert_array_equal(resumed.state[k]["max_exp_avg_sq"], st["max_exp_avg_sq"])


def test_fit_takes_an_optimizer_given_its_parameters():
    import warnings
    rng = np.random.default_rng(15)
    model = Net()
    x, y = _data(rng)
    opt = optim.Adam(model.head.parameters(), lr=0.05)  # only the head trains
    body = [p.copy() for p in model.body.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # avalon.fit is experimental
        history = avalon.fit(model, x, y, loss_fn=F.mse_loss, epochs=5, batch_size=8, opt=opt, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    for p, b in zip(model.body.parameters(), body):
        np.testing.assert_array_equal(p, b)
