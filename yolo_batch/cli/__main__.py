"""``python -m yolo_batch.cli``: the same as the ``yolo-batch`` command (tests start it this way)."""

import sys

from yolo_batch.cli import main

sys.exit(main())
