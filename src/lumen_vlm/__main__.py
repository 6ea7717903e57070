"""`python -m lumen_vlm` is the `lumen-vlm` command."""

import sys

from .cli import main

sys.exit(main())
