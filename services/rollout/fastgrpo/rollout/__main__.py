"""`python -m fastgrpo.rollout ...` is `fastgrpo-rollout ...`."""
import sys

from fastgrpo.rollout.service.cli import main

sys.exit(main())
