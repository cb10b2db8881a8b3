"""``python -m idm ...`` runs the same command line as ``idm ...``."""

from idm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
