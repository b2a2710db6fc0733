"""`python -m sglr_zoo`: the `sglr-zoo` command (what `torchrun` and `accelerate launch -m sglr_zoo` run)."""

from sglr_zoo.cli import main

main()
