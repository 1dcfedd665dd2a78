"""``python -m rnnlm``: the ``rnnlm`` command."""

from rnnlm.cli import main

main()
