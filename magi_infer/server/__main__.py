"""`python -m magi_infer.server ...` = `magi-serve ...` (also under `torchrun -m`)."""

from magi_infer.server.cli import main

main()
