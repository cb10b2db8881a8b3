"""``python -m idm ...`` runs the same command line as ``idm ...`` (so ``torchrun -m idm train`` works)."""

from idm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
