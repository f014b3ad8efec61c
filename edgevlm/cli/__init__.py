"""The ``edgevlm`` command line: one module per command."""
