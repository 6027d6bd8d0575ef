"""The public surface, `gptjax.<name>`, whatever else has been imported."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import gptjax


def test_every_public_name_is_the_function_or_class_after_every_module_is_imported():
    """A subpackage named like a public function would replace it as an attribute of
    `gptjax` once imported (why the packages are `training` and `generation`)."""
    for info in pkgutil.walk_packages(gptjax.__path__, "gptjax."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in gptjax.__all__:
        value = getattr(gptjax, name)
        assert not isinstance(value, types.ModuleType), f"gptjax.{name} is a module"
        assert callable(value), name
    assert gptjax.train.__module__ == "gptjax.training.train"
    assert gptjax.generate.__module__ == "gptjax.generation.decoder"


def test_the_data_layer_imports_no_jax():
    """Tokenizer worker processes and `gptjax prepare`'s readers start without JAX."""
    code = ("import sys, gptjax, gptjax.data.tokenizer, gptjax.data.prepared, gptjax.data.windows, "
            "gptjax.config; print('jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
