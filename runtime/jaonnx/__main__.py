"""`python -m jaonnx` is the `jaonnx` command."""

from .cli import main

main()
