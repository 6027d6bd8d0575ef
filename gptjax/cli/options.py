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


# The metavar of every value a flag takes, by what it is: one vocabulary for every command
# (tests/cli/test_flag_vocabulary.py walks the parsers against it).
METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}
CHECKPOINT_METAVAR = "latest|best|STEP"
CHECKPOINT_HELP = "which checkpoint: latest, best or a step number (default: latest)"

# Old spellings, hidden from --help and kept for one release: {old: new}.
RENAMED_FLAGS = {"--sample-tokens": "--max-new-tokens", "--batch": "--batch-size",
                 "--context": "--context-length", "--vocab": "--vocab-size",
                 "--decode-batch": "--decode-batch-size", "--decode-prompt": "--decode-prompt-tokens",
                 "--decode-new": "--decode-new-tokens"}


def add_checkpoint(parser, flag: str = "--checkpoint", when: str = "", default: str | None = "latest"):
    """The one way every command names a run's checkpoint."""
    parser.add_argument(flag, default=default, metavar=CHECKPOINT_METAVAR,
                        help=f"{when}{CHECKPOINT_HELP}")


def add_quantize(parser, what: str = "decode with") -> None:
    """--quantize and --quant-group: weight-only quantization (gptjax.model.quantize)."""
    parser.add_argument("--quantize", choices=("int8", "int4"), help=f"{what} int8 weights "
                        "(one scale per output channel) or int4 (one scale per --quant-group "
                        "inputs), quantized at load (default: the weights as stored)")
    parser.add_argument("--quant-group", type=int, default=64, metavar="INT",
                        help="with --quantize int4: inputs per scale (default: 64)")


def add_gpt2_ranks(parser) -> None:
    parser.add_argument("--gpt2-ranks", metavar="FILE",
                        help="local GPT-2 BPE ranks file (else $GPTJAX_GPT2_RANKS, else download)")


class _OldSpelling(argparse.Action):
    """Stores into the new flag's destination, with a deprecation warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        import warnings
        warnings.warn(f"{option_string} is renamed {RENAMED_FLAGS[option_string]}; the old "
                      "spelling goes in the next release")
        setattr(namespace, self.dest, values)


def add_old_spellings(parser: argparse.ArgumentParser) -> None:
    """A hidden alias for each renamed flag the parser has under its new name."""
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    for old, new in RENAMED_FLAGS.items():
        if new in actions:
            a = actions[new]
            parser.add_argument(old, action=_OldSpelling, dest=a.dest, type=a.type,
                                choices=a.choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_config_flags(parser: argparse.ArgumentParser, sections=("model", "train", "data"),
                     hidden=()) -> None:
    """A flag per config field of `sections`; those named in `hidden` work but stay out of
    --help (a command that refuses them says why when they are given)."""
    shown = C.RunConfig(model=C.preset(C.DEFAULT_PRESET))  # what a new run gets
    for section in sections:
        cls = C.SECTIONS[section]
        group = parser.add_argument_group(f"{section} config", cls.__doc__.strip())
        for f in dataclasses.fields(cls):
            value = getattr(getattr(shown, section), f.name)
            # Empty strings mean "decided elsewhere", which each field's help explains.
            help_text = f"{f.metadata['help']} (default: {'empty' if value == '' else repr(value)})"
            kwargs = dict(dest=f"{section}.{f.name}", default=None,
                          help=argparse.SUPPRESS if f.name in hidden else help_text)
            if f.type in ("bool", bool):
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            choices = f.metadata.get("choices")
            metavar = None if choices else f.metadata.get("metavar", METAVARS[kind])
            group.add_argument(flag(f.name), type=kind, choices=choices, metavar=metavar, **kwargs)


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
