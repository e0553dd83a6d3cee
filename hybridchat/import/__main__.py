"""python -m hybridchat.import: the command lives in the package (hybridchat/import/__init__.py)."""

from . import main

main()
