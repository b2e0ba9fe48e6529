"""``python -m zkprefork.registrar``: how the master starts its registrar."""
from zkprefork.registrar.loop import main

main()
