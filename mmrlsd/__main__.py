"""`python -m mmrlsd ...` (used under torchrun: `torchrun --nproc_per_node 2 -m mmrlsd train CONFIG`)."""

import sys

from mmrlsd.cli import main

sys.exit(main())
