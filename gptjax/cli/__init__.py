"""The `gptjax` command: one module per command group, each a thin shell over library
calls (`app` parses and dispatches; `train`, `generate`, `evaluate`, `convert`,
`finetune`, `bench` add their subcommands; `options` turns config fields into flags).
The top layer: it may import anything, and nothing imports it.
"""

from gptjax.cli.app import main  # noqa: F401  (the console script gptjax.cli:main)
