import sys

from gptjax.cli import entry

sys.exit(entry())
