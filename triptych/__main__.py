"""``python -m triptych``: the ``triptych`` command."""

from triptych.cli.main import main

main()
