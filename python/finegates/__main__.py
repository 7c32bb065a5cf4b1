"""``python -m finegates`` (also what ``accelerate launch -m finegates`` / ``torchrun -m finegates`` run)."""

import sys

from .app.cli import main

sys.exit(main())
