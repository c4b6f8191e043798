"""`python -m dlc` runs the command-line interface."""
from dlc.cli import main

raise SystemExit(main())
