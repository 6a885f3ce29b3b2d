"""`python -m memescale.quality train ...`: see `memescale.quality.train`."""

from memescale.quality.train import main

raise SystemExit(main())
