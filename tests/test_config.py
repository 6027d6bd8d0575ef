"""Configs saved by older versions, or edited by hand, load or fail with a clear message."""

import json

import pytest

from gptjax import config as C
from gptjax.errors import GptjaxError


def _saved(tmp_path, **model_fields):
    data = C.to_dict(C.RunConfig())
    data["model"].update(model_fields)
    data["model"].pop("remat")  # written before rematerialisation existed
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_an_older_config_loads_with_the_new_fields_defaulted(tmp_path):
    cfg = C.validate(C.load(_saved(tmp_path, attention_impl="xla")))
    assert cfg.model.remat == "none" and cfg.model.attention_impl == "xla"


def test_a_value_outside_a_fields_choices_names_the_field(tmp_path):
    with pytest.raises(GptjaxError, match="model.attention_impl must be one of auto, native, "
                                          "blocked, xla, cudnn, got 'flash'"):
        C.validate(C.load(_saved(tmp_path, attention_impl="flash")))
