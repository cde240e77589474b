"""Entry point of `python -m gcvit.doctor` (gcvit/doctor/cli.py)."""
import sys

from gcvit.doctor.cli import main

sys.exit(main())
