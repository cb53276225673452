"""``python -m leveret.cli`` (how the demo and the tests start services)."""

from leveret.cli.app import main

main()
