"""Expose every config dataclass field as a command-line flag, with its default in --help.

Flags default to None so we can tell which fields the user set explicitly: those are
applied on top of a preset (new run) or of the saved config (resumed run).
"""

from __future__ import annotations

import argparse
import dataclasses

from gptjax import config as C


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, sections=("model", "train", "data")) -> None:
    shown = C.RunConfig(model=C.preset(C.DEFAULT_PRESET))  # what a new run gets
    for section in sections:
        cls = C.SECTIONS[section]
        group = parser.add_argument_group(f"{section} config", cls.__doc__.strip())
        for f in dataclasses.fields(cls):
            value = getattr(getattr(shown, section), f.name)
            # Empty strings mean "decided elsewhere", which each field's help explains.
            help_text = f"{f.metadata['help']} (default: {'empty' if value == '' else repr(value)})"
            kwargs = dict(dest=f"{section}.{f.name}", default=None, help=help_text)
            if f.type in ("bool", bool):
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            choices = f.metadata.get("choices")
            group.add_argument(flag(f.name), type=kind, choices=choices,
                               metavar=None if choices else kind.__name__.upper(), **kwargs)


def explicit_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """{section: {field: value}} for the config flags the user actually passed."""
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def apply_overrides(cfg: C.RunConfig, overrides: dict[str, dict]) -> C.RunConfig:
    parts = {s: dataclasses.replace(getattr(cfg, s), **overrides.get(s, {})) for s in C.SECTIONS}
    return C.RunConfig(**parts)
