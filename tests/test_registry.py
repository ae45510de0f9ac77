"""The catalogue API in-process: listing, describing, creating, the errors, and the switches.

Registries here are built with ``autoload=False`` (isolated from whatever is installed) unless a
test puts a real installed plugin distribution on ``sys.path``.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import pytest
import torch

from ponder import registry
from ponder.registry import (
    KINDS,
    PluginConflictError,
    PluginLoadError,
    PluginLoadWarning,
    PluginParameterError,
    Registry,
    UnknownKindError,
    UnknownPluginError,
    hookspecs,
    normalize_name,
)

BUILTINS = Registry(autoload=False)


def _inputs(kind: str) -> tuple:
    """What ponder itself supplies to a factory of each kind."""
    if kind == "norm":
        return (16,)
    if kind == "optimizer":
        return ([torch.nn.Parameter(torch.randn(4, 3))],)
    if kind == "halting":
        return (16, 3)  # d_model, n_layers
    if kind == "controller":
        return ()
    raise AssertionError(f"no test inputs for plugin kind {kind!r}: add them here")


def _exercise(kind: str, obj, inputs: tuple) -> None:
    if kind == "norm":
        x = torch.randn(2, 5, 16) * 3 + 1
        y = obj(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert not torch.allclose(y, x)  # it normalised something
    elif kind == "optimizer":
        (param,) = inputs[0]
        before = param.detach().clone()
        param.grad = torch.ones_like(param)
        obj.step()
        assert not torch.equal(before, param.detach())
        assert obj.state_dict()["param_groups"]
    elif kind == "halting":
        s = torch.randn(2, 5, 16)
        state = obj.init_state(s)
        total = torch.zeros(2, 5)
        for layer in range(3):
            state = obj.step(state, s * (layer + 1), layer, 0.9)
            total += state.weight.detach()
        assert bool(state.halted.all()) and torch.allclose(total, torch.ones(2, 5))
        assert obj.loss(state).shape == ()
    elif kind == "controller":
        assert any(callable(getattr(obj, e, None)) for e in ("after_backward", "after_step", "after_eval"))
        obj.load_state_dict(obj.state_dict())


@pytest.mark.parametrize("info", BUILTINS.list_plugins(), ids=lambda i: f"{i.kind}-{i.name}")
def test_every_registered_plugin_can_be_described_and_created(info):
    desc = BUILTINS.describe(info.kind, info.name)
    assert desc.params and desc.info.description
    settings = [p for p in desc.params if not p.supplied_by_ponder]
    assert all(not p.required for p in settings), "built-in plugins need no settings to be created"
    inputs = _inputs(info.kind)
    obj = BUILTINS.create(info.kind, info.name, *inputs)
    _exercise(info.kind, obj, inputs)


def test_builtins_cover_the_first_norms_and_optimizers():
    names = {(i.kind, i.name) for i in BUILTINS.list_plugins()}
    assert {("norm", "layernorm"), ("norm", "rmsnorm"), ("optimizer", "sgd"), ("optimizer", "adam"),
            ("optimizer", "adamw"), ("optimizer", "dag"), ("halting", "act"), ("halting", "pondernet"),
            ("halting", "fixed")} <= names
    assert all(i.distribution == "ponder" for i in BUILTINS.list_plugins())


def test_describe_shows_torch_defaults_and_docs():
    params = {p.name: p for p in BUILTINS.describe("optimizer", "adamw").params}
    assert params["params"].supplied_by_ponder and params["params"].required
    assert params["lr"].default == 1e-3 and params["weight_decay"].default == 1e-2
    assert params["betas"].default == (0.9, 0.999)
    assert "learning rate" in params["lr"].doc
    norm = {p.name: p for p in BUILTINS.describe("norm", "rmsnorm").params}
    assert norm["eps"].default == 1e-6 and "stability" in norm["eps"].doc
    assert norm["position"].supplied_by_ponder


@pytest.mark.parametrize("spelling", ["RMSNorm", "rmsnorm", "rms_norm", "RMS-Norm", "rms norm"])
def test_names_are_normalised(spelling):
    assert normalize_name(spelling) == "rmsnorm"
    assert BUILTINS.get("norm", spelling).name == "rmsnorm"


def test_dyt_spellings_are_one_name():
    assert normalize_name("DyT") == normalize_name("dyt") == normalize_name("dy_t") == "dyt"


def test_kind_aliases_and_unknown_kind():
    assert [i.name for i in BUILTINS.list_plugins("norms")] == ["adyt", "dyt", "layernorm", "rmsnorm"]
    with pytest.raises(UnknownKindError, match=r"unknown plugin kind 'normz'; valid kinds: norm, optimizer"):
        BUILTINS.list_plugins("normz")


def test_list_pattern_is_a_glob_on_the_name():
    assert [i.name for i in BUILTINS.list_plugins(pattern="*norm")] == ["layernorm", "rmsnorm"]
    assert [i.name for i in BUILTINS.list_plugins(pattern="adam*")] == ["adam", "adamw"]


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(UnknownPluginError) as err:
        BUILTINS.create("norm", "layrnorm", 8)
    msg = str(err.value)
    assert "unknown norm 'layrnorm'" in msg
    assert "did you mean 'layernorm'?" in msg
    assert "adyt, dyt, layernorm, rmsnorm" in msg


def test_unknown_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(PluginParameterError) as err:
        BUILTINS.create("norm", "rmsnorm", 8, epsilon=1e-5)
    assert "'epsilon'" in str(err.value)
    assert "valid parameters: eps, elementwise_affine" in str(err.value)


@pytest.mark.parametrize(("name", "params", "expected"), [
    ("adamw", {"lr": "fast"}, "parameter 'lr' got 'fast' (str), expected float"),
    ("adamw", {"amsgrad": 1}, "parameter 'amsgrad' got 1 (int), expected bool"),
    ("adamw", {"betas": (0.9,)}, "parameter 'betas' got (0.9,) (tuple), expected a sequence of 2 values"),
    ("sgd", {"nesterov": "yes"}, "parameter 'nesterov' got 'yes' (str), expected bool"),
])
def test_ill_typed_parameter_names_it(name, params, expected):
    with pytest.raises(PluginParameterError, match="valid parameters") as err:
        BUILTINS.validate("optimizer", name, params)
    assert expected in str(err.value)


def test_good_parameters_reach_the_factory():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = BUILTINS.create("optimizer", "adamw", [param], lr=3, betas=[0.8, 0.9])  # an int lr is a fine float
    assert opt.param_groups[0]["lr"] == 3 and tuple(opt.param_groups[0]["betas"]) == (0.8, 0.9)
    norm = BUILTINS.create("norm", "layernorm", 6, position="ffn", eps=1e-3)
    assert norm.eps == 1e-3


def test_norm_position_is_checked_and_conv_normalises_channels():
    with pytest.raises(PluginParameterError, match="position 'middle' is not one of attn, ffn, final, conv"):
        BUILTINS.create("norm", "rmsnorm", 4, position="middle")
    norm = BUILTINS.create("norm", "layernorm", 3, position="conv")
    y = norm(torch.randn(2, 3, 5, 5) * 4 + 2)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 5, 5), atol=1e-5)


def test_missing_inputs_are_an_error():
    with pytest.raises(PluginParameterError, match="built from 1 input"):
        BUILTINS.create("norm", "rmsnorm")


def test_blocking_a_builtin_plugin_removes_what_it_provides():
    reg = Registry(autoload=False, blocked=["ponder.optim"])
    assert {i.kind for i in reg.list_plugins()} == {"norm", "halting", "controller"}
    with pytest.raises(UnknownPluginError, match=r"blocked or not allowed\): ponder.optim"):
        reg.get("optimizer", "adam")


def test_shared_registry_is_configured_lazily_and_once(monkeypatch):
    monkeypatch.setenv("PONDER_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.configure(block=["ponder.norm"])
    try:
        reg = registry.get_registry()
        assert reg._pm is None  # nothing loaded until asked
        assert registry.list_plugins("norm") == []
        assert registry.get_registry() is reg
    finally:
        registry.configure()


# -- real third-party distributions on sys.path (installed by the plugin_dists fixture) ----------

def test_third_party_plugin_is_found_and_created(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists["ponder-hello"]))
    reg = Registry()
    info = reg.get("norm", "scale_norm")
    assert (info.name, info.distribution, info.version, info.plugin) == ("ScaleNorm", "ponder-hello", "0.3.1", "hello")
    norm = reg.create("norm", "scalenorm", 8, eps=1e-4)
    assert torch.allclose(norm(torch.randn(3, 8)).norm(dim=-1), torch.full((3,), 8 ** 0.5), atol=1e-4)


def test_broken_plugins_warn_and_the_rest_keeps_working(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists["ponder-broken"]))
    reg = Registry()
    with pytest.warns(PluginLoadWarning) as caught:
        names = [i.name for i in reg.list_plugins()]
    messages = [str(w.message) for w in caught]
    assert any("plugin 'badimport' from ponder-broken 0.0.1 failed to load: ModuleNotFoundError" in m
               for m in messages)
    assert any("plugin 'badhook' from ponder-broken 0.0.1 failed to load: RuntimeError: halfnorm's config"
               in m for m in messages)
    assert "layernorm" in names and "halfnorm" not in names  # the failed hook's registration is dropped
    with pytest.raises(PluginLoadError, match="ponder_missing_dependency_xyz") as err:
        reg.get("norm", "badimport")
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    with pytest.raises(UnknownPluginError, match="failed to load.*badhook"):
        reg.get("norm", "halfnorm")


def test_conflicting_names_name_both_distributions(plugin_dists, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dists["ponder-clash"]))
    reg = Registry()
    with pytest.warns(PluginLoadWarning, match="registered by both"):
        reg.load()
    with pytest.raises(PluginConflictError) as err:
        reg.create("norm", "layernorm", 4)
    assert "ponder 0.1.0 (plugin 'ponder.norm')" in str(err.value)
    assert "ponder-clash 2.0.0 (plugin 'clash')" in str(err.value)
    # blocking one side resolves it
    assert Registry(blocked=["clash"]).get("norm", "layernorm").distribution == "ponder"
    assert Registry(blocked=["ponder.norm"]).get("norm", "layernorm").distribution == "ponder-clash"


def test_allow_list_and_disable_autoload(plugin_dists, monkeypatch):
    for name in ("ponder-hello", "ponder-broken"):
        monkeypatch.syspath_prepend(str(plugin_dists[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken ones are not even imported
        only_hello = Registry(allow=["ponder-hello"])
        assert "ScaleNorm" in [i.name for i in only_hello.list_plugins()]
        assert not only_hello.failures
        off = Registry(autoload=False)
        assert "ScaleNorm" not in [i.name for i in off.list_plugins()]
        explicit = Registry(autoload=False, allow=["hello"])
        assert "ScaleNorm" in [i.name for i in explicit.list_plugins()]


# -- the hook contract itself ---------------------------------------------------------------------

def test_every_hook_is_documented_typed_and_in_the_readme():
    specs = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("register_")}
    assert set(specs) == {k.hook for k in KINDS.values()}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, fn in specs.items():
        assert fn.__doc__ and "Factory:" in fn.__doc__, f"{name} needs a docstring saying what its factory makes"
        assert fn.__annotations__.get("register") == "Register"
        assert name in readme, f"README does not document hook {name}"
