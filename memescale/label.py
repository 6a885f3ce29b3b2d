"""`python -m memescale.label ...`: the labelling tool, see `memescale.quality.label_app`."""

from memescale.quality.label_app import main

if __name__ == "__main__":
    raise SystemExit(main())
