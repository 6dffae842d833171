"""Click commands of the analyses, one module per analysis; each registers itself on ``vitdense.cli.main``.

Commands parse options, call the library functions and write files; the algorithms live in the
analysis modules (``vitdense/cosegment.py`` ...), never here.
"""
