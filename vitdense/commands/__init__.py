"""Click commands of the analyses, one module per analysis; each registers itself on ``vitdense.cli.main``.

Commands parse options, call the library functions and write files; the algorithms live in the
analysis modules (``vitdense/cosegment.py`` ...), never here.
"""

# The CLI first, whichever command module is imported first (``vitdense.commands.retrieval`` from Python, say):
# it registers every module of this package, in an order where each finds what it imports.
from .. import cli  # noqa: E402,F401
