"""`accelerate launch train.py RECIPE [key.sub=value ...]`: the same as `sglr-zoo train RECIPE ...`."""

import sys

from sglr_zoo.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
