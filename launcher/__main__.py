"""`python -m launcher`: serve a model with Triton and the OpenAI adapter (what `make serve` runs)."""

from launcher.serve import main

main()
