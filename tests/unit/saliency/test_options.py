"""``xattn_lightning.saliency.options`` and ``registry``: names and options checked where they are made, each default in one place."""

import pytest
import torch
from helpers import ORACLE_REGIONS, SALIENCY_METHODS, Oracle, oracle_adapter, tiny_whisper, whisper_batch

import xattn_lightning as xl


def test_unknown_names_list_valid_ones():
    model = Oracle(ORACLE_REGIONS)
    batch = {"input_features": torch.randn(1, 24, 4)}
    with pytest.raises(xl.UnknownNameError, match="encoder_spes"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("occlusion",))
    with pytest.raises(xl.UnknownNameError, match="n_masks"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("spes",), masks=3)
    with pytest.raises(xl.XAttnError, match="sequence of method names"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods="spes")
    (e,) = xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]])
    with pytest.raises(xl.XAttnError, match="methods=\\('spes',\\)"):
        e.agreement("spes")
    with pytest.raises(xl.XAttnError, match="p in"):
        xl.explain(oracle_adapter(model), batch, targets=[[1, 5, 2]], methods=("spes",), p=1.5)


@pytest.mark.parametrize(
    "opts, match",
    [({"autocast": "int8"}, "autocast"), ({"batch_size": 0}, "batch_size"), ({"encoder_batch_size": "big"}, "auto")],
)
def test_bad_precision_and_batch_size_options_are_refused(opts, match):
    m = tiny_whisper()
    with pytest.raises(xl.XAttnError, match=match):
        xl.explain(m, whisper_batch(m), targets=[[50257, 5, 50256]] * 2, methods=("encoder_spes",), **opts)


def test_option_defaults_live_in_one_place():
    """The SPES functions' signatures take their defaults from the typed option families, the gradient engines take
    the family's object; flat options go to every family that takes them, and each is checked where it is made."""
    import inspect
    from dataclasses import fields

    from xattn_lightning.saliency.gradients import attribute
    from xattn_lightning.saliency.options import (
        EncoderSpesOptions,
        GradientOptions,
        SaliencyOptions,
        SpesOptions,
        flat_names,
    )
    from xattn_lightning.saliency.perturbation import spes_encoder, spes_input

    rename = {"encoder_batch_size": "batch_size"}
    for fn, cls in (
        (spes_input, SpesOptions),
        (spes_encoder, EncoderSpesOptions),
    ):
        params = inspect.signature(fn).parameters
        for f in fields(cls):
            name = rename.get(f.name, f.name) if fn is spes_encoder else f.name
            if name in params:
                assert params[name].default == f.default, (fn.__name__, name)
    assert inspect.signature(attribute).parameters["options"].default == GradientOptions()
    from typing import get_args

    from xattn_lightning.saliency import METHODS, MethodName

    assert set(get_args(MethodName)) == set(METHODS) == set(SALIENCY_METHODS)  # the Literal names match the registry
    o = SaliencyOptions.from_flat(n_masks=64, p_h=0.5, n_steps=3)
    assert (o.encoder_spes.n_masks, o.spes.n_masks, o.encoder_spes.p_h, o.encoder_spes.encoder_batch_size) == (
        64, 64, 0.5, "auto",
    )  # fmt: skip
    assert o.gradient.n_steps == 3 and o.with_masks(128).spes.n_masks == 128
    assert set(o.flat()) == set(flat_names()) and SaliencyOptions.from_flat(**o.flat()) == o
    for bad, match in (({"p_h": 1.5}, "p_h"), ({"n_masks": 0}, "n_masks"), ({"sampling": "x"}, "sampling"),
                       ({"smoothing": 2}, "odd"), ({"n_steps": 0}, "n_steps"), ({"frame_rate": -1}, "frame_rate")):  # fmt: skip
        with pytest.raises(xl.XAttnError, match=match):
            SaliencyOptions.from_flat(**bad)
    # each method is handed its own family's object (the contract of the registry)
    assert {spec.options for spec in METHODS.values()} == {"spes", "encoder_spes", "gradient"}
    assert all(
        isinstance(o.family(spec.options), (SpesOptions, EncoderSpesOptions, GradientOptions))
        for spec in METHODS.values()
    )
