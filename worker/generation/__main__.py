"""`python -m worker.generation`: run one generation worker (see `worker.generation.server`)."""

from worker.generation.server import main

main()
