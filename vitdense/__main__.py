"""``python -m vitdense`` runs the command line."""
from .cli import main

main(prog_name="vitdense")
